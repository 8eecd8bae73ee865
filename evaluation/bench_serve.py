"""What ``asyncgen serve --max-batch`` gives: the same bursts of requests against a server that makes one
image a pipeline call and one that batches, alternated in one run.

    python -m asyncgen.evaluation.bench_serve [--devices 2] [--max-batch 4] [--requests 8] [--steps 10]
                                              [--repeats 3] [--model M] [--out DIR]

Both servers are started once (``asyncgen serve --port 0``, the same model and layout) and stay up.
Each round sends ``--requests`` requests at once (one client thread each; the same size, steps and
guidance, each its own prompt and seed) to one server, waits for every image, then does the same on
the other; which goes first alternates. Reported per server: images per second over the burst (from
the first request sent to the last image received), p50 and p95 request latency, and the batch sizes
the server reported; then the ratio, and how far each batched image is from the one-a-call image of
the same request (byte-identical count, max and mean absolute difference in 8-bit levels).

A burst is the case batching is for: the first request finds the ranks idle and runs alone, the rest
queue behind it and share calls. Timings are only as good as the machine is quiet (the load average
is recorded). With ``--device cuda`` both servers hold the model on the same devices.
Written as ``bench_serve.json`` and ``bench_serve.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import threading
import time
from pathlib import Path

from .prompts import miniature_prompts
from .reporting import markdown_table, write_atomic, write_json


def _burst(server, requests: list[dict]) -> dict:
    """Send every request at once; their answers, latencies and the burst's wall time."""
    answers: list = [None] * len(requests)
    latencies: list = [None] * len(requests)

    def send(i: int) -> None:
        with server.client(timeout=600) as client:
            start = time.perf_counter()
            answers[i] = client.post("/v1/images", json={**requests[i], "response_format": "b64_json"})
            latencies[i] = time.perf_counter() - start

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    bad = [a for a in answers if a is None or a.status_code != 200]
    if bad:
        raise RuntimeError(f"a request failed: {bad[0].status_code if bad[0] is not None else 'no answer'} "
                           f"{bad[0].text[:300] if bad[0] is not None else ''}")
    bodies = [a.json() for a in answers]
    return {"wall_s": wall, "latencies_s": latencies, "batches": [b["batch"] for b in bodies],
            "images": [base64.b64decode(b["images_data"][0]["b64_png"]) for b in bodies]}


def _difference(a: bytes, b: bytes) -> tuple[int, float]:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(io.BytesIO(a))).astype(int)
    y = np.asarray(Image.open(io.BytesIO(b))).astype(int)
    return int(np.abs(x - y).max()), float(np.abs(x - y).mean())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(args: argparse.Namespace) -> dict:
    from .serve_process import Server

    common = ["--devices", str(args.devices), "--max-queue", str(args.requests), "--max-steps", str(args.steps),
              "--oversubscribe"]
    if args.model:
        common += ["--model", args.model]
    prompts = miniature_prompts(args.requests)
    requests = [{"prompt": prompt, "seed": 1000 + i, "steps": args.steps} for i, prompt in enumerate(prompts)]
    load_start = os.getloadavg()
    servers = {"one a call": Server(*common, "--max-batch", "1"),
               f"batches of {args.max_batch}": Server(*common, "--max-batch", str(args.max_batch))}
    names = list(servers)
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    try:
        for name in names:  # untimed: the first call of each server pays for lazy initialisation
            _burst(servers[name], requests[:2])
        for r in range(args.repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                rounds[name].append(_burst(servers[name], requests))
                print(f"round {r + 1}/{args.repeats} {name}: {rounds[name][-1]['wall_s']:.2f} s, batches "
                      f"{sorted(set(rounds[name][-1]['batches']))}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    load_end = os.getloadavg()
    rows = []
    for name in names:
        walls = [b["wall_s"] for b in rounds[name]]
        latencies = [t for b in rounds[name] for t in b["latencies_s"]]
        rows.append({"server": name, "images_per_s": args.requests / statistics.median(walls),
                     "burst_s": statistics.median(walls), "p50_s": _percentile(latencies, 0.5),
                     "p95_s": _percentile(latencies, 0.95),
                     "batch_sizes": sorted({n for b in rounds[name] for n in b["batches"]})})
    single, batched = rounds[names[0]][0]["images"], rounds[names[1]][0]["images"]
    differences = [_difference(a, b) for a, b in zip(single, batched)]
    record = {"devices": args.devices, "model": args.model or "miniature", "steps": args.steps,
              "requests": args.requests, "max_batch": args.max_batch, "repeats": args.repeats, "rows": rows,
              "throughput_ratio": rows[1]["images_per_s"] / rows[0]["images_per_s"],
              "identical_images": sum(a == b for a, b in zip(single, batched)),
              "max_level_difference": max(d for d, _ in differences),
              "mean_level_difference": statistics.fmean(m for _, m in differences),
              "load_average": {"start": list(load_start), "end": list(load_end)}, "rounds": {
                  name: [{k: v for k, v in b.items() if k != "images"} for b in rounds[name]] for name in names}}
    return record


def _markdown(record: dict) -> str:
    table = markdown_table(record["rows"], ["server", "images_per_s", "burst_s", "p50_s", "p95_s", "batch_sizes"],
                           {"images_per_s": ".2f", "burst_s": ".2f", "p50_s": ".2f", "p95_s": ".2f"})
    return (f"# asyncgen serve --max-batch {record['max_batch']}: bursts of {record['requests']} requests\n\n"
            f"{record['model']}, {record['devices']} ranks, {record['steps']} steps, median of {record['repeats']} "
            f"alternated rounds; load average {record['load_average']['start'][0]:.2f} at the start, "
            f"{record['load_average']['end'][0]:.2f} at the end.\n\n{table}\n\n"
            f"Batched / one a call: **{record['throughput_ratio']:.2f}x** images per second. Batched images "
            f"byte-identical to one-a-call images: {record['identical_images']} of {record['requests']}; largest "
            f"difference {record['max_level_difference']} of 255 levels (mean {record['mean_level_difference']:.4f}).\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncgen.evaluation.bench_serve", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2, help="ranks of each server (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=4, help="the batching server's --max-batch "
                        "(default: %(default)s)")
    parser.add_argument("--requests", type=int, default=8, help="requests in each burst (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="steps of each request (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="bursts per server (default: %(default)s)")
    parser.add_argument("--model", default=None, help="model for both servers (default: the built-in miniature)")
    parser.add_argument("--out", type=Path, default=Path("bench-serve"), help="folder for the report "
                        "(default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("devices", "max_batch", "requests", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: need a whole number of at least 1")
    record = run(args)
    write_json(args.out / "bench_serve.json", record)
    text = _markdown(record)
    write_atomic(args.out / "bench_serve.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
