"""``asyncgen serve`` when things go wrong: a rank killed mid-request, SIGTERM with requests waiting.

One server (two CPU ranks, one restart allowed) for the module: the first test kills a rank and
sees the group started again; the second drains it with SIGTERM. Every wait has a timeout;
orphans are looked for through /proc.
"""

import threading

import pytest

pytest.importorskip("fastapi", reason="asyncgen serve needs the serve extra: pip install 'asyncgen[serve]'")
pytest.importorskip("uvicorn", reason="asyncgen serve needs the serve extra: pip install 'asyncgen[serve]'")
pytest.importorskip("httpx", reason="the serve tests talk HTTP through httpx (the test extra)")

import os  # noqa: E402
import signal  # noqa: E402

from serve_process import Server, alive, wait_until  # noqa: E402

pytestmark = pytest.mark.distributed

PROMPT = "a small green square on a yellow background"
LONG = 1000


@pytest.fixture(scope="module")
def server():
    server = Server("--devices", "2", "--restarts", "1", "--max-steps", str(LONG), "--drain-grace", "600")
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()


def _post_in_thread(server, body, into: list):
    def post():
        with server.client() as client:
            into.append(client.post("/v1/images", json=body))

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def _running_job(client):
    """The running job's summary once it has done a step on the ranks."""
    def started():
        job_id = client.get("/healthz").json()["running"]
        summary = client.get(f"/v1/jobs/{job_id}").json() if job_id else {}
        return summary if summary.get("step", 0) >= 1 else None

    return wait_until(started, 120, "a job to run a step")


def test_killing_a_rank_mid_request_fails_it_clearly_and_the_group_restarts(server):
    with server.client() as client:
        before = client.post("/v1/images", json={"prompt": PROMPT, "seed": 1, "steps": 3})
        assert before.status_code == 200
        old = list(server.pids)
        answers = []
        waiting = _post_in_thread(server, {"prompt": PROMPT, "seed": 2, "steps": LONG}, answers)
        _running_job(client)
        os.kill(old[1], signal.SIGKILL)
        waiting.join(timeout=120)
        assert not waiting.is_alive()
    failed = answers[0]
    assert failed.status_code == 503 and failed.headers["retry-after"]
    assert failed.json()["status"] == "failed"
    assert failed.json()["error"].startswith("the ranks failed during this request")
    server.url, server.pids = server.wait_ready()  # started again, on the same port
    assert "worker 1 was killed by SIGKILL; starting the ranks again" in "".join(server.output)
    assert not any(alive(pid) for pid in old)  # the old group is gone, none left behind
    with server.client() as client:
        again = client.post("/v1/images", json={"prompt": PROMPT, "seed": 1, "steps": 3})
    assert again.status_code == 200 and again.content == before.content


def test_sigterm_drains_the_queue_and_exits_0(server):
    with server.client() as client:
        running, queued = [], []
        threads = [_post_in_thread(server, {"prompt": PROMPT, "seed": 3, "steps": 30}, running)]
        _running_job(client)
        threads += [_post_in_thread(server, {"prompt": PROMPT, "seed": s, "steps": 2}, queued) for s in (4, 5)]
        wait_until(lambda: client.get("/healthz").json()["queued"] == 2, 120, "two requests to wait")
    pids = [server.proc.pid, *server.pids]
    server.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert running[0].status_code == 200  # the running request finishes within the grace period
    assert [r.status_code for r in queued] == [503, 503]  # the waiting ones are turned away
    assert all(r.json()["detail"] == "the server is shutting down" for r in queued)
    assert server.proc.wait(timeout=300) == 0, "".join(server.output)
    wait_until(lambda: not any(alive(pid) for pid in pids), 60, "every rank to be gone")
