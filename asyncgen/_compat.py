"""The one door to private and version-specific APIs of torch, diffusers, transformers and the stdlib.

Every use of another library's underscore name, or of a behaviour that changed between
releases, is a named function here: its docstring says what it does, which releases it
was written against, and what public API would replace it. A version bump that breaks
one of them is fixed here and nowhere else; ``tests/test_compat.py`` checks each on the
installed releases, and ``tests/test_layering.py`` fails on a private name used anywhere
else in the package.

Functions that reach a private API detect it and raise :class:`PrivateAPIMissing`, naming
the library's version, when it is gone, unless a documented fallback exists.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class PrivateAPIMissing(RuntimeError):
    """A private API asyncgen relies on is not in the installed library (named with its version)."""


def library_version(name: str):
    """The installed version of distribution ``name`` as a ``packaging`` ``Version`` (None if not installed)."""
    from packaging.version import Version

    try:
        return Version(importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        return None


def _missing(library: str, what: str, hint: str = "") -> PrivateAPIMissing:
    return PrivateAPIMissing(f"{what} is not in {library} {library_version(library)}; asyncgen needs it"
                             + (f" ({hint})" if hint else ""))


# ---------------------------------------------------------------------------- torch: dispatch and fake tensors

def tree_leaves(tree: Any) -> list:
    """The leaves of a nested structure of tuples, lists, dicts and dataclass-like pytrees.

    ``torch.utils.pytree.tree_leaves`` is public from the torch release that adds
    ``torch.utils.pytree``; before it (torch 2.4 to 2.14 at least) only the private
    ``torch.utils._pytree`` has it. Uses the public module when present.
    """
    try:
        from torch.utils.pytree import tree_leaves as leaves  # public, newer torch
    except ImportError:
        from torch.utils._pytree import tree_leaves as leaves
    return leaves(tree)


@functools.cache
def torch_dispatch_mode() -> type:
    """The base class of a ``__torch_dispatch__`` mode (every aten op passes through it).

    ``torch.utils._python_dispatch.TorchDispatchMode`` (torch 1.13 on, unchanged API through
    2.14); torch documents it under that private path and has no public alias. Subclass the
    class this returns.
    """
    try:
        from torch.utils._python_dispatch import TorchDispatchMode
    except ImportError as exc:
        raise _missing("torch", "torch.utils._python_dispatch.TorchDispatchMode") from exc
    return TorchDispatchMode


def op_returns_alias(func) -> bool:
    """Whether aten op ``func`` (an ``OpOverload``) returns a view of, or the same tensor as, an input.

    Reads ``func._schema.returns[*].alias_info`` (torch 2.x). The public
    ``OpOverload.is_view`` looks at the arguments, not the returns, so it differs for ops
    with aliased inputs and fresh outputs.
    """
    schema = getattr(func, "_schema", None)
    if schema is None:
        raise _missing("torch", "OpOverload._schema")
    return any(r.alias_info is not None for r in schema.returns)


def fake_tensor_mode(**kwargs):
    """A new ``FakeTensorMode`` (``torch._subclasses.fake_tensor``, torch 2.0 on; no public path).

    ``kwargs`` go to its constructor (``allow_non_fake_inputs=True`` is what asyncgen passes).
    """
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
    except ImportError as exc:
        raise _missing("torch", "torch._subclasses.fake_tensor.FakeTensorMode") from exc
    return FakeTensorMode(**kwargs)


def value_read_errors() -> tuple[type[Exception], ...]:
    """What a ``FakeTensorMode`` run raises where the forward reads tensor values in Python
    (``.tolist()``, ``nonzero``): ``DataDependentOutputException`` and
    ``DynamicOutputShapeException`` of ``torch._subclasses.fake_tensor`` (torch 2.0 on)."""
    try:
        from torch._subclasses.fake_tensor import (
            DataDependentOutputException,
            DynamicOutputShapeException,
        )
    except ImportError as exc:
        raise _missing("torch", "torch._subclasses.fake_tensor's data-dependent exceptions") from exc
    return DataDependentOutputException, DynamicOutputShapeException


def fake_from_meta(mode, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fake tensor of ``mode`` with ``tensor``'s (a meta tensor's) shape and dtype, pretending to live on ``device``.

    ``FakeTensorMode.fake_tensor_converter.from_meta_and_device`` (torch 2.0 to 2.14);
    ``mode.from_tensor`` would keep the meta device.
    """
    converter = getattr(mode, "fake_tensor_converter", None)
    if converter is None or not hasattr(converter, "from_meta_and_device"):
        raise _missing("torch", "FakeTensorMode.fake_tensor_converter.from_meta_and_device")
    return converter.from_meta_and_device(mode, tensor, device)


