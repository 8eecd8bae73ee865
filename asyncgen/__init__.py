"""asyncgen: asynchronous multi-device denoising for diffusers pipelines."""

__version__ = "0.1.0"
