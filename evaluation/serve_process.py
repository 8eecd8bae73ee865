"""``asyncgen serve`` as a child process: started on 127.0.0.1 with a free port, read back from its
"ready on" line, stopped with SIGTERM (and killed only if that fails). The serve benchmark and the
serve tests start their servers with it."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

READY = re.compile(r"ready on (http://127\.0\.0\.1:\d+) .*pids ([\d ]+)\)")
START_TIMEOUT = 400  # two ranks import torch and diffusers and load the model, on a loaded two-core machine


class Server:
    def __init__(self, *options: str, api_key: str | None = None, env: dict | None = None,
                 launcher: tuple[str, ...] = ()):
        """``asyncgen serve --port 0 --oversubscribe OPTIONS``; ``launcher`` goes before it (e.g. torchrun's
        ``-m torch.distributed.run --nproc-per-node 2``: then ``python -m torch.distributed.run ... -m
        asyncgen.cli serve ...``)."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        env.pop("ASYNCGEN_START_METHOD", None)  # the users' path: spawned ranks
        if api_key is not None:
            env["ASYNCGEN_API_KEY"] = api_key
        self.api_key = api_key
        self.proc = subprocess.Popen([sys.executable, *launcher, "-m", "asyncgen.cli", "serve", "--port", "0",
                                      "--oversubscribe", *options], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url, self.pids = self.wait_ready()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put("")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> tuple[str, list[int]]:
        """The URL and the ranks' pids from the next "ready on" line."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no 'ready' line within {timeout} s:\n{''.join(self.output)}") from None
            if line == "":
                raise AssertionError(f"the server exited ({self.proc.wait()}):\n{''.join(self.output)}")
            found = READY.search(line)
            if found:
                return found.group(1), [int(p) for p in found.group(2).split()]

    def client(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kwargs.pop("timeout", 120), **kwargs)

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM, then the exit code (killed, and the test failed, if it does not exit in ``timeout`` s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the server did not exit within {timeout} s of SIGTERM:\n{''.join(self.output)}")

    def kill(self) -> None:
        """Last resort (a failed test): the server and its ranks."""
        for pid in [self.proc.pid, *self.pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie, exited but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition()`` until it returns something true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
