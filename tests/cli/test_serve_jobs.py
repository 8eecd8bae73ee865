"""The serve queue's batching (``--max-batch``), without a server: which waiting jobs share pipeline calls."""

import pytest

pytest.importorskip("fastapi", reason="asyncgen serve needs the serve extra: pip install 'asyncgen[serve]'")

from asyncgen.cli.serve_jobs import RUNNING, SUCCEEDED, JobBoard  # noqa: E402
from asyncgen.cli.serve_metrics import Metrics  # noqa: E402
from asyncgen.cli.serve_ranks import plan_calls  # noqa: E402


def _params(prompt="p", seed=0, n=1, steps=4, negative=None, height=None):
    return {"prompt": prompt, "negative_prompt": negative, "height": height, "width": height, "steps": steps,
            "guidance": None, "seed": seed, "n": n}


def test_one_job_at_a_time_without_max_batch():
    board = JobBoard(8, Metrics())
    jobs = [board.submit(_params(seed=s)) for s in range(3)]
    assert board.next(0) == [jobs[0]] and jobs[0].status == RUNNING and jobs[0].batch == 1
    assert board.counts() == {"queued": 2, "running": jobs[0].id, "running_jobs": [jobs[0].id]}


def test_jobs_with_the_same_settings_share_a_batch_up_to_max_batch_images():
    board = JobBoard(8, Metrics(), max_batch=4)
    a = board.submit(_params("a", n=2))
    other_steps = board.submit(_params("b", steps=5))
    too_many = board.submit(_params("c", n=3))  # 2 + 3 > 4: waits for a later batch
    other_negative = board.submit(_params("d", negative="blurry"))
    other_size = board.submit(_params("e", height=64))
    e = board.submit(_params("f", n=2))
    batch = board.next(0)
    assert batch == [a, e] and a.batch == e.batch == 4
    assert board.counts()["running_jobs"] == [a.id, e.id]
    for job in batch:  # completing while walking the batch: every running job ends
        board.complete(job, [b"png"] * job.params["n"])
    assert a.status == e.status == SUCCEEDED and board.counts()["running"] is None
    assert board.next(0) == [other_steps]  # the head runs first, with whatever else fits
    board.complete(other_steps, [b"png"])
    assert board.next(0) == [too_many] and too_many.batch == 3
    board.complete(too_many, [b"png"] * 3)
    assert board.next(0) == [other_negative]
    board.complete(other_negative, [b"png"])
    assert board.next(0) == [other_size]


def test_a_job_asking_more_images_than_max_batch_runs_alone_in_several_calls():
    board = JobBoard(8, Metrics(), max_batch=2)
    big, small = board.submit(_params(n=3)), board.submit(_params())
    assert board.next(0) == [big] and big.batch == 2
    assert plan_calls([big.params], 2) == [[(0, 0), (0, 1)], [(0, 2)]]
    board.complete(big, [b"png"] * 3)
    assert board.next(0) == [small]


def test_calls_keep_the_batch_order():
    batch = [_params(n=2), _params(n=1), _params(n=1)]
    assert plan_calls(batch, 4) == [[(0, 0), (0, 1), (1, 0), (2, 0)]]
    assert plan_calls(batch, 1) == [[(0, 0)], [(0, 1)], [(1, 0)], [(2, 0)]]  # generate's one image a call


def test_a_cancelled_job_of_a_running_batch_ends_cancelled_even_with_images():
    board = JobBoard(8, Metrics(), max_batch=2)
    a, b = board.submit(_params("a")), board.submit(_params("b"))
    assert board.next(0) == [a, b]
    board.cancel(a, "cancelled by the client")
    assert a.status == RUNNING  # it ends with its call (the call goes on for b)
    board.complete(a, [b"png"])
    board.complete(b, [b"png"])
    assert (a.status, a.error, a.images) == ("cancelled", "cancelled by the client", [])
    assert b.status == SUCCEEDED and b.images == [b"png"]
