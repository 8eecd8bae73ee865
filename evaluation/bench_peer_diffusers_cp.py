"""Side by side: the stock pipeline, diffusers' own parallelism and asyncgen, alternated in one launch.

    asyncgen bench --peer diffusers-cp [--family wan|flux] [--configs n2s1] [--warmups 1] [--steps 20] ...

``--peer diffusers-cp[:ulysses|ring|tp]`` names the peer: diffusers' context parallelism
(``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` or
``ring_degree=N``; ``diffusers-cp`` alone is Ulysses) or its tensor parallelism
(``TensorParallelConfig(tp_degree=N)``), applied to the pipeline's denoiser at degree ``N``:
the number of processes of the asyncgen configuration (``--configs``, one of them; at least
2). The peer is diffusers' implementation as shipped, never a copy. The three arms run the
same model, prompts, seeds and step count, timed alternately in one launch
(:mod:`asyncgen.evaluation.peer_harness`); an asyncgen configuration of fewer processes runs on
the first ones. Reported per arm: latency, speedup over stock, PSNR against the stock image
and the largest difference (context parallelism computes the same sums in another
order, so it is exact or within rounding), resident denoiser parameter bytes per rank, and,
from one more (untimed, profiled) call of each, the bytes and time of every collective per
step (:mod:`asyncgen.evaluation.collective_traffic`). Written as ``results.json`` and
``results.md`` in ``--out``.

What runs where: diffusers gives a context-parallel plan (its ``_cp_plan``) to some
transformer classes only (here ``wan`` and ``flux``; not SD3, not UNets), and a
tensor-parallel plan to fewer (``flux``); a model without one is refused with diffusers' own
reason. On CPU only Ulysses runs: ring attention needs the attention kernel's
log-sum-exp, which diffusers' native (CPU) backend does not return (the backends that do
are GPU kernels), and diffusers' tensor parallelism refuses CPU meshes.

One patch, in this benchmark only (:func:`cpu_accelerator_count`): diffusers 0.42 builds
the mesh device as ``rank % torch.accelerator.device_count()``, which divides by zero on a
machine without an accelerator.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from asyncgen.cli.launcher import WorkerFailed, launch

from . import peer_harness
from .bench_asyncdiff import available_cores, config_name, load_on_rank, time_images, world_size_of
from .collective_traffic import CollectiveTraffic, combine
from .reporting import json_text, markdown_table

PEER = "diffusers-cp"
KINDS = ("ulysses", "ring", "tp")
ACCEPTED = (PEER, *(f"{PEER}:{k}" for k in KINDS))
LABELS = {"ulysses": "diffusers Ulysses", "ring": "diffusers ring", "tp": "diffusers tensor parallel"}
RING_ON_CPU = ("ring attention needs the log-sum-exp of each attention block, which diffusers' native attention "
               "backend (the one that runs on CPU) does not return ('Native attention does not support "
               "return_lse=True'); the backends that do are GPU kernels (flash, cuDNN, sage)")


def parse_peer(text: str) -> str:
    """``diffusers-cp[:ulysses|ring|tp]`` -> the kind; anything else a one-line error listing the accepted names."""
    from asyncgen.cli.errors import UsageError

    name, _, kind = text.partition(":")
    if name != PEER or (kind and kind not in KINDS):
        hint = ("; the original AsyncDiff is measured by python -m asyncgen.evaluation.bench_peer_asyncdiff "
                "--peer PATH" if Path(text).exists() or "asyncdiff" in text.lower() else "")
        raise UsageError(f"--peer {text}: unknown peer; accepted: {', '.join(ACCEPTED)}{hint}")
    return kind or "ulysses"


def check_available(kind: str, device: str) -> None:
    """Refuse what cannot run before anything is spawned: the peer's API missing, ring attention on CPU."""
    from asyncgen.cli.errors import UsageError

    import diffusers
    from diffusers import ModelMixin

    if not (hasattr(ModelMixin, "enable_parallelism") and hasattr(diffusers, "ContextParallelConfig")
            and hasattr(diffusers, "TensorParallelConfig")):
        raise UsageError(f"--peer {PEER}:{kind}: diffusers {diffusers.__version__} has no "
                         "ModelMixin.enable_parallelism / ContextParallelConfig / TensorParallelConfig; install a "
                         "diffusers that has them (0.40 or later)")
    if kind == "ring" and device == "cpu":
        raise UsageError(f"--peer {PEER}:ring: not available on CPU: {RING_ON_CPU}; run --peer {PEER}:ulysses, "
                         "or ring with --device cuda")