FAKE_TENSOR_LOGGER = "torch._subclasses.fake_tensor"  # the logger a failed fake op writes to (torch 2.x)


# ---------------------------------------------------------------------------- torch: modules

def own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """``(name, tensor, is_parameter)`` for ``module``'s own parameters then buffers (not its submodules'),
    a tensor held under two names listed under each, ``None`` slots left out.

    Public API: ``named_parameters``/``named_buffers`` with ``recurse=False,
    remove_duplicate=False`` (torch 2.0 on); nothing private here.
    """
    params = [(n, t, True) for n, t in module.named_parameters(recurse=False, remove_duplicate=False)]
    return params + [(n, t, False) for n, t in module.named_buffers(recurse=False, remove_duplicate=False)]


def non_persistent_buffer_names(module: nn.Module) -> set[str]:
    """The names of ``module``'s own buffers registered with ``persistent=False`` (in no ``state_dict``).

    Reads ``nn.Module._non_persistent_buffers_set`` (torch 1.6 to 2.14). The public way
    (buffer names minus the module's own ``state_dict`` keys) walks the whole subtree, once
    per module: quadratic on a large model.
    """
    names = getattr(module, "_non_persistent_buffers_set", None)
    if names is None:
        raise _missing("torch", "nn.Module._non_persistent_buffers_set")
    return set(names)


def replace_tensor(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Put ``value`` in ``module``'s own parameter or buffer slot ``name``, whatever its type.

    A buffer slot keeps its persistence. For a parameter slot ``setattr`` (public) is used
    when ``value`` is an ``nn.Parameter``; anything else (a fake tensor standing in for a
    meta weight while shapes are traced) goes straight into ``nn.Module._parameters``
    (torch 1.x to 2.14), which ``setattr`` would refuse. ``torch.func.functional_call`` is
    the public way to run a module on other tensors, for one call only.
    """
    is_parameter = name in dict(module.named_parameters(recurse=False, remove_duplicate=False))
    if is_parameter and value is not None and not isinstance(value, nn.Parameter):
        table = getattr(module, "_parameters", None)
        if table is None:
            raise _missing("torch", "nn.Module._parameters")
        table[name] = value
        return
    if not is_parameter and name not in dict(module.named_buffers(recurse=False, remove_duplicate=False)):
        raise KeyError(f"{type(module).__name__} has no parameter or buffer {name!r}")
    setattr(module, name, value)  # nn.Module.__setattr__ writes an existing slot; a buffer keeps its persistence


def compiled_original(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile``'d module wraps (``module`` itself when it is not one).

    ``OptimizedModule._orig_mod`` (torch 2.0 to 2.14); torch has no public accessor.
    """
    return getattr(module, "_orig_mod", module)


def parse_to_arguments(*args, **kwargs) -> tuple[torch.device | None, torch.dtype | None]:
    """The device and dtype an ``nn.Module.to(*args, **kwargs)`` call asks for (None: unchanged).

    ``torch._C._nn._parse_to`` is what ``nn.Module.to`` itself calls (torch 1.x to 2.14);
    no public function parses these arguments.
    """
    parse = getattr(getattr(torch._C, "_nn", None), "_parse_to", None)
    if parse is None:
        raise _missing("torch", "torch._C._nn._parse_to")
    device, dtype, _, _ = parse(*args, **kwargs)
    return device, dtype


def renamed_function(function: types.FunctionType, name: str) -> types.FunctionType:
    """A copy of ``function`` whose code object is a distinct one named ``name``.

    ``torch.compile`` caches what it compiled per code object, up to
    ``torch._dynamo.config.recompile_limit`` (``cache_size_limit`` before torch 2.6) entries;
    stages with different modules would each recompile the one shared function and hit the
    limit. A distinct code object per stage gives each stage its own cache. Uses only
    ``CodeType.replace`` (Python 3.8 on); a public per-call cache in ``torch.compile``
    would replace it.
    """
    code = function.__code__.replace(co_name=name)
    return types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)


