"""Drop-in wrappers around diffusers pipelines, and the hooks they attach."""

from .asg_attach import ASGAttachment, ASGConfig, apply_asg
from .asg_pipeline import ASGPipeline
from .asyncdiff import AsyncDiffPipeline
from .attach import AsyncDiffAttachment, AsyncDiffConfig, apply_asyncdiff

__all__ = ["ASGAttachment", "ASGConfig", "ASGPipeline", "AsyncDiffAttachment", "AsyncDiffConfig", "AsyncDiffPipeline", "apply_asg", "apply_asyncdiff"]