@contextlib.contextmanager
def cpu_accelerator_count():
    """While diffusers builds its device mesh on a machine without an accelerator, the accelerator count answers 1.

    A benchmark-local patch, not part of asyncgen. diffusers 0.42's ``enable_parallelism``
    picks the mesh's device as ``torch.device(type, rank % torch.accelerator.device_count())``
    with the accelerator type torch reports; on a CPU-only machine that type is ``cpu`` and the
    count is 0, so the call divides by zero before it builds anything. Each CPU process is one
    "device" (one thread), so 1 is the count that describes it. The patch replaces a public
    torch function for the duration of that one call and restores it; with an accelerator
    present (or a torch without ``torch.accelerator``) nothing is patched. diffusers 0.40
    asks ``torch.cpu.device_count()`` instead, which already answers 1.
    """
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None or not hasattr(accelerator, "device_count") or accelerator.device_count() > 0:
        yield
        return
    original = accelerator.device_count
    accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        accelerator.device_count = original


def denoiser(pipe):
    """The pipeline's denoiser module (``transformer``, else ``unet``)."""
    from asyncgen.models import DENOISER_COMPONENTS

    for name in DENOISER_COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    raise ValueError(f"{type(pipe).__name__} has none of the denoiser components {DENOISER_COMPONENTS}")


def enable_peer(pipe, kind: str, degree: int) -> None:
    """diffusers' own parallelism on the pipeline's denoiser; its refusals become one-line errors naming the peer."""
    from asyncgen.cli.errors import UsageError
    from diffusers import ContextParallelConfig, TensorParallelConfig

    config = {"ulysses": lambda: ContextParallelConfig(ulysses_degree=degree),
              "ring": lambda: ContextParallelConfig(ring_degree=degree),
              "tp": lambda: TensorParallelConfig(tp_degree=degree)}[kind]()
    model = denoiser(pipe)
    try:
        with cpu_accelerator_count():
            model.enable_parallelism(config=config)
    except (ValueError, NotImplementedError) as exc:
        # e.g. a class without a context-parallel plan, tensor parallelism on a CPU mesh
        raise UsageError(f"--peer {PEER}:{kind}: diffusers refuses {type(model).__name__} at degree {degree}: "
                         f"{exc}") from exc


def _worker(rank: int, world_size: int, model: str, kind: str, wrap: dict, call: dict, prompts: list[str],
            repeats: int, device: str, dtype: str, allow_pickle: bool):
    """The peer (all ranks), asyncgen (its ranks) and stock (rank 0) alternated; then one counted call of each."""
    import torch.distributed as dist
    from asyncgen.comm.group import default_backend
    from asyncgen.pipelines import AsyncDiffPipeline

    if not dist.is_initialized():
        dist.init_process_group(backend=default_backend())
    call = dict(call)
    seed = call.pop("seed")
    load = dict(device=device, dtype=dtype, allow_pickle=allow_pickle)
    peer = load_on_rank(model, rank, **load)
    enable_peer(peer, kind, world_size)  # first: a refusal costs no more than one load
    ours_world = world_size_of(wrap)
    # every rank takes part in creating a group, members or not
    group = None if ours_world == world_size else dist.new_group(list(range(ours_world)))
    ours = None
    if rank < ours_world:
        ours = AsyncDiffPipeline(load_on_rank(model, rank, **load), **wrap, process_group=group)
        ours.pipeline.set_progress_bar_config(disable=True)
    stock = load_on_rank(model, rank, **load) if rank == 0 else None
    arms = {"peer": peer, "asyncgen": ours}
    seconds, images = peer_harness.alternate(arms, stock, prompts, call, seed, repeats)
    traffic = {}
    for name, group_size in (("peer", world_size), ("asyncgen", ours_world)):
        dist.barrier()
        if arms[name] is None:
            traffic[name] = None
            continue
        with CollectiveTraffic() as counted:
            time_images(arms[name], prompts[:1], call, seed)
        traffic[name] = counted.summary(group_size, call["num_inference_steps"])
    return dict(seconds=seconds, images=images if rank == 0 else None, traffic=traffic,
                resident_bytes={"stock": peer_harness.parameter_bytes(denoiser(stock)) if stock is not None else None,
                                "peer": peer_harness.parameter_bytes(denoiser(peer)),
                                "asyncgen": peer_harness.parameter_bytes(ours.denoiser) if ours is not None else None})


