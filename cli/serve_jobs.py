"""The queue of ``asyncgen serve``: jobs waiting, the ones running, the finished ones kept for a while.

Threads meet here: the HTTP server's event loop adds, cancels and reads jobs; rank 0's main
thread takes them, one at a time or (``--max-batch``) several that can share pipeline calls,
and reports their progress. Everything is under one lock, and nothing here blocks on the ranks.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# finished jobs kept for GET /v1/jobs/{id} (their images included); older ones are forgotten, so memory stays bounded
KEEP_FINISHED = 64

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, REJECTED = "queued", "running", "succeeded", "failed", "cancelled", \
    "rejected"
FINISHED = (SUCCEEDED, FAILED, CANCELLED, REJECTED)


@dataclass
class Job:
    """One request: its validated settings, where it stands, and its result."""

    params: dict
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = QUEUED
    step: int = 0  # steps done of the image being made
    steps: int = 0  # steps of each image (the scheduler's count, known once it runs)
    image: int = 0  # which image is being made (0-based; with --max-batch, the first of this job's in the call)
    batch: int = 1  # images in the pipeline call this job's images are made in (--max-batch; 1 = one at a time)
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    cancel_requested: str | None = None  # why: "cancelled by the client", "client disconnected", "shutting down"
    error: str | None = None
    http_status: int | None = None  # for a failed or rejected job: the status its waiting client gets
    images: list[bytes] = field(default_factory=list)  # PNG bytes, one per image
    step_seconds: list[float] = field(default_factory=list)
    version: int = 0  # bumped on every change: the progress stream sends an event when it moves
    done: threading.Event = field(default_factory=threading.Event)

    def summary(self) -> dict[str, Any]:
        """What GET /v1/jobs/{id} and the progress stream show (no image bytes)."""
        now = time.monotonic()
        out = {"id": self.id, "status": self.status, "image": self.image, "images": self.params["n"],
               "step": self.step, "steps": self.steps, "seed": self.params["seed"], "batch": self.batch,
               "queued_seconds": round((self.started or self.finished or now) - self.created, 4)}
        if self.started is not None:
            out["run_seconds"] = round((self.finished or now) - self.started, 4)
        if self.step_seconds:
            out["mean_step_seconds"] = round(sum(self.step_seconds) / len(self.step_seconds), 5)
        if self.error:
            out["error"] = self.error
        return out


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class Closed(Exception):
    """The server is shutting down (or restarting its ranks) and takes no new jobs."""


def batch_key(params: dict) -> tuple:
    """What jobs must share to be made in one pipeline call: everything but the prompt, the seed and the count."""
    return params["negative_prompt"], params["height"], params["width"], params["steps"], params["guidance"]


class JobBoard:
    """The bounded queue (at most ``max_queue`` jobs waiting), the running jobs, and recent finished ones.

    ``max_batch`` images may share a pipeline call: the job at the head of the queue runs with the
    waiting jobs behind it that have its :func:`batch_key`, as many as fit (a job is never split
    between batches; one asking more images than ``max_batch`` runs alone, in several calls).
    """

    def __init__(self, max_queue: int, metrics, max_batch: int = 1):
        self.max_queue, self.metrics, self.max_batch = max_queue, metrics, max_batch
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}
        self._finished: collections.deque[str] = collections.deque()
        self.running: list[Job] = []
        self.closed: str | None = None  # why new jobs are refused (503), once closing
        self.draining_since: float | None = None
        self._recent_run_seconds: collections.deque[float] = collections.deque(maxlen=16)

    # ---------------------------------------------------------------- HTTP side

    def submit(self, params: dict) -> Job:
        with self._lock:
            if self.closed:
                raise Closed(self.closed)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(self._retry_after())
            job = Job(params)
            self._jobs[job.id] = job
            self._waiting.append(job)
            self.metrics.queue_length = len(self._waiting)
            self._lock.notify_all()
            return job

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: one job's recent mean run time (at least 1)."""
        mean = sum(self._recent_run_seconds) / len(self._recent_run_seconds) if self._recent_run_seconds else 1.0
        return max(1, round(mean + 0.5))

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job: Job, why: str) -> None:
        """A waiting job ends now; a running one stops at its next step boundary (on every rank). With --max-batch,
        the pipeline call stops once every job in it is cancelled; until then this job's images are made and
        dropped."""
        with self._lock:
            if job.status == QUEUED:
                self._waiting.remove(job)
                self.metrics.queue_length = len(self._waiting)
                self._finish(job, CANCELLED, error=why, http_status=409)
            elif job.status == RUNNING and job.cancel_requested is None:
                job.cancel_requested = why
                job.version += 1

    def counts(self) -> dict[str, Any]:
        """Jobs waiting; the running job's id (the oldest one, with --max-batch) or None; every running job's id."""
        with self._lock:
            return {"queued": len(self._waiting), "running": self.running[0].id if self.running else None,
                    "running_jobs": [job.id for job in self.running]}

    # ---------------------------------------------------------------- rank 0's side

    def next(self, timeout: float) -> list[Job]:
        """The next batch of jobs (now running; one job unless ``max_batch`` > 1), or [] after ``timeout`` seconds
        or once closed with nothing waiting."""
        with self._lock:
            self._lock.wait_for(lambda: self._waiting or self.closed, timeout)
            if not self._waiting:
                return []
            head = self._waiting.popleft()
            batch, room, key = [head], self.max_batch - head.params["n"], batch_key(head.params)
            for job in list(self._waiting):
                if room <= 0:
                    break
                if job.params["n"] <= room and batch_key(job.params) == key:
                    self._waiting.remove(job)
                    batch.append(job)
                    room -= job.params["n"]
            self.metrics.queue_length = len(self._waiting)
            now, images = time.monotonic(), sum(job.params["n"] for job in batch)
            for job in batch:
                job.status, job.started, job.batch = RUNNING, now, min(images, self.max_batch)
                job.version += 1
            self.running = list(batch)  # a copy: complete() removes from it while the caller walks the batch
            return batch

    def progress(self, making: list[tuple[Job, int]], step: int, steps: int, seconds: float) -> None:
        """One step of a pipeline call done; ``making`` pairs each job in it with its first image in the call."""
        with self._lock:
            for job, image in making:
                job.image, job.step, job.steps = image, step, steps
                job.step_seconds.append(seconds)
                job.version += 1
        self.metrics.observe_step(seconds)  # once a step, however many jobs share it

    def complete(self, job: Job, images: list[bytes] | None, error: str | None = None, http_status: int = 500) -> None:
        """A running job is over: its images, or why it was cancelled (``cancel_requested``) or failed."""
        with self._lock:
            if job in self.running:
                self.running.remove(job)
            if error is not None:
                self._finish(job, FAILED, error=error, http_status=http_status)
            elif job.cancel_requested is not None:
                self._finish(job, CANCELLED, error=job.cancel_requested, http_status=409)
            else:
                job.images = images or []
                self._recent_run_seconds.append(time.monotonic() - job.started)
                self._finish(job, SUCCEEDED)
            self._lock.notify_all()

    def close(self, why: str, http_status: int = 503) -> None:
        """Take no new jobs; the waiting ones end with ``http_status`` and ``why``."""
        with self._lock:
            if self.closed is None:
                self.closed = why
            while self._waiting:
                self._finish(self._waiting.popleft(), REJECTED, error=why, http_status=http_status)
            self.metrics.queue_length = 0
            self._lock.notify_all()

    def begin_drain(self) -> None:
        """SIGINT/SIGTERM: waiting jobs get 503 now; the running one may finish within the grace period."""
        with self._lock:
            if self.draining_since is None:
                self.draining_since = time.monotonic()
        self.close("the server is shutting down")

    def idle(self) -> bool:
        with self._lock:
            return not self.running and not self._waiting

    def _finish(self, job: Job, status: str, error: str | None = None, http_status: int | None = None) -> None:
        job.status, job.error, job.http_status, job.finished = status, error, http_status, time.monotonic()
        job.version += 1
        self.metrics.count_outcome(status)
        job.done.set()
        self._finished.append(job.id)
        while len(self._finished) > KEEP_FINISHED:
            self._jobs.pop(self._finished.popleft(), None)
