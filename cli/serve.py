"""``asyncgen serve``: the pipeline, split over the devices, stays loaded and answers HTTP requests.

The ranks start once, through the launcher ``asyncgen generate`` uses (or ``torchrun``, with rank 0
serving), and load their share of the pipeline (stage-only loading). Rank 0 serves the API
(:mod:`asyncgen.cli.serve_http`) and runs one request at a time with the others (or, with
``--max-batch``, the waiting requests that can share pipeline calls)
(:mod:`asyncgen.cli.serve_leader`, :mod:`asyncgen.cli.serve_ranks`). The options are checked as
``asyncgen generate`` checks them, by the same code, before any worker starts.

SIGINT or SIGTERM drains: waiting requests get 503, the running one finishes (or is cancelled
after ``--drain-grace`` seconds), every rank stops, exit code 0. A rank that fails ends its request
with an error; the group is then started again (``--restarts`` times) or the command exits with
the failure.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time

from .errors import UsageError
from .launcher import STOP_SIGNALS, Interrupted, WorkerFailed, launched_by_torchrun, run_on_devices
from .options import DTYPES, add_asyncdiff_arguments, add_model_arguments, non_negative_int, positive_int

SUMMARY = "serve images over HTTP, the pipeline split over the devices and kept loaded between requests"

DEFAULT_PORT = 8000
API_KEY_VARIABLE = "ASYNCGEN_API_KEY"


def _port(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text}: ports run from 0 (any free one) to 65535")
    return value


def _seconds(text: str) -> float:
    from .options import finite_float

    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: need a number of seconds of at least 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, "miniature, the built-in shapes model (a UNet), 32x32")
    parser.add_argument("--devices", type=positive_int, default=None, help="worker processes (ranks) to start, one "
                        "CPU core or one GPU each; under torchrun leave it out (default: 1)")
    parser.add_argument("--stages", type=positive_int, default=None, help="AsyncDiff stages (default: as many as the "
                        "devices allow, as in asyncgen generate)")
    parser.add_argument("--stride", type=positive_int, default=1, help="AsyncDiff stride (default: %(default)s)")
    parser.add_argument("--warmup", type=non_negative_int, default=None, help="exact warm-up steps (default: 5%% of "
                        "the steps, at least 1)")
    parser.add_argument("--cfg-parallel", action="store_true", help="split the classifier-free-guidance batch over "
                        "two groups of devices (default: off)")
    parser.add_argument("--components", choices=("planned", "replicated"), default="planned", help="where the text "
                        "encoders and the VAE run, as in asyncgen generate (default: %(default)s)")
    add_asyncdiff_arguments(parser)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="auto = float16 on cuda, float32 on cpu (default: %(default)s)")
    parser.add_argument("--attention", choices=["sdpa", "xformers"], default=None, help="attention kernels "
                        "(default: the pipeline's own)")
    parser.add_argument("--cache", choices=["fbcache", "taylorseer"], default=None, help="a diffusers step cache "
                        "under the stages, as in asyncgen generate --cache (default: none)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each rank's part of the denoiser "
                        "(default: off)")
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 listens on every "
                      "interface and must be asked for (default: %(default)s)")
    http.add_argument("--port", type=_port, default=DEFAULT_PORT, help="port; 0 takes a free one, printed when "
                      "ready (default: %(default)s)")
    http.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but "
                      f"/healthz (default: ${API_KEY_VARIABLE} when set, else none; the variable keeps the key out "
                      "of the process list)")
    http.add_argument("--max-queue", type=positive_int, default=64, help="requests that may wait; more get 429 "
                      "with Retry-After (default: %(default)s)")
    http.add_argument("--max-steps", type=positive_int, default=200, help="most steps one request may ask for "
                      "(default: %(default)s)")
    http.add_argument("--max-pixels", type=positive_int, default=None, help="most pixels (height x width) one "
                      "request may ask for (default: 16 times the model's native image)")
    http.add_argument("--max-images", type=positive_int, default=4, help="most images (n) one request may ask for "
                      "(default: %(default)s)")
    http.add_argument("--max-batch", type=positive_int, default=1, help="images that may share one pipeline call: "
                      "waiting requests with the same size, steps, guidance and negative prompt run together, up to "
                      "this many images (default: %(default)s, one image a call, the bytes asyncgen generate "
                      "writes; a batched image can differ from those by rounding, and a batch needs that many "
                      "images' activation memory)")
    http.add_argument("--max-prompt-chars", type=positive_int, default=4000, help="longest prompt or negative "
                      "prompt, in characters (default: %(default)s)")
    http.add_argument("--max-body-bytes", type=positive_int, default=65536, help="largest request body; larger "
                      "ones get 413 (default: %(default)s)")
    http.add_argument("--drain-grace", type=_seconds, default=30.0, help="on SIGINT/SIGTERM, seconds the running "
                      "request may take to finish before it is cancelled (default: %(default)s)")
    http.add_argument("--restarts", type=non_negative_int, default=1, help="times the ranks are started again "
                      "after one fails while serving; after that the command exits (default: %(default)s)")


def _job(args: argparse.Namespace, world: int):
    """The model and layout, checked by ``asyncgen generate``'s own checks (make_job), with no prompt or file."""
    from .generate import make_job

    given = dict(vars(args))
    given.update(prompt="", prompts=None, output=os.devnull, height=None, width=None, steps=None, guidance=None,
                 seed=0, negative_prompt=None, frames=None, fps=None, highres=False, structure_fraction=0.7,
                 structure_guidance=1.0, asg_mode="async", parallel=None)
    job = make_job(argparse.Namespace(**given), world)
    if job.video:
        raise UsageError(f"--model {args.model}: a video pipeline; asyncgen serve makes images")
    return job