def run_comparison(model: str, kind: str, wrap: dict, call: dict, prompts: list[str], repeats: int,
                   device: str = "cpu", dtype: str = "float32", allow_pickle: bool = False, pin_cpus: bool = True,
                   timeout: float = 3600) -> list[dict]:
    """Rows for stock, diffusers' parallelism and asyncgen, each arm's with its collectives per step (``traffic``)."""
    from asyncgen.cli.errors import UsageError

    degree = max(2, world_size_of(wrap))
    try:
        per_rank = launch(_worker, degree, model, kind, wrap, call, prompts, repeats, device, dtype, allow_pickle,
                          timeout=timeout, pin_cpus=pin_cpus)
    except WorkerFailed as failure:
        if (failure.exc_type or "").endswith("UsageError"):
            raise UsageError(failure.message) from None
        raise
    arms = {"peer": dict(config=f"{LABELS[kind]}, degree {degree}", ranks=degree),
            "asyncgen": dict(config=f"asyncgen {config_name(wrap)}", ranks=world_size_of(wrap))}
    rows = peer_harness.rows(per_rank, arms, repeats)
    for row, name in zip(rows[1:], arms):
        traffic = combine([r["traffic"][name] for r in per_rank if r["traffic"][name] is not None])
        row["traffic"] = traffic
        row["sent_kib_per_step"] = sum(t["sent_bytes_per_step_all_ranks"] for t in traffic.values()) / 2**10
        row["backend_ms_per_step"] = sum(t["ms_per_step"] or 0.0 for t in traffic.values()) \
            if all(t["ms_per_step"] is not None for t in traffic.values()) else None
    rows[0].update(traffic={}, sent_kib_per_step=0.0, backend_ms_per_step=0.0)
    return rows


TABLE_COLUMNS = ["config", "ranks", "latency_s", "speedup", "psnr_db", "max_abs_diff", "resident_mib_per_rank",
                 "sent_kib_per_step"]
TABLE_FORMATS = {"latency_s": ".3f", "speedup": ".2f", "psnr_db": ".1f", "max_abs_diff": ".1e",
                 "sent_kib_per_step": ".1f"}
TRAFFIC_COLUMNS = ["config", "operation", "calls_per_step", "kib_per_call", "sent_kib_per_step", "ms_per_call",
                   "ms_per_step"]
TRAFFIC_FORMATS = {"calls_per_step": ".1f", "kib_per_call": ".1f", "sent_kib_per_step": ".1f", "ms_per_call": ".2f",
                   "ms_per_step": ".1f"}
TABLE_NOTES = """latency_s: seconds per image (or video), median over repeats (a repeat of a multi-rank run ends when its
slowest rank returns); speedup: median over repeats of stock latency / latency, the three arms timed alternately in
one launch, one CPU thread (or one GPU) per rank; psnr_db: against the stock output of the same prompt and seed
(median over prompts; inf: identical), max_abs_diff: the largest difference from it; resident_mib_per_rank:
denoiser parameter MiB each rank holds; sent_kib_per_step: KiB all ranks together send per denoising step (transfers
made once per call, such as asyncgen's broadcasts of prompt embeddings and decoded images, spread over the steps),
from one more, profiled, call of each arm. Per operation (second table, same call): calls per step and payload KiB
per call on one rank (mean over ranks), the KiB all ranks send per step, and the milliseconds the process-group
backend spends in the operation per call and per step (mean over ranks; gloo only). That time runs from the start
of the operation to its end and so includes waiting for the peer: for an operation waited on at once (diffusers'
all-to-alls) it is time the rank stands still; for a receive posted before the compute it waits behind
(asyncgen's), it mostly covers the other stage's compute and is not a cost."""


