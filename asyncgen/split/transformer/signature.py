"""What a denoiser's ``forward`` signature says about its arguments: which is the timestep, which take lists.

Classes name the timestep differently (``timestep``; HiDream ``timesteps``; ZImage ``t``)
and some take per-sample lists of tensors (ZImage's latents and caption features, each
sample its own tensor). Everything that calls a split denoiser reads these from here,
so no caller assumes ``timestep=`` or a batch tensor.
"""

from __future__ import annotations

import inspect
import re
import typing

import torch

# the denoising step as diffusers' forwards spell it: timestep, timesteps, t
_TIMESTEP = re.compile(r"t(imesteps?)?")


def timestep_argument(forward) -> str:
    """The name of ``forward``'s timestep parameter (``"timestep"`` when none is recognisable)."""
    parameters = _parameters(forward)[1:]  # the first is the sample
    for parameter in parameters:
        if _TIMESTEP.fullmatch(parameter.name):
            return parameter.name
    return "timestep"


def is_list_of_tensors(parameter: inspect.Parameter) -> bool:
    """Whether ``parameter`` is annotated as a list (of tensors), like ZImage's ``x: list[torch.Tensor, ...]``."""
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return False
    if isinstance(annotation, str):  # postponed annotations: read the text
        return annotation.replace(" ", "").startswith(("list[", "List[")) and "Tensor" in annotation
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    options = [o for o in options if o is not type(None)]
    return bool(options) and all(typing.get_origin(o) is list for o in options) and any(
        _mentions_tensor(o) for o in options)


def _is_union(annotation) -> bool:
    import types

    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _mentions_tensor(annotation) -> bool:
    if annotation is torch.Tensor or (isinstance(annotation, type) and issubclass(annotation, torch.Tensor)):
        return True
    return any(_mentions_tensor(a) for a in typing.get_args(annotation))


def sample_is_list(forward) -> bool:
    """Whether ``forward`` takes its latents as a per-sample list (its first parameter says ``list[Tensor]``)."""
    return is_list_of_tensors(_parameters(forward)[0])


def _parameters(forward) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(forward).parameters.values() if p.name != "self"]