# ---------------------------------------------------------------------------- torch.distributed

def default_store():
    """The default process group's key-value store, or None (no group, or the helper is gone).

    ``torch.distributed.distributed_c10d._get_default_store`` (torch 1.x to 2.14); there is no
    public getter. Failure reporting must never mask the real error, so this never raises.
    """
    import torch.distributed as dist

    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    if getter is None:
        return None
    try:
        return getter()
    except Exception:  # noqa: BLE001 - no default group
        return None


def abort_process_group(group=None) -> None:
    """End ``group`` now, pending work dropped (``None``: every group of this process); never raises.

    ``torch.distributed.distributed_c10d._abort_process_group`` (torch 2.5 on; 2.14 checked)
    does not wait for pending NCCL operations, and on gloo it closes the connections, which
    peers see at once. Where it is missing or fails, the public
    ``torch.distributed.destroy_process_group`` (which may wait) is the fallback.
    """
    import torch.distributed as dist

    try:
        dist.distributed_c10d._abort_process_group(group)
        aborted = True
    except Exception:  # noqa: BLE001 - an older torch, or a group already gone
        aborted = False
    # torch 2.6 aborts the default group's work but leaves it registered (2.14 deregisters it): destroying it
    # then waits for nothing; the same call is the fallback where the abort itself is missing or failed
    if not aborted or (group is None and dist.is_initialized()):
        try:
            dist.destroy_process_group(group)
        except Exception:  # noqa: BLE001, S110 - nothing left to end
            pass


# ---------------------------------------------------------------------------- diffusers

def clear_method_caches(model: nn.Module) -> None:
    """Empty the ``functools.lru_cache``s on the methods of ``model``'s module classes.

    Diffusers caches rotary tables per (module, shape, device): QwenImage's
    ``QwenEmbedRope._compute_video_freqs`` under ``lru_cache_unless_export`` (diffusers 0.35 on;
    0.42 checked), which hides the cache in its closure. A run under ``FakeTensorMode`` leaves
    fake tensors there, and the first real forward at the same shapes would get them back (a
    meta-built model traced at the pipeline's size then fails on its first real step). The
    caches belong to the class, so clearing them costs a recomputation and nothing else.
    No public API clears them; a diffusers that stops caching makes this a no-op.
    """
    seen: set[type] = set()
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls in seen:
                continue
            seen.add(cls)
            for value in vars(cls).values():
                value = getattr(value, "__func__", value)  # staticmethod / classmethod
                candidates = [value]
                for cell in getattr(value, "__closure__", None) or ():
                    try:
                        candidates.append(cell.cell_contents)
                    except ValueError:  # an empty cell
                        pass
                for candidate in candidates:
                    if callable(getattr(candidate, "cache_clear", None)):
                        candidate.cache_clear()


