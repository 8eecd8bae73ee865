"""``asyncgen serve`` over real HTTP: the miniature model on two CPU ranks, one server for the module.

Every wait has a timeout; nothing asserts on wall-clock time.
"""

import base64
import json
import os
import signal
import socket
import threading

import pytest

pytest.importorskip("fastapi", reason="asyncgen serve needs the serve extra: pip install 'asyncgen[serve]'")
pytest.importorskip("uvicorn", reason="asyncgen serve needs the serve extra: pip install 'asyncgen[serve]'")
pytest.importorskip("httpx", reason="the serve tests talk HTTP through httpx (the test extra)")

from serve_process import API_KEY, Server, alive, wait_until  # noqa: E402

pytestmark = pytest.mark.distributed

PROMPT = "a large red circle on a blue background"
MAX_QUEUE = 3
LONG = 1000  # steps of a request that is still running when the test acts on it (it is cancelled)


@pytest.fixture(scope="module")
def server():
    server = Server("--devices", "2", "--max-queue", str(MAX_QUEUE), "--max-steps", str(LONG), "--max-images", "2",
                    "--max-prompt-chars", "200", "--max-body-bytes", "4096")
    try:
        yield server
    finally:
        assert server.stop() == 0, "".join(server.output)


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``asyncgen generate`` on two ranks, the same arguments as the requests below."""
    from asyncgen.cli.main import main

    out = tmp_path_factory.mktemp("generate") / "ref.png"
    assert main(["generate", PROMPT, "--seed", "7", "--steps", "4", "--devices", "2", "--oversubscribe",
                 "-o", str(out)]) == 0
    return out.read_bytes()


def _image(http, **extra):
    return http.post("/v1/images", json={"prompt": PROMPT, "seed": 7, "steps": 4, **extra})


def _idle(http):
    return wait_until(lambda: http.get("/healthz").json()["running"] is None, 120, "the ranks to be idle")


def _started(http, job_id):
    """Wait until the job has run a step on the ranks."""
    return wait_until(lambda: (lambda s: s if s["status"] == "running" and s["step"] >= 1 else None)(
        http.get(f"/v1/jobs/{job_id}").json()), 120, f"job {job_id} to run")


def _finished(http, job_id):
    return wait_until(lambda: (lambda s: s if s["status"] not in ("queued", "running") else None)(
        http.get(f"/v1/jobs/{job_id}").json()), 120, f"job {job_id} to end")


def test_a_request_returns_the_bytes_asyncgen_generate_writes(http, reference):
    response = _image(http)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "7"
    assert response.content == reference
    as_json = _image(http, response_format="b64_json")
    assert as_json.status_code == 200
    body = as_json.json()
    assert body["seed"] == 7 and body["steps"] == 4 and body["status"] == "succeeded"
    assert base64.b64decode(body["images_data"][0]["b64_png"]) == reference


def test_two_images_use_seed_and_seed_plus_one(http, reference):
    body = _image(http, seed=6, n=2, response_format="b64_json").json()
    assert [image["seed"] for image in body["images_data"]] == [6, 7]
    assert base64.b64decode(body["images_data"][1]["b64_png"]) == reference  # image i uses seed + i, as generate


def test_cancelling_a_running_job_leaves_the_ranks_ready_and_the_next_image_unchanged(http, reference):
    job = _image(http, steps=LONG, wait=False)
    assert job.status_code == 202
    job_id = job.json()["id"]
    _started(http, job_id)
    cancel = http.delete(f"/v1/jobs/{job_id}")
    assert cancel.status_code in (200, 202)
    ended = _finished(http, job_id)
    assert ended["status"] == "cancelled" and ended["error"] == "cancelled by the client"
    assert ended["step"] < LONG  # stopped at a step boundary, not run to the end
    _idle(http)
    after = _image(http)
    assert after.status_code == 200 and after.content == reference


def test_progress_events_stream_each_step_then_done(http):
    job_id = _image(http, steps=3, wait=False).json()["id"]
    events = []
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
                if kind == "done":
                    break
    assert events[-1][0] == "done" and events[-1][1]["status"] == "succeeded"
    assert events[-1][1]["step"] == 3
    steps = [data["step"] for kind, data in events if kind == "progress"]
    assert steps == sorted(steps)


def test_a_client_that_disconnects_does_not_leave_the_ranks_busy(server, http, reference):
    _idle(http)
    body = json.dumps({"prompt": PROMPT, "seed": 7, "steps": LONG}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as raw:
        raw.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        job_id = wait_until(lambda: http.get("/healthz").json()["running"], 120, "the request to run")
        _started(http, job_id)
    ended = _finished(http, job_id)
    assert ended["status"] == "cancelled" and "disconnected" in ended["error"]
    _idle(http)
    assert _image(http).content == reference


@pytest.mark.parametrize("body, field", [
    ({"height": 33}, "height"), ({"width": 20}, "width"), ({"height": 9000}, "height"), ({"height": 0}, "height"),
    ({"steps": 0}, "steps"), ({"steps": LONG + 1}, "steps"), ({"steps": "4"}, "steps"), ({"steps": True}, "steps"),
    ({"guidance": "high"}, "guidance"), ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"),
    ({"seed": 2**64 - 1, "n": 2, "response_format": "b64_json"}, "seed"), ({"n": 3}, "n"), ({"n": 0}, "n"),
    ({"n": 2}, "response_format"), ({"prompt": "x" * 201}, "prompt"),
    ({"negative_prompt": "y" * 201}, "negative_prompt"),
    ({"prompt": None}, "prompt"), ({"response_format": "jpeg"}, "response_format"), ({"path": "/etc/passwd"}, "path"),
])
def test_bad_input_gets_422_naming_the_field(http, body, field):
    response = http.post("/v1/images", json={"prompt": PROMPT, **body})
    assert response.status_code == 422, response.text
    assert any(error["loc"][:2] == ["body", field] for error in response.json()["detail"]), response.text


def test_the_size_rule_is_the_command_lines(http):
    message = http.post("/v1/images", json={"prompt": PROMPT, "height": 33}).json()["detail"][0]["msg"]
    assert message == ("height 33 is not a multiple of 8, the size step of this model (VAE factor x patch size); "
                       "nearest valid: 32 or 40")


def test_non_finite_guidance_is_refused(http):
    # JSON has no NaN, but Python's parser takes it: the CLI's finite-number rule applies
    response = http.post("/v1/images", content=b'{"prompt": "x", "guidance": NaN}',
                         headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "guidance"]


def test_bodies_over_the_cap_get_413(http):
    assert http.post("/v1/images", json={"prompt": "x" * 5000}).status_code == 413

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(5):
            yield b" " * 1000

    assert http.post("/v1/images", content=chunks(), headers={"content-type": "application/json"}).status_code == 413


def test_the_api_key_is_required_except_for_health(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/metrics").status_code == 401
        refused = anonymous.post("/v1/images", json={"prompt": PROMPT}, headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"


def test_a_full_queue_gets_429_with_retry_after(http):
    _idle(http)
    running = _image(http, steps=LONG, wait=False).json()["id"]
    _started(http, running)
    waiting = [_image(http, wait=False) for _ in range(MAX_QUEUE)]
    assert [r.status_code for r in waiting] == [202] * MAX_QUEUE
    refused = _image(http, wait=False)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "asyncgen_queue_length 3" in http.get("/metrics").text
    for job_id in [running] + [r.json()["id"] for r in waiting]:
        http.delete(f"/v1/jobs/{job_id}")
    assert _finished(http, running)["status"] == "cancelled"
    _idle(http)


def test_metrics_count_outcomes_and_steps(http):
    text = http.get("/metrics").text
    assert "# TYPE asyncgen_step_seconds histogram" in text
    assert 'asyncgen_requests_total{outcome="succeeded"}' in text
    assert 'asyncgen_requests_total{outcome="refused",code="422"}' in text
    count = next(float(line.split()[1]) for line in text.splitlines() if line.startswith("asyncgen_step_seconds_count"))
    assert count > 0


def test_openapi_page(server):
    import httpx

    schema = httpx.get(f"{server.url}/openapi.json", timeout=60).json()
    assert {"/v1/images", "/v1/jobs/{job_id}", "/healthz", "/metrics"} <= set(schema["paths"])


def test_load_mixed_valid_and_invalid(server, http):
    """200 requests from 16 clients, a third of them invalid: every invalid one gets its 422, every valid one
    an image or a 429 with Retry-After (the queue holds at most MAX_QUEUE), never a 5xx."""
    import time

    _idle(http)
    total, clients = 200, 16
    outcomes, latencies, lock = [], [], threading.Lock()
    depth = []

    def client(worker: int):
        with server.client() as own:
            for i in range(worker, total, clients):
                valid = i % 3 != 0
                body = {"prompt": PROMPT, "seed": i, "steps": 2} if valid else {"prompt": PROMPT, "steps": -i}
                start = time.perf_counter()
                response = own.post("/v1/images", json=body)
                with lock:
                    outcomes.append((valid, response.status_code, response.headers.get("retry-after")))
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - start)

    def watch(stop):
        while not stop.is_set():
            line = next(l for l in http.get("/metrics").text.splitlines() if l.startswith("asyncgen_queue_length"))
            depth.append(int(line.split()[1]))
            stop.wait(0.05)

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,))
    watcher.start()
    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    elapsed = time.perf_counter() - start
    stop.set()
    watcher.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert len(outcomes) == total
    assert all(code == 422 for valid, code, _ in outcomes if not valid)
    assert all(code in (200, 429) for valid, code, _ in outcomes if valid)
    assert all(int(after) >= 1 for valid, code, after in outcomes if code == 429)
    assert max(depth) <= MAX_QUEUE
    latencies.sort()
    if latencies:  # reported, never asserted: speed is measured, not tested
        print(f"\nload: {len(latencies)} images, {sum(c == 429 for _, c, _ in outcomes)} x 429, "
              f"p50 {latencies[len(latencies) // 2]:.3f} s, p95 {latencies[int(0.95 * (len(latencies) - 1))]:.3f} s, "
              f"{len(latencies) / elapsed:.2f} images/s")


def test_a_taken_port_is_refused_in_one_line_before_loading(capsys):
    from asyncgen.cli.main import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"asyncgen serve: error: --host 127.0.0.1 --port {port}: cannot listen there")
    assert len(error.splitlines()) == 1


def test_under_torchrun_rank_0_serves_the_same_bytes_and_sigterm_to_it_stops_every_rank(reference):
    """``torchrun ... -m asyncgen.cli serve``: the ranks are torchrun's; rank 0 (its pid first in the ready line)
    serves, and SIGTERM to it drains and stops the others (torchrun then exits 0)."""
    from asyncgen.cli.launcher import free_port

    server = Server(launcher=("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                              "--master-port", str(free_port())))
    try:
        with server.client() as client:
            assert client.get("/healthz").json()["ranks"] == 2
            response = client.post("/v1/images", json={"prompt": PROMPT, "seed": 7, "steps": 4})
        assert response.status_code == 200 and response.content == reference
        ranks = list(server.pids)
        assert server.proc.pid not in ranks  # torchrun's ranks, not the launching process
        os.kill(ranks[0], signal.SIGTERM)
        assert server.proc.wait(timeout=120) == 0, "".join(server.output)
        wait_until(lambda: not any(alive(pid) for pid in ranks), 60, "every rank to be gone")
    finally:
        if server.proc.poll() is None:
            server.kill()