def _settings(args: argparse.Namespace, job, world: int):
    import multiprocessing as mp

    from .generate import LARGE_FACTOR, describe_model
    from .serve_ranks import ServeSettings
    from .serve_requests import Limits

    max_pixels = args.max_pixels
    if max_pixels is None:
        facts = describe_model(job.model, job.allow_pickle)
        max_pixels = LARGE_FACTOR * facts.native_height * facts.native_width
    limits = Limits(max_steps=args.max_steps, max_pixels=max_pixels, max_images=args.max_images,
                    max_prompt_chars=args.max_prompt_chars)
    ctx = mp.get_context("spawn")  # its shared memory pickles into workers of either start method
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_VARIABLE) or None
    return ServeSettings(job=job, host=args.host, port=args.port, limits=limits, max_queue=args.max_queue,
                         max_body_bytes=args.max_body_bytes, drain_grace=args.drain_grace, api_key=api_key,
                         stop=ctx.RawValue("i", 0), ready=ctx.RawValue("i", 0), bound_port=ctx.RawValue("i", 0),
                         devices=world, max_batch=args.max_batch)


def _check_extra() -> None:
    """The HTTP stack is an extra: say how to install it before anything is loaded."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"asyncgen serve needs FastAPI and uvicorn ({exc}): pip install 'asyncgen[serve]'") from None


def run(args: argparse.Namespace) -> int:
    from .files import say
    from .serve_leader import listening_socket
    from .serve_ranks import serve_worker

    _check_extra()
    world = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else (args.devices or 1)
    job = _job(args, world)
    if args.port and not (launched_by_torchrun() and int(os.environ["RANK"]) != 0):
        listening_socket(args.host, args.port).close()  # a taken port is refused before minutes of loading
    settings = _settings(args, job, world)
    if world == 1 or launched_by_torchrun():  # this process is rank 0 (or one rank of torchrun's)
        run_on_devices(serve_worker, args.devices, settings, device_type=job.device, oversubscribe=args.oversubscribe)
        return 0
    restarts = args.restarts
    while True:
        settings.ready.value = 0
        try:
            _run_group(settings, args, world)
            return 0
        except WorkerFailed as exc:
            if settings.stop.value or not settings.ready.value or restarts == 0:
                if settings.ready.value:
                    say(f"asyncgen serve: a rank failed and no restart is left (--restarts {args.restarts})")
                raise
            restarts -= 1
            say(f"asyncgen serve: {exc.summary}; starting the ranks again ({restarts} restart"
                f"{'' if restarts == 1 else 's'} left)")
            settings.port = settings.bound_port.value  # --port 0: the same port as before


def _run_group(settings, args: argparse.Namespace, world: int) -> None:
    """Run the ranks in a thread while this (main) thread handles the stop signals.

    The first SIGINT/SIGTERM/SIGHUP asks rank 0 to drain; the ranks then have ``--drain-grace``
    seconds and a margin to stop on their own before they are killed. A second signal kills them now
    (the command then exits 128 + the signal's number, as for a process the signal ended).
    """
    import multiprocessing as mp

    from .files import say
    from .serve_ranks import serve_worker

    outcome: dict = {}
    received: list[float] = []

    def ranks():
        try:
            outcome["value"] = run_on_devices(serve_worker, world, settings, device_type=settings.job.device,
                                              oversubscribe=args.oversubscribe)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc

    def on_signal(signum, frame):
        received.append((time.monotonic(), signum))
        settings.stop.value = 1

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    thread = threading.Thread(target=ranks, name="asyncgen-serve-ranks")
    try:
        thread.start()
        killed = False
        while thread.is_alive():
            thread.join(0.1)
            # margin: rank 0 cancels at the next step after the grace, then stops the others and its HTTP server
            late = received and time.monotonic() > received[0][0] + settings.drain_grace + 30
            if not killed and (len(received) > 1 or late):
                killed = True
                say("asyncgen serve: stopping the ranks now")
                stopped = mp.active_children()
                for child in stopped:
                    child.kill()
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        if killed:  # a second signal, or the grace and its margin ran out: exit as the signal's status
            raise Interrupted(received[-1][1], len(stopped)) from outcome["error"]
        raise outcome["error"]