def hook_original_forward(hook) -> Callable:
    """The forward a ``diffusers.hooks.ModelHook`` with a ``new_forward`` wraps (the next one down the chain).

    ``hook.fn_ref.original_forward`` (``HookFunctionReference``, diffusers 0.33 on; 0.42
    checked); ``ModelHook`` has no public accessor for it.
    """
    original = getattr(getattr(hook, "fn_ref", None), "original_forward", None)
    if original is None:
        raise _missing("diffusers", "ModelHook.fn_ref.original_forward", "is the hook registered?")
    return original


def interrupt_pipeline(pipeline) -> None:
    """Make a diffusers pipeline's running call skip its remaining steps (from ``callback_on_step_end``).

    The pipelines' denoising loops test ``self.interrupt``, a read-only property over
    ``self._interrupt`` (diffusers' documented way to stop a call early sets the attribute; 0.40
    and 0.42 checked). A pipeline without the property has no early stop to ask for.
    """
    if not hasattr(type(pipeline), "interrupt"):
        raise _missing("diffusers", f"{type(pipeline).__name__}.interrupt", "this pipeline cannot stop a call early")
    pipeline._interrupt = True


# ---------------------------------------------------------------------------- diffusers' step caches

#: the cache configs asyncgen composes with AsyncDiff stages, by class name (all in diffusers.hooks since 0.40)
STEP_CACHE_CONFIGS = ("FirstBlockCacheConfig", "MagCacheConfig", "PyramidAttentionBroadcastConfig",
                      "TaylorSeerCacheConfig")


def step_cache_config_classes() -> dict[str, type]:
    """The step-cache config classes the installed diffusers has, of :data:`STEP_CACHE_CONFIGS`, by name.

    A feature check (public classes of ``diffusers.hooks``: all four from 0.40 on, 0.42 checked);
    an older diffusers gives fewer, and the callers refuse or skip the missing ones by name.
    """
    import diffusers.hooks

    return {name: getattr(diffusers.hooks, name) for name in STEP_CACHE_CONFIGS if hasattr(diffusers.hooks, name)}


def enabled_cache_config(model: nn.Module):
    """The cache config ``model.enable_cache(config)`` enabled on a diffusers model, or None.

    ``CacheMixin._cache_config`` (0.32 on; 0.40 and 0.42 checked); the public
    ``is_cache_enabled`` says whether, not which.
    """
    return getattr(model, "_cache_config", None)


def hook_registry_of(module: nn.Module):
    """``module``'s ``diffusers.hooks.HookRegistry`` if it has one, else None (none is created).

    ``module._diffusers_hook`` (0.32 on; 0.40 and 0.42 checked);
    ``HookRegistry.check_if_exists_or_initialize`` would create one on every module asked.
    """
    return getattr(module, "_diffusers_hook", None)


def cache_context_value(name: str):
    """What a hook ``StateManager.set_context`` takes for the pass ``name``.

    diffusers 0.42 takes a ``CacheContext(name)``; 0.40 and 0.41 a plain string.
    """
    try:
        from diffusers.hooks.hooks import CacheContext
    except ImportError:
        return name
    return CacheContext(name)


def state_manager_context(manager) -> Any:
    """The context a hook ``StateManager`` holds now (None when unset), to be handed back to ``set_context``.

    ``StateManager._context`` (0.42) or ``._current_context`` (0.40, 0.41); no public getter
    that does not raise when none is set.
    """
    if hasattr(manager, "_context"):
        return manager._context
    if hasattr(manager, "_current_context"):
        return manager._current_context
    raise _missing("diffusers", "StateManager._context")


def forget_cache_contexts(manager, prefix: str) -> None:
    """Drop the states a hook ``StateManager`` keeps for the contexts whose names start with ``prefix``.

    ``StateManager._state_cache`` (0.32 on; 0.40 and 0.42 checked); the public ``reset()`` drops
    every context's state, those of passes still running included.
    """
    cache = getattr(manager, "_state_cache", None)
    if cache is None:
        raise _missing("diffusers", "StateManager._state_cache")
    for name in [n for n in cache if isinstance(n, str) and n.startswith(prefix)]:
        del cache[name]


