"""Drop-in wrappers around diffusers pipelines."""

from .asg_pipeline import ASGPipeline
from .asyncdiff import AsyncDiffPipeline

__all__ = ["ASGPipeline", "AsyncDiffPipeline"]
