"""The queue of ``asyncgen serve``: jobs waiting, the one running, the finished ones kept for a while.

Threads meet here: the HTTP server's event loop adds, cancels and reads jobs; rank 0's main
thread takes them one at a time and reports their progress. Everything is under one lock,
and nothing here blocks on the ranks.
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
    image: int = 0  # which image is being made (0-based)
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
               "step": self.step, "steps": self.steps, "seed": self.params["seed"],
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


class JobBoard:
    """The bounded queue (at most ``max_queue`` jobs waiting), the running job, and recent finished ones."""

    def __init__(self, max_queue: int, metrics):
        self.max_queue, self.metrics = max_queue, metrics
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}
        self._finished: collections.deque[str] = collections.deque()
        self.running: Job | None = None
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
        """A waiting job ends now; the running one stops at its next step boundary (on every rank)."""
        with self._lock:
            if job.status == QUEUED:
                self._waiting.remove(job)
                self.metrics.queue_length = len(self._waiting)
                self._finish(job, CANCELLED, error=why, http_status=409)
            elif job.status == RUNNING and job.cancel_requested is None:
                job.cancel_requested = why
                job.version += 1

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {"queued": len(self._waiting), "running": self.running.id if self.running else None}

    # ---------------------------------------------------------------- rank 0's side

    def next(self, timeout: float) -> Job | None:
        """The next job (now running), or None after ``timeout`` seconds or once closed with nothing waiting."""
        with self._lock:
            self._lock.wait_for(lambda: self._waiting or self.closed, timeout)
            if not self._waiting:
                return None
            job = self._waiting.popleft()
            self.metrics.queue_length = len(self._waiting)
            job.status, job.started, self.running = RUNNING, time.monotonic(), job
            job.version += 1
            return job

    def progress(self, job: Job, image: int, step: int, steps: int, seconds: float) -> None:
        with self._lock:
            job.image, job.step, job.steps = image, step, steps
            job.step_seconds.append(seconds)
            job.version += 1
        self.metrics.observe_step(seconds)

    def complete(self, job: Job, images: list[bytes] | None, error: str | None = None, http_status: int = 500) -> None:
        """The running job is over: its images, or why it was cancelled (``cancel_requested``) or failed."""
        with self._lock:
            self.running = None
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
            return self.running is None and not self._waiting

    def _finish(self, job: Job, status: str, error: str | None = None, http_status: int | None = None) -> None:
        job.status, job.error, job.http_status, job.finished = status, error, http_status, time.monotonic()
        job.version += 1
        self.metrics.count_outcome(status)
        job.done.set()
        self._finished.append(job.id)
        while len(self._finished) > KEEP_FINISHED:
            self._jobs.pop(self._finished.popleft(), None)
