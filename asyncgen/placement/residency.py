"""Which of a component's modules a rank keeps resident, and releasing the rest to ``meta``."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from asyncgen._compat import non_persistent_buffer_names, own_tensors, replace_tensor
from asyncgen.placement.planner import Placement
from asyncgen.split.text_encoder import modules_for_layers


def resident_modules(component: nn.Module, placements: Sequence[Placement], rank: int) -> list[nn.Module]:
    """The modules of ``component`` that ``rank`` runs under ``placements`` (empty when it runs none)."""
    modules: list[nn.Module] = []
    for p in placements:
        if p.rank != rank:
            continue
        if p.layers is None:
            return [component]
        modules += modules_for_layers(component, p.layers[0], p.layers[1])
    return modules


def kept_buffers(component: nn.Module) -> list[tuple[str, nn.Module, str, torch.Tensor]]:
    """(module path, module, name, tensor) of the buffers every rank keeps: all of the component's own and the
    persistent ones of its submodules (statistics and constants, a few numbers each; rotary tables and position
    ids are non-persistent and stay out)."""
    return [(prefix, module, name, tensor)
            for prefix, module in component.named_modules()
            for name, tensor, is_parameter in own_tensors(module)
            if not is_parameter and (module is component or name not in non_persistent_buffer_names(module))]


def own_buffers(component: nn.Module) -> list[nn.Module]:
    """The component's persistent buffers (its own and its submodules'), in a holder module; [] when it has none.

    Every rank keeps them, running the component or not: pipelines read a few of them
    directly (LTX's ``vae.latents_mean``/``latents_std``, Flux.2's ``vae.bn.running_mean``/
    ``running_var``). The holder registers the same tensor objects, so loading into it loads
    into the component (a non-persistent buffer is in no weight file: it stays out).
    """
    holder = nn.Module()
    for prefix, module, name, tensor in kept_buffers(component):
        if name not in non_persistent_buffer_names(module):
            holder.register_buffer(f"{prefix}.{name}".replace(".", "_") if prefix else name, tensor)
    return [holder] if any(True for _ in holder.buffers()) else []


def release_weights(component: nn.Module, keep: Sequence[nn.Module]) -> int:
    """Move every parameter and buffer of ``component`` outside ``keep`` to the meta device; returns bytes freed.

    Tied parameters stay tied (T5's token embedding is ``shared``'s weight). The
    component's own buffers and its submodules' persistent ones stay too: pipelines read them
    as attributes on every rank (LTX's ``self.vae.latents_mean``/``latents_std``, Flux.2's
    ``self.vae.bn.running_mean``), and they are a few numbers.
    """
    kept = {id(t) for m in keep for t in (*m.parameters(), *m.buffers())}
    kept |= {id(t) for _, _, _, t in kept_buffers(component)}
    replaced: dict[int, torch.Tensor] = {}
    freed = 0
    for module in component.modules():
        for name, tensor, _ in own_tensors(module):
            if id(tensor) in kept or tensor.device.type == "meta":
                continue
            if id(tensor) not in replaced:
                freed += tensor.numel() * tensor.element_size()
                meta = tensor.detach().to("meta")
                if isinstance(tensor, nn.Parameter):
                    meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
                replaced[id(tensor)] = meta
            replace_tensor(module, name, replaced[id(tensor)])
    return freed


class StandIn(nn.Module):
    """A module standing in for another that it holds without registering (so its tensors stay out of
    ``parameters()`` and ``to()``): an attribute the stand-in lacks is the held module's."""

    def __init__(self, held: nn.Module):
        super().__init__()
        object.__setattr__(self, "_held", held)  # past nn.Module.__setattr__: not a child

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            held = self.__dict__.get("_held")
            if held is None:
                raise
            return getattr(held, name)


class ReleasedModule(StandIn):
    """Stands in a denoiser's module tree for a submodule whose weights this rank released (another rank runs it).

    The denoiser stays the pipeline's own module (the AsyncDiff hook works on it), so
    ``pipe.to(device)`` walks its tree; a module left there with parameters on ``meta``
    would stop that walk ("cannot copy out of meta tensor"). The stand-in has no tensors,
    and a call on it is the released module's (with any hook on it: a block split's stage
    hook passes a block of another stage through without computing it), as is a read of
    an attribute it lacks: the splits read shapes and dtypes of modules they do not run
    (the output's channel count and dtype from ``conv_out`` on every rank).
    """

    @property
    def released(self) -> nn.Module:
        return self._held

    def forward(self, *args, **kwargs):
        return self._held(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"released {type(self._held).__name__}: another rank runs it"


def release_modules(model: nn.Module, modules: Sequence[nn.Module], keep: Sequence[nn.Module]) -> list[nn.Module]:
    """Release ``modules`` of ``model`` (but not those in ``keep``): weights to ``meta``, a :class:`ReleasedModule`
    in their place in ``model``'s tree. Returns the modules released. Tied tensors stay tied; a module that
    shares a tensor with a kept one keeps that tensor (a kept module is never touched)."""
    kept = {id(m) for m in keep}
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False) if n}
    released: list[nn.Module] = []
    replaced: list[str] = []
    # outer modules first: a module inside one already released is released with it
    for module in sorted(modules, key=lambda m: names.get(id(m), "").count(".")):
        if id(module) in kept or any(module is r for r in released):
            continue
        release_weights(module, keep)
        released.append(module)
        name = names.get(id(module))
        if name is None or any(name.startswith(r + ".") for r in replaced):
            continue
        parent_name, _, child = name.rpartition(".")
        # nn.Module.__setattr__ replaces the registered child of that name (a ModuleList's "3" too)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, ReleasedModule(module))
        replaced.append(name)
    return released


@contextlib.contextmanager
def released_restored(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its released modules back in place of their stand-ins, for what reads the whole model's
    shapes (sizes, the activation estimate on fake tensors); the stand-ins return on leaving."""
    swapped = [(model.get_submodule(name.rpartition(".")[0]) if "." in name else model, name.rpartition(".")[2], m)
               for name, m in model.named_modules() if isinstance(m, ReleasedModule)]
    for parent, child, stand_in in swapped:
        setattr(parent, child, stand_in.released)
    try:
        yield model
    finally:
        for parent, child, stand_in in swapped:
            setattr(parent, child, stand_in)
