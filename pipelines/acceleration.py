"""Per-rank speed settings for a wrapped pipeline: dtype, attention kernels, ``torch.compile``.

They change how a stage computes, never what: the stage units, cut points and schedule
stay the same, so the simulator/runtime equivalence and the ``stages=1`` == stock
property still hold for any of these settings (exactly for dtype and attention, up to
the compiler's own kernel rounding for ``compile``).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from asyncgen._compat import renamed_function


ATTENTION_BACKENDS = ("sdpa", "xformers")


# --------------------------------------------------------------------------- attention


def _modules_of(target) -> list[nn.Module]:
    """The models inside a pipeline, an AsyncDiffPipeline or a module."""
    target = getattr(target, "pipeline", target)  # AsyncDiffPipeline -> the diffusers pipeline
    if isinstance(target, nn.Module):
        return [target]
    components = getattr(target, "components", None)
    if isinstance(components, Mapping):
        return [m for m in components.values() if isinstance(m, nn.Module)]
    raise TypeError(f"enable_attention needs a pipeline or an nn.Module, got {type(target).__name__}")


def _check_xformers() -> None:
    if importlib.util.find_spec("xformers") is None:
        raise ImportError(
            "attention='xformers' needs the xformers package, which is not installed; install the "
            "extra with `pip install 'asyncgen[xformers]'` (it must match your torch version), or use attention='sdpa'"
        )
    if not torch.cuda.is_available():
        raise ValueError("attention='xformers' runs on CUDA GPUs only and none is available here; use attention='sdpa'")


def enable_attention(target, backend: str) -> int:
    """Route every attention layer of ``target`` through ``backend``; returns how many layers changed.

    ``"sdpa"`` is PyTorch's ``scaled_dot_product_attention`` (diffusers' default, which
    picks flash or memory-efficient kernels itself); ``"xformers"`` is xFormers'
    memory-efficient attention (CUDA only, needs ``asyncgen[xformers]``). ``target`` is a
    diffusers pipeline (all its models: denoiser, VAE, ...), an ``AsyncDiffPipeline``, or
    a model. Works on a wrapped pipeline too: attention processors live on the real
    modules, which the stages share.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={backend!r} is not one of {', '.join(map(repr, ATTENTION_BACKENDS))}")
    if backend == "xformers":
        _check_xformers()
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    changed = 0
    for root in _modules_of(target):
        for module in root.modules():
            if isinstance(module, AttentionModuleMixin):
                # diffusers' newer attention classes (Flux, ...) dispatch on a backend name
                module.set_attention_backend("xformers" if backend == "xformers" else "native")
            elif isinstance(module, Attention):
                if not _set_classic_attention(module, backend):
                    continue
            else:
                continue
            changed += 1
    return changed


def _set_classic_attention(module, backend: str) -> bool:
    """Swap a classic ``Attention``'s processor for its xformers or SDPA twin; False if already there."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0

    name = type(module.processor).__name__
    if backend == "xformers":
        if "XFormers" in name:
            return False
        # diffusers picks the twin (plain, joint, added-KV, IP-adapter, custom diffusion)
        module.set_use_memory_efficient_attention_xformers(True)
        return True
    if name == "XFormersJointAttnProcessor":
        # diffusers' own "xformers off" would give a joint (SD3) layer the plain processor
        module.set_processor(JointAttnProcessor2_0())
    elif "XFormers" in name:
        module.set_use_memory_efficient_attention_xformers(False)
    elif type(module.processor) is AttnProcessor:  # the pre-SDPA matmul/softmax path
        module.set_processor(AttnProcessor2_0())
    else:
        return False  # already an SDPA processor (plain, joint, fused, IP-adapter, ...)
    return True


# ---------------------------------------------------------------------------- compile


def compile_options(compile: bool | Mapping[str, Any]) -> dict | None:
    """``compile`` as ``torch.compile`` keyword arguments, or ``None`` for no compilation."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if isinstance(compile, Mapping):
        accepted = set(inspect.signature(torch.compile).parameters) - {"model"}
        unknown = sorted(set(compile) - accepted)
        if unknown:
            raise ValueError(f"compile={dict(compile)!r}: {unknown} are not torch.compile arguments ({sorted(accepted)})")
        return dict(compile)
    raise ValueError(
        f"compile={compile!r} is not accepted: use False, True, or a dict of torch.compile arguments "
        "such as {'mode': 'max-autotune'} or {'backend': 'eager'}"
    )


def compile_modules(modules: Iterable[nn.Module], options: Mapping[str, Any]) -> int:
    """``module.compile(**options)`` on each distinct module; returns how many.

    In place and per module, so the parameters, the module objects and their attention
    processors stay what LoRA loading and processor setters act on (a change is picked
    up by a recompile, not lost). Compilation itself happens at the first call.
    """
    seen: set[int] = set()
    for module in modules:
        if id(module) in seen:
            continue
        seen.add(id(module))
        module.compile(**options)
    return len(seen)


def _run_stage(stage, split, state, cond):
    return stage(split, state, cond)


class CompiledStage:
    """A stage whose whole forward is one function compiled with ``torch.compile``, static shapes.

    Compiling each module (``module.compile()``) does not work for a stage of many
    modules: they all run nn.Module's one ``_call_impl`` code object, dynamo keeps one
    cache per code object, and after its recompile limit (8) the other modules run
    eager with a warning. Here each stage gets a function with a code object of its own,
    so its guards and graphs never compete with another stage's; a rank runs one stage
    at one shape, so static shapes compile once. The modules stay eager objects: LoRA
    loading and attention-processor changes trip a guard and recompile, they are not lost.
    Everything else (``index``, ``modules()``, ``names``) is the stage's.
    """

    def __init__(self, stage, options: Mapping[str, Any]):
        self.stage = stage
        function = renamed_function(_run_stage, f"asyncgen_stage_{stage.index}")
        self._compiled = torch.compile(function, **{"dynamic": False, **options})  # compiled at the first call

    def __call__(self, split, state, cond):
        return self._compiled(self.stage, split, state, cond)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["stage"], name)


def compile_stages(stages: Iterable, options: Mapping[str, Any]) -> list[CompiledStage]:
    """Each stage as a :class:`CompiledStage` (compilation happens at its first call, so stages
    this rank never runs cost nothing)."""
    return [CompiledStage(stage, options) for stage in stages]
