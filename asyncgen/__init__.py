"""asyncgen: asynchronous multi-device denoising for diffusers pipelines.

``from asyncgen import AsyncDiffPipeline, ASGPipeline`` gives the drop-in wrappers
(``asyncgen.pipelines``), imported on first use so that the engine modules load
without them.
"""

__version__ = "0.1.0"

_WRAPPERS = ("AsyncDiffPipeline", "ASGPipeline")


def __getattr__(name: str):
    if name in _WRAPPERS:
        import importlib

        return getattr(importlib.import_module("asyncgen.pipelines"), name)
    raise AttributeError(f"module 'asyncgen' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_WRAPPERS])