def _tables(rows: list[dict]) -> tuple[str, str]:
    def mib(values):
        return " / ".join(f"{b / 2**20:.1f}" for b in values)

    main = markdown_table([dict(r, resident_mib_per_rank=mib(r["resident_bytes"])) for r in rows], TABLE_COLUMNS,
                          TABLE_FORMATS)
    per_op = [dict(config=r["config"], operation=op, calls_per_step=t["calls_per_step"],
                   kib_per_call=t["payload_bytes_per_call"] / 2**10,
                   sent_kib_per_step=t["sent_bytes_per_step_all_ranks"] / 2**10,
                   ms_per_call=t["ms_per_call"] if t["ms_per_call"] is not None else "-",
                   ms_per_step=t["ms_per_step"] if t["ms_per_step"] is not None else "-")
              for r in rows[1:] for op, t in r["traffic"].items()]
    return main, markdown_table(per_op, TRAFFIC_COLUMNS, TRAFFIC_FORMATS)


def check_request(args, configs: list[dict]) -> str:
    """The peer's kind, once the request can run here (``asyncgen bench`` calls this before building the model)."""
    from asyncgen.cli.errors import UsageError

    kind = parse_peer(args.peer)
    if len(configs) != 1:
        raise UsageError(f"--configs {args.configs} --warmups {args.warmups}: with --peer give one configuration and "
                         "one warm-up (the asyncgen arm)")
    check_available(kind, args.device)
    degree = max(2, world_size_of(configs[0]))
    if args.device == "cpu" and degree > available_cores() and not args.oversubscribe:
        raise UsageError(f"--peer {args.peer}: degree {degree} needs more processes than the {available_cores()} "
                         "cores here; pass --oversubscribe to run anyway (fidelity and bytes are valid, latency not)")
    return kind


def run_peer(args, kind: str, model: str, wrap: dict, prompts: list[str], call: dict, name: str) -> int:
    """``asyncgen bench --peer ...`` once ``bench_asyncdiff.run`` has settled the model, configuration and call."""
    from asyncgen.cli.files import write_all

    degree = max(2, world_size_of(wrap))
    out = Path(args.out)
    outputs = [out / "results.json", out / "results.md"]
    load_before = peer_harness.load_average()
    start = time.perf_counter()
    rows = run_comparison(model, kind, wrap, call, prompts, args.repeats, args.device, args.dtype, args.allow_pickle,
                          pin_cpus=args.pin)
    main, per_op = _tables(rows)
    record = dict(benchmark="peer_diffusers_cp", peer=f"{PEER}:{kind}", degree=degree, model=name, call=call,
                  prompts=prompts, wrap=wrap, device=args.device, dtype=args.dtype, repeats=args.repeats,
                  cores=available_cores(), command=getattr(args, "command", None),
                  # other tenants' load (1, 5, 15 min averages) when the run started and ended
                  load_average={"start": load_before, "end": peer_harness.load_average()},
                  rows=rows, wall_seconds=time.perf_counter() - start)
    load = "unknown" if record["load_average"]["end"] is None else \
        ", ".join(f"{x:.1f}" for x in record["load_average"]["end"])
    footer = (f"{call['num_inference_steps']} steps, {len(prompts)} prompt(s), {args.repeats} repeats, {args.device}; "
              f"{record['cores']} cores, load average {load} (1/5/15 min) at the end.")
    text = f"# {name}: stock, {PEER}:{kind} and asyncgen, side by side\n\n{main}\n\n{per_op}\n\n{TABLE_NOTES}\n\n{footer}\n"
    write_all({outputs[0]: json_text(record), outputs[1]: text})  # both whole, or neither
    print(main)
    print()
    print(per_op)
    print(TABLE_NOTES)
    print(f"{footer}\nresults written to {outputs[0]} and {outputs[1]}")
    return 0

