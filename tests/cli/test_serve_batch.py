"""``asyncgen serve --max-batch``: waiting requests with the same settings share pipeline calls.

One server (the miniature model on two CPU ranks, batches of up to 3 images, no drain grace) for the
module; the last test stops it with SIGTERM. Every wait has a timeout; nothing asserts on wall-clock time.
"""

import base64
import io
import signal
import threading

import pytest

pytest.importorskip("fastapi", reason="asyncgen serve needs the serve extra: pip install 'asyncgen[serve]'")
pytest.importorskip("uvicorn", reason="asyncgen serve needs the serve extra: pip install 'asyncgen[serve]'")
pytest.importorskip("httpx", reason="the serve tests talk HTTP through httpx (the test extra)")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from serve_process import Server, alive, wait_until  # noqa: E402

pytestmark = pytest.mark.distributed

LONG = 1000  # steps of a request that is still running when the test acts on it (it is cancelled)
MAX_BATCH = 3


@pytest.fixture(scope="module")
def server():
    server = Server("--devices", "2", "--max-batch", str(MAX_BATCH), "--max-queue", "8", "--max-steps", str(LONG),
                    "--drain-grace", "0")
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


def _submit(http, prompt, seed, steps=4):
    response = http.post("/v1/images", json={"prompt": prompt, "seed": seed, "steps": steps, "wait": False})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _summary(http, job_id):
    return http.get(f"/v1/jobs/{job_id}").json()


def _step_at_least(http, job_id, step):
    return wait_until(lambda: (lambda s: s if s["status"] == "running" and s["step"] >= step else None)(
        _summary(http, job_id)), 120, f"job {job_id} to reach step {step}")


def _finished(http, job_id):
    return wait_until(lambda: (lambda s: s if s["status"] not in ("queued", "running") else None)(
        _summary(http, job_id)), 120, f"job {job_id} to end")


def _pixels(summary):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(summary["images_data"][0]["b64_png"])))).astype(int)


def _idle(http):
    wait_until(lambda: http.get("/healthz").json()["running"] is None, 120, "the ranks to be idle")


def test_waiting_requests_with_the_same_settings_run_as_one_batch(http):
    _idle(http)
    blocker = _submit(http, "a long request that holds the ranks", 1, steps=LONG)
    _step_at_least(http, blocker, 1)
    # queued behind it, in this order: three that share settings and one with other steps between them
    shared = {"a red circle": 7, "a blue square": 8, "a green triangle": 9}
    ids = {prompt: _submit(http, prompt, seed) for prompt, seed in list(shared.items())[:1]}
    other = _submit(http, "a yellow star", 10, steps=5)
    ids.update({prompt: _submit(http, prompt, seed) for prompt, seed in list(shared.items())[1:]})
    assert http.delete(f"/v1/jobs/{blocker}").status_code == 202
    batched = {prompt: _finished(http, job_id) for prompt, job_id in ids.items()}
    alone = _finished(http, other)
    assert all(s["status"] == "succeeded" and s["batch"] == MAX_BATCH for s in batched.values())
    assert alone["status"] == "succeeded" and alone["batch"] == 1
    # the same requests one at a time (nothing else waiting: each is its own call, asyncgen generate's bytes)
    for prompt, seed in shared.items():
        single = http.post("/v1/images", json={"prompt": prompt, "seed": seed, "steps": 4,
                                               "response_format": "b64_json"}).json()
        assert single["batch"] == 1
        # A batch changes only the order of the float32 sums inside the denoiser's kernels (rounding, ~1e-7
        # relative), never which prompt or seed an image gets: up to 2 of 255 levels, where a mixed-up prompt or
        # seed differs by far more (the miniature's images of different prompts differ by 100+ levels).
        assert np.abs(_pixels(batched[prompt]) - _pixels(single)).max() <= 2, prompt
    red, blue = _pixels(batched["a red circle"]), _pixels(batched["a blue square"])
    assert np.abs(red - blue).max() > 50  # the bound above separates the batch's images from one another


def test_a_batched_call_stops_only_when_every_job_in_it_is_cancelled(http):
    _idle(http)
    blocker = _submit(http, "a long request that holds the ranks", 1, steps=LONG)
    _step_at_least(http, blocker, 1)
    first, second = _submit(http, "a red circle", 3, steps=LONG), _submit(http, "a blue square", 4, steps=LONG)
    http.delete(f"/v1/jobs/{blocker}")
    at_cancel = _step_at_least(http, first, 2)["step"]
    assert _summary(http, second)["batch"] == 2
    http.delete(f"/v1/jobs/{first}")
    _step_at_least(http, second, at_cancel + 3)  # the call goes on for the job still wanted
    assert _summary(http, first)["status"] == "running"  # the cancelled one ends with its call
    http.delete(f"/v1/jobs/{second}")
    ended = [_finished(http, job_id) for job_id in (first, second)]
    assert [s["status"] for s in ended] == ["cancelled", "cancelled"]
    assert all(s["step"] < LONG for s in ended)  # stopped at a step boundary, not run to the end
    assert ended[0]["error"] == ended[1]["error"] == "cancelled by the client"
    _idle(http)


def test_sigterm_with_no_grace_cancels_the_running_request_at_the_next_step_and_exits_0(server, http):
    _idle(http)
    answers = {}

    def post(name, body):  # clients that wait for their request's end
        with server.client() as own:
            answers[name] = own.post("/v1/images", json=body)

    running = threading.Thread(target=post, args=("running", {"prompt": "a red circle", "seed": 5, "steps": LONG}))
    running.start()
    job_id = wait_until(lambda: http.get("/healthz").json()["running"], 120, "the request to run")
    _step_at_least(http, job_id, 1)
    queued = threading.Thread(target=post, args=("queued", {"prompt": "a blue square", "seed": 6, "steps": 2}))
    queued.start()
    wait_until(lambda: http.get("/healthz").json()["queued"] == 1, 120, "a request to wait")
    pids = [server.proc.pid, *server.pids]
    server.proc.send_signal(signal.SIGTERM)
    for thread in (running, queued):
        thread.join(timeout=120)
        assert not thread.is_alive()
    assert answers["queued"].status_code == 503
    cancelled = answers["running"]
    assert cancelled.status_code == 409, cancelled.text
    assert cancelled.json()["error"] == "cancelled: the server is shutting down (after 0 s' grace)"
    assert cancelled.json()["step"] < LONG
    assert server.proc.wait(timeout=120) == 0, "".join(server.output)
    wait_until(lambda: not any(alive(pid) for pid in pids), 60, "every rank to be gone")