def block_output_indices(block: nn.Module) -> tuple[int, int | None]:
    """Where a transformer block's output tuple holds its hidden states and its text states (None: not a tuple).

    ``diffusers.hooks._helpers.TransformerBlockRegistry`` (0.34 on; 0.40 and 0.42 checked), what
    diffusers' First Block Cache and MagCache hooks read; no public accessor.
    """
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError as exc:
        raise _missing("diffusers", "hooks._helpers.TransformerBlockRegistry") from exc
    metadata = TransformerBlockRegistry.get(type(block))
    return metadata.return_hidden_states_index, metadata.return_encoder_hidden_states_index


def from_deprecated_attention_block(module: nn.Module) -> bool:
    """Whether diffusers built ``module`` (an ``Attention``) for an old VAE checkpoint whose
    attention weights are named ``query``/``key``/``value``/``proj_attn`` and renamed on load.

    ``Attention._from_deprecated_attn_block`` (diffusers 0.15 to 0.42); False when absent.
    """
    return bool(getattr(module, "_from_deprecated_attn_block", False))


def unet_mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 0/1 attention mask ``(B, T)`` as the additive bias ``(B, 1, T)`` the UNets' forwards make of it.

    ``UNet2DConditionModel.forward`` and ``UNetMotionModel.forward`` (diffusers 0.x to 0.42)
    keep 1 as 0 and turn 0 into -10000.0, not ``-inf`` nor the dtype's minimum; a split
    that rebuilds those forwards must do the same to stay bit-identical. Not a function
    diffusers exports: its inline code, mirrored here so a change is fixed in one place.
    """
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


def set_pipeline_component(pipeline, name: str, module) -> None:
    """Make ``pipeline.<name>`` be ``module`` without rewriting the pipeline's config.

    ``DiffusionPipeline.__setattr__`` (diffusers 0.x to 0.42) records a new component's
    class in the config (``register_to_config``); a stand-in (a component proxy)
    must leave the real class there, so ``save_pretrained`` and ``pipe.components`` keep
    naming it. Writing past that ``__setattr__`` is the private step; a
    ``diffusers.hooks`` hook on the real module would need no replacement at all.
    """
    object.__setattr__(pipeline, name, module)


def record_name_or_path(configurable, path: str) -> None:
    """Record ``path`` as where a diffusers model or pipeline came from, as ``from_pretrained`` does.

    Writes the ``_name_or_path`` config key (``ConfigMixin``, diffusers 0.x to 0.42), which a
    pipeline's public ``name_or_path`` property reads; no public setter.
    """
    configurable.register_to_config(_name_or_path=path)


def keep_in_fp32_modules(model: nn.Module) -> list[str]:
    """The module names a model class asks ``from_pretrained`` to keep in float32 (T5's ``wo``).

    ``_keep_in_fp32_modules`` (a class attribute of diffusers' ``ModelMixin`` from 0.26 and of
    transformers' ``PreTrainedModel``); [] when absent or None. No public accessor.
    """
    return list(getattr(model, "_keep_in_fp32_modules", None) or [])


def keep_in_fp32_modules_strict(model: nn.Module) -> list[str]:
    """The module names transformers keeps in float32 under bfloat16 as well as float16.

    ``PreTrainedModel._keep_in_fp32_modules_strict`` (transformers 4.54 on); [] when absent.
    """
    return list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])


def context_parallel_plan(model_class: type) -> dict | None:
    """The context-parallel plan diffusers gives a model class (what ``enable_parallelism`` shards), or None.

    ``ModelMixin._cp_plan``, a class attribute set on the transformer classes diffusers can
    run with ``ContextParallelConfig`` (diffusers 0.36 to 0.42: Wan, Flux, QwenImage, LTX, ...);
    None on the others (SD3, every UNet) and on a diffusers without context parallelism. No
    public accessor: ``enable_parallelism`` only raises when the plan is missing.
    """
    return getattr(model_class, "_cp_plan", None) or None


def context_parallel_refusal_for_hybrid() -> str | None:
    """None where this diffusers has the context-parallel pieces the stages x context-parallel hybrid reuses; else
    why not, naming the installed version.

    The hybrid (:mod:`asyncgen.runtime.context_parallel`) runs diffusers' own Ulysses attention and its own
    split/gather hooks on one stage's blocks: ``ContextParallelConfig`` and ``ParallelConfig`` (public),
    ``ContextParallelInput``/``ContextParallelOutput`` (``diffusers.models._modeling_parallel``), the hooks
    ``ContextParallelSplitHook``/``ContextParallelGatherHook`` (``diffusers.hooks.context_parallel``) and the
    attention processors' ``_parallel_config`` attribute. All are in diffusers 0.36 to 0.42 (checked on 0.40
    and 0.42); the check is by feature, not by version number.
    """
    import diffusers

    try:
        from diffusers import ContextParallelConfig, ParallelConfig  # noqa: F401
        from diffusers.hooks.context_parallel import ContextParallelGatherHook, ContextParallelSplitHook  # noqa: F401
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput  # noqa: F401
    except ImportError as exc:
        return (f"diffusers {diffusers.__version__} has no context parallelism the hybrid can use ({exc}); it needs "
                "ContextParallelConfig with diffusers.hooks.context_parallel (diffusers 0.36 or later)")
    if "mesh" not in inspect.signature(ContextParallelConfig.setup).parameters:
        return f"diffusers {diffusers.__version__}'s ContextParallelConfig.setup takes no mesh"
    return None


def context_parallel_hooks():
    """``(ContextParallelSplitHook, ContextParallelGatherHook, ContextParallelInput, ContextParallelOutput)``:
    diffusers' own split-at-input / gather-at-output hooks and their plan entries (private modules; see
    :func:`context_parallel_refusal_for_hybrid`)."""
    from diffusers.hooks.context_parallel import ContextParallelGatherHook, ContextParallelSplitHook
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return ContextParallelSplitHook, ContextParallelGatherHook, ContextParallelInput, ContextParallelOutput


def attention_takes_parallel_config(processor) -> bool:
    """Whether an attention processor runs diffusers' context-parallel attention when given a config (it has the
    ``_parallel_config`` attribute that ``enable_parallelism`` sets)."""
    return processor is not None and hasattr(processor, "_parallel_config")


def set_attention_parallel_config(processor, config) -> None:
    """Give an attention processor a ``ParallelConfig`` (or None: plain attention), as ``enable_parallelism`` does
    for every processor of a model, here for one processor at a time."""
    processor._parallel_config = config


# ---------------------------------------------------------------------------- transformers

def transformers_model_from_config(model_class, config, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers model of ``model_class`` built from ``config`` (weights initialised, not loaded), in ``dtype``.

    ``PreTrainedModel._from_config`` (transformers 4.x to 5.x), which ``AutoModel.from_config``
    calls after resolving the class; it sets the attention implementation and the dtype as
    ``from_pretrained`` would (the keyword is ``dtype``: transformers 4.56 on, and the floor is 5).
    """
    build = getattr(model_class, "_from_config", None)
    if build is None:
        raise _missing("transformers", f"{model_class.__name__}._from_config")
    return build(config, **({"dtype": dtype} if dtype is not None else {}))


