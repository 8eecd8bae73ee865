"""Drop-in wrappers around diffusers pipelines."""

from .asyncdiff import AsyncDiffPipeline

__all__ = ["AsyncDiffPipeline"]
