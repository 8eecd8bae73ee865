"""Loading a local state dict safely: safetensors by default, pickle only when asked."""

from __future__ import annotations

import os
from pathlib import Path

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def load_state_dict(path: str | os.PathLike, allow_pickle: bool = False, what: str = "checkpoint") -> dict:
    """The tensors in ``path``: a ``.safetensors`` file, or a pickle checkpoint when ``allow_pickle``.

    Pickle files are read with ``torch.load(weights_only=True)``; a ``{"state_dict": ...}``
    wrapper is unwrapped.
    """
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if not allow_pickle:
        raise ValueError(f"{path} is not a .safetensors file; pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) "
                         "load only with allow_pickle=True")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state