def t5_attention_mask(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None):
    """The encoder mask a T5 stack's forward builds: ``masking_utils.create_bidirectional_mask``
    (transformers 4.56 on; 5.x checked); transformers < 4.56 built it inside ``T5Stack.forward``."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError as exc:
        raise _missing("transformers", "transformers.masking_utils.create_bidirectional_mask",
                       "a T5 encoder split into layer ranges needs transformers >= 4.56") from exc
    return create_bidirectional_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)


def clip_causal_mask(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None):
    """The causal mask a CLIP text transformer's forward builds: ``masking_utils.create_causal_mask``
    with no cache (transformers 4.53 on; 5.x checked)."""
    try:
        from transformers.masking_utils import create_causal_mask
    except ImportError as exc:
        raise _missing("transformers", "transformers.masking_utils.create_causal_mask",
                       "a CLIP encoder split into layer ranges needs transformers >= 4.53") from exc
    return create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=None)


def t5_block_forward(block: nn.Module, hidden: torch.Tensor, mask, position_bias):
    """One ``T5Block`` of an encoder: ``(hidden, position_bias)`` out.

    transformers 5.x's ``T5Block.forward(hidden_states, attention_mask, position_bias,
    encoder_hidden_states, encoder_attention_mask, encoder_decoder_position_bias, cache=...)``
    returning a 3-tuple; earlier releases named the cache ``past_key_value`` and returned
    more fields, so the version is checked.
    """
    if not _takes_cache(type(block)):
        raise _missing("transformers", "T5Block.forward(..., cache=)", "a T5 encoder split needs transformers 5")
    hidden, bias, _ = block(hidden, mask, position_bias, None, None, None, cache=None)
    return hidden, bias


@functools.cache
def _takes_cache(block_class: type) -> bool:
    import inspect

    return "cache" in inspect.signature(block_class.forward).parameters


def clip_layer_forward(layer: nn.Module, hidden: torch.Tensor, mask) -> torch.Tensor:
    """One ``CLIPEncoderLayer`` of a text encoder, causal: the new hidden state.

    transformers 5.x's ``CLIPEncoderLayer.forward(hidden_states, attention_mask, **kwargs)``
    with ``is_causal`` among the attention kwargs, returning a tensor (4.x took a separate
    ``causal_attention_mask`` and returned a tuple; the floor is 5).
    """
    return layer(hidden, mask, is_causal=True)


# ---------------------------------------------------------------------------- Python's multiprocessing

def resource_tracker_running() -> bool:
    """Whether this process started multiprocessing's resource tracker.

    ``multiprocessing.resource_tracker._resource_tracker._fd`` (CPython 3.8 to 3.13); no public API.
    """
    from multiprocessing import resource_tracker

    return getattr(getattr(resource_tracker, "_resource_tracker", None), "_fd", None) is not None


def stop_resource_tracker() -> None:
    """Stop the resource tracker this process started (it outlives the workers otherwise, until exit).

    ``ResourceTracker._stop`` (CPython 3.12.? on); a no-op where it is missing.
    """
    from multiprocessing import resource_tracker

    stop = getattr(getattr(resource_tracker, "_resource_tracker", None), "_stop", None)
    if stop is not None:
        stop()


def all_to_all_as_context_parallel(tensor, group):
    """``all_to_all_single`` of ``tensor`` (equal shards) over ``group`` the way diffusers' Ulysses attention calls
    it: through torch's functional collectives (``torch.distributed._functional_collectives``, private; 2.6 and
    2.14 checked), waited on. The link probe times this call, not ``dist.all_to_all_single``: on two gloo CPU
    processes the functional path took 0.5 ms where the plain one took 0.33 ms for 166 kB (the Ulysses exchange
    of the wan bench model)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    out = funcol.all_to_all_single(tensor, None, None, dist.group.WORLD if group is None else group)
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


def run_process_finalizers() -> None:
    """Run multiprocessing's finalizers of this process now, as its normal exit would (before ``os._exit``).

    A named semaphore this process made (``multiprocessing.RLock()``: tqdm makes one for its
    bars) is unlinked and unregistered from the resource tracker by such a finalizer; a
    process ended with ``os._exit`` skips them, and the tracker then warns "leaked semaphore
    objects" when it stops. ``multiprocessing.util._run_finalizers`` (CPython 3.8 to 3.13);
    a no-op where it is missing.
    """
    from multiprocessing import util

    run = getattr(util, "_run_finalizers", None)
    if run is not None:
        run()
