"""What both wrappers (AsyncDiff, ASG) share to behave like the diffusers pipeline they wrap."""

from __future__ import annotations

import functools
from typing import Any


def check_not_wrapped(pipeline, wrapper_name: str) -> None:
    """Refuse a wrapper or an already wrapped pipeline with a message that says so."""
    from asyncgen.runtime.staged_denoiser import StagedDenoiser

    from asyncgen.models import DENOISER_COMPONENTS, EXPERT_COMPONENTS

    if isinstance(pipeline, PipelineWrapper):
        raise TypeError(f"{wrapper_name} was given an {type(pipeline).__name__}, which is already a wrapper; wrap the "
                        f"diffusers pipeline itself (its .pipeline)")
    if any(isinstance(getattr(pipeline, name, None), StagedDenoiser) for name in DENOISER_COMPONENTS + EXPERT_COMPONENTS):
        raise TypeError(f"this {type(pipeline).__name__} is already wrapped by AsyncDiffPipeline (its denoiser is a "
                        f"StagedDenoiser); {wrapper_name} needs the original pipeline, so wrap a fresh one")


def sibling_pipeline(pipeline):
    """A new pipeline object over the same components, as diffusers' ``from_pipe`` makes one.

    Replacing its denoiser leaves ``pipeline`` untouched; the weights themselves are shared.
    """
    return type(pipeline).from_pipe(pipeline)


class PipelineWrapper:
    """Delegates to ``self.pipeline``; methods that return the pipeline (``to``, ``enable_*``, ...) return the wrapper,
    so ``pipe = Wrapper(...).to(device)`` keeps the wrapper (and its shared randomness and error handling)."""

    pipeline: Any

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
