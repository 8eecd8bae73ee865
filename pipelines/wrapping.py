"""What both wrappers (AsyncDiff, ASG) share to behave like the diffusers pipeline they wrap."""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import weakref
from typing import Any


def check_not_wrapped(pipeline, wrapper_name: str, every_call: bool = False) -> None:
    """Refuse a wrapper or a pipeline wrapped in place with a message that says so.

    A denoiser shared with a ``from_pipe`` sibling carries that sibling's scoped hook, which
    works only inside the sibling's calls; ``every_call``: the new wrapper's hook would work
    in every call, the sibling's included, so that is refused too.
    """
    from asyncgen.models import DENOISER_COMPONENTS, EXPERT_COMPONENTS
    from asyncgen.runtime.asg_hook import ASGHook
    from asyncgen.runtime.asyncdiff_hook import asyncdiff_hooks
    from asyncgen.runtime.scoped_hook import hooks_of

    if isinstance(pipeline, PipelineWrapper):
        raise TypeError(f"{wrapper_name} was given an {type(pipeline).__name__}, which is already a wrapper; wrap the "
                        f"diffusers pipeline itself (its .pipeline)")
    for name in DENOISER_COMPONENTS + EXPERT_COMPONENTS:
        module = getattr(pipeline, name, None)
        for strategy, hooks in (("AsyncDiff", asyncdiff_hooks(module)), ("ASG", hooks_of(module, ASGHook))):
            if any(not hook.scoped for hook in hooks) or (every_call and hooks):
                raise TypeError(f"this {type(pipeline).__name__} is already wrapped by {strategy}Pipeline (or "
                                f"apply_{strategy.lower()}: pipe.{name} runs {strategy} through a hook); "
                                f"{wrapper_name} needs the original pipeline, so wrap a fresh one")


def check_flag(value, name: str) -> None:
    """Refuse a ``True``/``False`` option given anything else (``"no"`` would count as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be True or False")


def check_count(value, name: str, low: int = 1, optional: bool = False) -> None:
    """Refuse a whole-number option that is not an integer ``>= low`` (``True`` is not a number here)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be {'None or ' if optional else ''}an integer >= {low}")


def check_number(value, name: str, accepted: str, low: float | None = None, high: float | None = None) -> None:
    """Refuse a real-number option that is not a finite number (in ``[low, high]`` when given)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}={value!r}: must be {accepted}")


def check_device(device) -> None:
    """Refuse a ``device`` torch cannot parse, in one line."""
    import torch

    if device is None or isinstance(device, torch.device):
        return
    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device={device!r}: not a device; give 'cpu', 'cuda', 'cuda:1' (this rank's GPU) or a "
                         "torch.device") from None


# one lock per denoiser module: wrappers over the same components (from_pipe siblings) share the scheduler and
# the denoiser, so their calls must not interleave either
_CALL_LOCKS: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_CALL_LOCKS_GUARD = threading.Lock()


def call_lock_of(pipeline) -> threading.Lock:
    """The lock every wrapper over ``pipeline``'s denoiser holds for a call (a fresh one for a pipeline without)."""
    from asyncgen.models import DENOISER_COMPONENTS

    key = next((getattr(pipeline, n) for n in DENOISER_COMPONENTS if getattr(pipeline, n, None) is not None), None)
    if key is None:
        return threading.Lock()
    with _CALL_LOCKS_GUARD:
        return _CALL_LOCKS.setdefault(key, threading.Lock())


def one_call_at_a_time(method):
    """Decorate a wrapper's ``__call__``: the whole call holds the wrapper's call lock (:class:`PipelineWrapper`)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._one_call():
            return method(self, *args, **kwargs)

    return locked


def sibling_pipeline(pipeline):
    """A new pipeline object over the same components, as diffusers' ``from_pipe`` makes one.

    Replacing its denoiser leaves ``pipeline`` untouched; the weights themselves are shared.
    """
    return type(pipeline).from_pipe(pipeline)


class PipelineWrapper:
    """Delegates to ``self.pipeline``; methods that return the pipeline (``to``, ``enable_*``, ...) return the wrapper,
    so ``pipe = Wrapper(...).to(device)`` keeps the wrapper (and its shared randomness and error handling).

    One call at a time: a wrapper's ``__call__`` holds a lock for the whole call, so calls from
    several threads run one after the other, each with its own result (the denoiser's hook,
    the scheduler and the schedule's state belong to the call that runs). Wrappers over the
    same components (``from_pipe`` siblings) hold the same lock. A call made from
    inside a call on the same thread (from a step callback) is refused. A wrapper cannot be
    pickled: see :meth:`__reduce_ex__`.
    """

    pipeline: Any
    #: what ties a wrapper to its process, for the message that refuses to pickle it
    _bound_by = "its process group and rank"

    @contextlib.contextmanager
    def _one_call(self):
        """Hold this wrapper's call lock for the duration of one ``__call__`` (see the class docstring)."""
        state = self.__dict__  # past __getattr__: these are the wrapper's own, never the pipeline's
        lock = state.get("_call_lock") or state.setdefault("_call_lock", call_lock_of(state.get("pipeline")))
        me = threading.get_ident()
        if state.get("_call_owner") == me:
            raise RuntimeError(f"{type(self).__name__} was called from inside one of its own calls (a step callback?); "
                               "a wrapper runs one call at a time, so the inner call could never start")
        with lock:
            state["_call_owner"] = me
            try:
                yield
            finally:
                state["_call_owner"] = None

    def __reduce_ex__(self, protocol):
        raise TypeError(f"{type(self).__name__} cannot be pickled: it is bound to this process ({self._bound_by}, and "
                        "a lock that keeps its calls one at a time); build "
                        f"it in the process that needs it ({type(self).__name__}.from_pretrained(...) there), or "
                        "pickle the diffusers pipeline before wrapping it")

    def __copy__(self):
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        # a shallow copy shares the pipeline and its hooks, so it shares their lock too
        new.__dict__["_call_lock"] = self.__dict__.setdefault("_call_lock", call_lock_of(self.__dict__.get("pipeline")))
        return new

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name not in ("_call_lock", "_call_owner"):  # a deep copy is independent: a lock of its own
                new.__dict__[name] = copy.deepcopy(value, memo)
        return new

    def __getattr__(self, name: str):
        if name == "pipeline":
            raise AttributeError(name)
        value = getattr(self.pipeline, name)
        if callable(value) and getattr(value, "__self__", None) is self.pipeline:
            @functools.wraps(value)
            def returns_wrapper(*args, **kwargs):
                result = value(*args, **kwargs)
                return self if result is self.pipeline else result

            return returns_wrapper
        return value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.pipeline).__name__})"
