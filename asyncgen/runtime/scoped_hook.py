"""A ``diffusers.hooks`` hook that can be limited to the calls of the wrapper that registered it.

A ``from_pipe`` sibling shares its denoiser with a pipeline that must stay stock, and a
wrapper that leaves its pipeline usable as it was (``ASGPipeline``) must not change the
pipeline's own calls either. Such a hook is registered *scoped*: it works only inside
:meth:`ScopedHook.active` (a context variable, so a call on another thread or outside the
wrapper sees the stock forward) and passes every other call to the forward it wraps.
This module knows nothing of what a hook does inside its scope; it also holds the small helpers that
place a hook in a registry (numbered names, re-registering one outermost).
"""

from __future__ import annotations

import contextlib
import contextvars

from diffusers.hooks import HookRegistry, ModelHook

from asyncgen._compat import hook_original_forward


class ScopedHook(ModelHook):
    """A ``ModelHook`` that works everywhere (``scoped=False``) or only inside :meth:`active`."""

    def __init__(self, scoped: bool = False):
        super().__init__()
        self.scoped = scoped
        self._scope = contextvars.ContextVar(f"asyncgen scope {id(self)}", default=not scoped)

    def __getstate__(self):
        # a ContextVar cannot be copied: a deep copy of the pipeline gets a scope of its own, closed (or, unscoped,
        # open) as this one's default
        state = dict(self.__dict__)
        state["_scope"] = not self.scoped
        return state

    def __setstate__(self, state):
        default = state.pop("_scope")
        self.__dict__.update(state)
        self._scope = contextvars.ContextVar(f"asyncgen scope {id(self)}", default=default)

    @contextlib.contextmanager
    def active(self):
        """A context in which a ``scoped`` hook works (the calls of the wrapper that owns it)."""
        token = self._scope.set(True)
        try:
            yield
        finally:
            self._scope.reset(token)

    @property
    def in_scope(self) -> bool:
        return self._scope.get()

    def wrapped_forward(self, *args, **kwargs):
        """The forward this hook wraps (the next hook down the chain, or the module's own)."""
        return hook_original_forward(self)(*args, **kwargs)


def register_numbered(module, hook: ModelHook, name: str) -> str:
    """Register ``hook`` on ``module`` under ``name``, numbered when a sibling's hook holds that name already."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    hook_name, number = name, 1
    while registry.get_hook(hook_name) is not None:  # a from_pipe sibling's scoped hook is there already
        number += 1
        hook_name = f"{name}_{number}"
    registry.register_hook(hook, hook_name)
    return hook_name


def hooks_of(module, hook_type: type) -> list:
    """The hooks of ``hook_type`` registered on ``module`` (none for a stock module)."""
    import torch

    if not isinstance(module, torch.nn.Module):
        return []
    registry = HookRegistry.check_if_exists_or_initialize(module)
    return [hook for name in list(registry.hooks) if isinstance(hook := registry.get_hook(name), hook_type)]


def register_outermost(block, hook: ModelHook) -> None:
    """Re-register ``hook`` last on ``block`` so it wraps every hook registered after it.

    Only the outermost hook of a registry is removed (``remove_hook`` rewires the chain
    correctly only there), so the hooks above ``hook`` are taken off from the top and put
    back in their order, then ``hook`` on top.
    """
    registry = HookRegistry.check_if_exists_or_initialize(block)
    order = list(registry.hooks.items())
    position = next(i for i, (_, h) in enumerate(order) if h is hook)
    above = order[position + 1:]
    if not above:
        return
    for name, _ in reversed(above):
        registry.remove_hook(name, recurse=False)
    name = order[position][0]
    registry.remove_hook(name, recurse=False)
    for other_name, other in above:
        registry.register_hook(other, other_name)
    registry.register_hook(hook, name)
