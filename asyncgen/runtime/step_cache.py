"""diffusers' step caches composed with AsyncDiff stages: what each stage's task sees and sends.

A step cache skips work across denoising steps. diffusers implements each as hooks on the
denoiser's blocks (or their attention modules) sharing a ``StateManager`` state; asyncgen
registers those very hooks (``denoiser.enable_cache(config)``, or the cache's ``apply_*`` function
for a model without diffusers' ``CacheMixin``) once the split is traced, under
the block split's stage hooks, so a stage computes its blocks through them and passes other
stages' blocks by untouched. What the composition adds is where each hook's state lives and
what crosses a cut:

* **One state per stage and replica.** Before every task the cache's ``StateManager`` s are set
  to a context of their own for (this call of this lane, stage, replica): on a rank only its own
  is ever used; the serial simulator, holding every stage, keeps them apart the same way.
* **The step index a stage sees is the step it serves**: the step of an exact step, the round's
  step for stages before the last, the predicted step for the last stage's replica j
  (``round + j``), whatever timestep ``time_shift`` gives it. Its input is stale (by k steps for
  stage k at stride 1), its index is not: a schedule-driven decision equals the stock cache's
  decision at that step. At stride S a stage serves every S-th step only, so it runs the
  stock decisions of those steps (TaylorSeer recomputes in a round only if the stock cache
  recomputes at the step that round serves; its Taylor terms use the real step distances). A
  stage or replica whose TaylorSeer state has computed nothing yet in the call computes (a
  stride's later replica: it skips the exact steps), where the stock cache would predict.
* **Signal-driven caches** (First Block Cache, MagCache) decide on the stage holding the first
  block, from that stage's own input. The decision travels with the boundary state it was made
  on, in the same message: the state's ``skips`` slots, which a block split never uses, carry
  ``[flag, head tensors]`` (the flag 1.0 = compute; First Block Cache's head-block output, or
  MagCache's head-block input, which the tail needs to measure the residual of the blocks
  between). Later stages set the flag in their own state before running, so their blocks
  compute or pass through as the stock cache's would; the residual added on a skip is the
  last stage's (it computed it at the tail), added at the tail block's output instead of the
  head's: the blocks in between pass their input through on a skip, so it is the same sum.
  The first stage's head adds nothing in its place (an exact zero). At stride S the last
  stage's replicas j > 0, idle in an exact step, compute it too (output discarded), so each has
  a residual of its own before its first round; one stage at stride S is S whole models, each
  with its own state.
* **Pyramid Attention Broadcast** keeps its state on each attention hook (no ``StateManager``).
  At stride 1 only the stage holding a module calls it, once a step, so its call count is the
  step index and its timestep callback (the pipeline's current timestep) is the served step's:
  the stock decisions, unchanged. Stride > 1 is refused (replicas would share one state).
* FasterCache is not composed: its hook on the whole denoiser drops the unconditional half of
  the batch on some steps, which the stages' stale states cannot follow.
* **CFG parallel** (``cfg_parallel=True``): each half of the batch runs on its own lane, with
  the managers' states of its own. TaylorSeer decides from the step alone, and MagCache from
  the step and its calibrated ratios alone (its residual is per sample), so each half makes
  the decision stock makes for the whole batch. Two are refused with CFG parallel:
  First Block Cache decides from the mean change of the first block's residual over the whole
  batch, which a half does not see (agreeing with stock would take a reduction between the
  two halves' first stages before every step's decision, and no message passes between them
  then: the halves meet only to exchange predictions at the step's end); PAB's state is the
  attention hook's own, which in one process both halves call, so the serial simulator would
  count two calls a step and hand one half's attention to the other (on ranks each half has
  its own hooks; the simulator is the specification). A pipeline's several passes per step
  (Wan's cond and uncond) do share PAB's state, as stock does.
* **DeepCache** (asyncgen's own, for SD/SDXL UNets: :mod:`asyncgen.runtime.deep_cache`) is
  schedule-driven too; ``StagedCache(DeepCacheConfig(...), ...)`` gives its staged form,
  :class:`~asyncgen.runtime.deep_cache.StagedDeepCache`, which the executors run the same way.

With one stage every hook sits on the one stage and runs exactly as the stock cache's.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Sequence

import diffusers.hooks
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager  # not re-exported by diffusers.hooks (0.40-0.42)
from diffusers.utils import logging
from torch import nn

from asyncgen._compat import (block_output_indices, cache_context_value, enabled_cache_config, forget_cache_contexts,
                              hook_original_forward, hook_registry_of, state_manager_context, step_cache_config_classes)
from asyncgen.runtime.deep_cache import (DeepCacheConfig, StagedDeepCache, check_branch, enabled_deep_cache,
                                         remove_deep_cache)
from asyncgen.runtime.scoped_hook import register_outermost
from asyncgen.split.boundary import BoundaryState
from asyncgen.split.transformer.stage_hook import stage_hook_of

logger = logging.get_logger(f"diffusers.{__name__}")

_TAIL_HOOK = "asyncgen_cache_tail"
#: each cache's public apply function in diffusers.hooks (0.40 on), for a model without ``enable_cache``
_APPLY = {"FirstBlockCacheConfig": "apply_first_block_cache", "MagCacheConfig": "apply_mag_cache",
          "PyramidAttentionBroadcastConfig": "apply_pyramid_attention_broadcast",
          "TaylorSeerCacheConfig": "apply_taylorseer_cache"}
_calls = itertools.count()


def enable_step_cache(denoiser: nn.Module, config) -> None:
    """Register ``config``'s hooks on ``denoiser``: its ``enable_cache``, or, on a model without diffusers'
    ``CacheMixin`` (SD3's transformer in 0.42), the cache's own public apply function."""
    if hasattr(denoiser, "enable_cache"):
        denoiser.enable_cache(config)
    else:
        getattr(diffusers.hooks, _APPLY[type(config).__name__])(denoiser, config)


#: the caches refused with CFG parallel, and why (the module docstring has the longer story)
_NOT_WITH_CFG_PARALLEL = {
    "FirstBlockCacheConfig": "First Block Cache decides from its first block's residual over the whole batch, and "
                             "under CFG parallel each half of the batch would decide alone, unlike the stock cache",
    "PyramidAttentionBroadcastConfig": "Pyramid Attention Broadcast keeps one state per attention module, which "
                                       "both halves would share in one process (the serial simulator)",
}


def accepted_caches() -> list[str]:
    """The cache configs ``cache=`` takes with the installed diffusers, by name."""
    return [*sorted(step_cache_config_classes()), "DeepCacheConfig (asyncgen.runtime.deep_cache, SD/SDXL UNets)"]


def check_cache_config(cache, cfg_parallel: bool = False) -> None:
    """Refuse what is not a step cache asyncgen composes with stages (with CFG parallel where ``cfg_parallel``),
    naming what would be accepted."""
    if cache is None or isinstance(cache, DeepCacheConfig):
        return
    known = step_cache_config_classes()
    if not isinstance(cache, tuple(known.values())):
        raise ValueError(
            f"cache={cache!r} is not a step cache asyncgen can run under stages; accepted: "
            f"{', '.join(accepted_caches())} (the others from diffusers.hooks), or None")
    if cfg_parallel and type(cache).__name__ in _NOT_WITH_CFG_PARALLEL:
        accepted = [name for name in accepted_caches() if name.split()[0] not in _NOT_WITH_CFG_PARALLEL]
        raise ValueError(
            f"cache={type(cache).__name__} with cfg_parallel=True: {_NOT_WITH_CFG_PARALLEL[type(cache).__name__]}; "
            f"with cfg_parallel=True use {', '.join(accepted)}, or cfg_parallel=False")


def check_cache_split(cache, split, name: str = "denoiser") -> None:
    """Refuse a cache the denoiser's split cannot run (at attach time, before any work): diffusers' caches need a
    transformer split by block, DeepCache a UNet's split. ``split`` None (split on the first call) passes here."""
    if cache is None or split is None:
        return
    from asyncgen.split.unet import UNetSplit

    model = type(split.denoiser).__name__
    if isinstance(cache, DeepCacheConfig):
        if not isinstance(split, UNetSplit):
            transformers = ", ".join(sorted(step_cache_config_classes()))
            raise ValueError(f"cache=DeepCacheConfig runs on SD/SDXL UNets (UNet2DConditionModel); pipe.{name} "
                             f"({model}) is not one; for transformers: {transformers}")
        check_branch(split.denoiser, cache.branch)
    elif not hasattr(split, "adopt_call"):
        raise ValueError(f"cache={type(cache).__name__} runs on transformer denoisers split by block; pipe.{name} "
                         f"({model}) is not one" + ("; for a UNet: DeepCacheConfig (asyncgen.runtime.deep_cache)"
                                                    if isinstance(split, UNetSplit) else ""))


def take_enabled_cache(denoiser: nn.Module, cache) -> Any:
    """The cache to compose: ``cache``, or the one the user enabled on ``denoiser`` (disabled here, so the split
    is traced on the plain model; it comes back under the stages at the first call). A DeepCache applied with
    :func:`~asyncgen.runtime.deep_cache.apply_deep_cache` counts as enabled."""
    enabled = enabled_cache_config(denoiser)
    deep = enabled_deep_cache(denoiser) if enabled is None else None
    if enabled is None and deep is None:
        check_cache_config(cache)
        return cache
    enabled = enabled if enabled is not None else deep
    if cache is not None and cache is not enabled:
        raise ValueError(f"{type(denoiser).__name__} already has {type(enabled).__name__} enabled and cache="
                         f"{type(cache).__name__} was given; pass one of them (or "
                         f"{'remove_deep_cache(unet)' if deep is not None else 'disable_cache()'} first)")
    check_cache_config(enabled)
    if deep is not None:
        remove_deep_cache(denoiser)
    else:
        denoiser.disable_cache()
    logger.info("carrying %s enabled on %s over to the stages", type(enabled).__name__, type(denoiser).__name__)
    return enabled


class _TailResidual(ModelHook):
    """On a skipped step of a split signal cache, adds the last stage's residual at the tail block's output.

    Inert unless :class:`StagedCache` arms it (the last stage of two or more, cache skipping).
    """

    def __init__(self, hidden_index: int, text_index: int | None):
        super().__init__()
        self.hidden_index, self.text_index = hidden_index, text_index
        self.residuals: tuple | None = None  # set for one task: (hidden residual, text residual or None)

    def new_forward(self, module, *args, **kwargs):
        output = hook_original_forward(self)(*args, **kwargs)
        if self.residuals is None:
            return output
        hidden_res, text_res = self.residuals
        if not isinstance(output, tuple):
            return _add_residual(output, hidden_res)
        output = list(output)
        output[self.hidden_index] = _add_residual(output[self.hidden_index], hidden_res)
        if text_res is not None and self.text_index is not None:
            output[self.text_index] = output[self.text_index] + text_res
        return tuple(output)


def _add_residual(hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    # MagCache's rule where the residual covers only the image tokens at the end of a joint sequence
    if residual.shape == hidden.shape:
        return hidden + residual
    out = hidden.clone()
    out[:, hidden.shape[1] - residual.shape[1]:] += residual
    return out


class StagedCache:
    """One denoiser's step cache under its stages (see the module docstring).

    Made at attach time from the config; :meth:`apply` registers diffusers' hooks once the
    split has traced the model (the first call); the executors run every stage task through
    :meth:`run`. For a :class:`~asyncgen.runtime.deep_cache.DeepCacheConfig` the object made is
    DeepCache's own staged form, :class:`~asyncgen.runtime.deep_cache.StagedDeepCache` (the same
    interface), so the callers need not tell the caches apart.
    """

    def __new__(cls, config, stages: Sequence = (), stride: int = 1):
        if isinstance(config, DeepCacheConfig):
            return StagedDeepCache(config, stages, stride)  # not a StagedCache: __init__ below is skipped
        return super().__new__(cls)

    def __init__(self, config, stages: Sequence, stride: int):
        check_cache_config(config)
        self.config = config
        self.kind = type(config).__name__
        self.signal = self.kind in ("FirstBlockCacheConfig", "MagCacheConfig")
        self.n_stages = len(stages)
        # a signal cache's skip adds the last stage's own residual: at stride S its replicas j > 0, which an exact
        # step leaves idle, compute the exact steps too, so each has one before its first round
        self.shadows_exact_steps = self.signal and len(stages) > 1 and stride > 1
        if self.kind == "PyramidAttentionBroadcastConfig" and stride > 1:
            raise ValueError(f"{self.kind} needs stride=1 (got stride={stride}): its state is one per attention "
                             "module, not per replica, and its timestep callback gives the round's timestep, not "
                             "the one a replica serves")
        self.stages = list(stages)
        self.managers: list[StateManager] = []
        self.signal_manager: StateManager | None = None
        self.tail_hook: _TailResidual | None = None
        self.applied = False

    # ------------------------------------------------------------------ attaching

    def apply(self, split) -> None:
        """Enable the cache on the split's denoiser, under the stage hooks (once; the model's blocks must be traced)."""
        if self.applied:
            return
        from asyncgen.placement.residency import released_restored

        denoiser = split.denoiser
        self.model_name = type(denoiser).__name__
        blocks = list(getattr(getattr(split, "trace", None), "modules", []) or [])
        if not blocks:
            raise ValueError(f"cache={self.kind} runs on transformer denoisers split by block; "
                             f"{type(denoiser).__name__} is not one")
        with released_restored(denoiser):  # hooks go on every block, released ones too (they never compute here)
            enable_step_cache(denoiser, self.config)
            modules = list(denoiser.modules())
        modules += [b for b in blocks if all(b is not m for m in modules)]
        # the cache's hooks: diffusers' own (the AsyncDiff hook on the denoiser keeps a state manager too)
        hooks = [h for m in modules for h in _hooks(m) if type(h).__module__.startswith("diffusers.")]
        seen = set()
        for hook in hooks:
            for value in vars(hook).values():
                if isinstance(value, StateManager) and id(value) not in seen:
                    seen.add(id(value))
                    self.managers.append(value)
        if self.signal:
            self._locate_head_and_tail(blocks, hooks)
        for block in blocks:  # the stage decides first whether a block computes at all
            register_outermost(block, stage_hook_of(block))
        self.applied = True

    def _locate_head_and_tail(self, blocks: list[nn.Module], hooks: list) -> None:
        def holder(pick):
            for i, block in enumerate(blocks):
                if any(pick(h) for h in _hooks(block)):
                    return i
            raise ValueError(f"{self.kind}: no block of the split holds its hook")

        head = holder(lambda h: type(h).__name__ in ("FBCHeadBlockHook", "MagCacheHeadHook"))
        tail = holder(lambda h: getattr(h, "is_tail", False))
        if self.kind == "FirstBlockCacheConfig" and getattr(blocks[tail], "context_pre_only", False):
            # diffusers' tail hook subtracts the head's text stream from the tail's, which such a block returns as None
            raise ValueError(f"{self.kind} cannot run on {self.model_name}: its last block returns no text stream "
                             "for First Block Cache's residual (diffusers' own hook fails the same way); use "
                             "TaylorSeerCacheConfig or MagCacheConfig")
        self.signal_manager = next(h.state_manager for h in _hooks(blocks[head])
                                   if type(h).__name__ in ("FBCHeadBlockHook", "MagCacheHeadHook"))
        cuts = list(itertools.accumulate(len(s.units) for s in self.stages))
        self.head_stage = next(k for k, end in enumerate(cuts) if head < end)
        self.tail_stage = next(k for k, end in enumerate(cuts) if tail < end)
        if self.n_stages > 1 and (self.head_stage != 0 or self.tail_stage != self.n_stages - 1):
            raise ValueError(f"{self.kind}: its first block is in stage {self.head_stage} and its last in stage "
                             f"{self.tail_stage}; composing it with stages needs them in the first and the last")
        if self.n_stages > 1:
            registry = HookRegistry.check_if_exists_or_initialize(blocks[tail])
            self.tail_hook = _TailResidual(*block_output_indices(blocks[tail]))
            registry.register_hook(self.tail_hook, _TAIL_HOOK)

    # ------------------------------------------------------------------ running

    def new_call(self, previous: str = "") -> str:
        """A context prefix for one call of one lane (a new call starts with fresh states); the states of the
        lane's ``previous`` call are dropped (a model without diffusers' CacheMixin is never reset by its pipeline)."""
        if previous:
            for manager in self.managers:
                forget_cache_contexts(manager, previous + "/")
        return f"asyncgen-call-{next(_calls)}"

    @contextlib.contextmanager
    def _context(self, name: str):
        saved = [(m, state_manager_context(m)) for m in self.managers]
        value = cache_context_value(name)
        for manager in self.managers:
            manager.set_context(value)
        try:
            yield
        finally:
            for manager, context in saved:
                manager.set_context(context)

    def run(self, stage, split, state: BoundaryState, cond: Any, *, call: str, replica: int, step: int) -> BoundaryState:
        """Stage ``stage`` (replica ``replica``) on ``state`` for served step ``step``, through the cache.

        A state received from the stage before carries that stage's cache message in its
        ``skips``; the state returned carries this stage's for the next (none from the last).
        """
        k, last = stage.index, self.n_stages - 1
        message = tuple(state.skips) if k > 0 and self.signal and self.n_stages > 1 else ()
        if message:
            state = BoundaryState(state.hidden, (), state.streams)
        with self._context(f"{call}/stage{k}.{replica}"):
            mend = self._set_step(step)
            if self.signal and self.n_stages > 1:
                self._before_signal(k, last, message)
            try:
                out = stage(split, state, cond)
            finally:
                if self.tail_hook is not None:
                    self.tail_hook.residuals = None
            self._first_update(mend, step)
            if self.signal and self.n_stages > 1 and k < last:
                sent = self._message(k, message)
                out = BoundaryState(out.hidden, tuple(t.to(out.hidden.dtype) for t in sent), out.streams)
        return out

    def _set_step(self, step: int) -> list:
        """Give the hooks the served step; returns the states to mend after the task (see :meth:`_first_update`)."""
        mend = []
        if self.kind == "TaylorSeerCacheConfig":
            for manager in self.managers:
                state = manager.get_state()
                state.current_step = step - 1  # the hook counts one up before deciding
                if state.last_update_step is None and not self._taylor_computes(step):
                    # nothing computed yet in this state (a stride's later replica): compute, at an index that does
                    state.current_step = self._taylor_compute_step() - 1
                    mend.append(state)
        elif self.kind == "MagCacheConfig":
            self.signal_manager.get_state().step_index = step
        return mend

    def _taylor_computes(self, step: int) -> bool:
        """TaylorSeer's own rule (``TaylorSeerCacheHook``): whether the stock cache computes at ``step``."""
        c = self.config
        return (step < c.disable_cache_before_step or (step - c.disable_cache_before_step - 1) % c.cache_interval == 0
                or (c.disable_cache_after_step is not None and step >= c.disable_cache_after_step))

    def _taylor_compute_step(self) -> int:
        c = self.config
        return 0 if c.disable_cache_before_step > 0 else c.disable_cache_before_step + 1

    @staticmethod
    def _first_update(states: list, step: int) -> None:
        # the first update made at a stand-in index: its factors are order 0 only, its step is the served one
        for state in states:
            state.current_step = state.last_update_step = step

    def _before_signal(self, k: int, last: int, message: tuple) -> None:
        state = self.signal_manager.get_state()
        if k == 0:
            if self.kind == "FirstBlockCacheConfig":
                state.tail_block_residuals = (0, 0)  # the last stage adds the real ones at the tail
            return
        flag, heads = message[0], message[1:]
        state.should_compute = bool(flag.item())
        if k != last:
            return
        if self.kind == "FirstBlockCacheConfig":
            state.head_block_output = heads[0] if len(heads) == 1 else list(heads)
            if not state.should_compute:
                hidden_res, text_res = state.tail_block_residuals
                self.tail_hook.residuals = (hidden_res, text_res)
        else:
            state.head_block_input = heads[0]
            if not state.should_compute:
                self.tail_hook.residuals = (state.previous_residual, None)

    def _message(self, k: int, received: tuple) -> tuple:
        if k > 0:
            return received
        state = self.signal_manager.get_state()
        if self.kind == "FirstBlockCacheConfig":
            heads = state.head_block_output
            heads = [heads] if isinstance(heads, torch.Tensor) else [t for t in heads[:2] if t is not None]
        else:
            heads = [state.head_block_input]
            if state.should_compute and state.previous_residual is None:
                # the head skips only after a step has computed; the real residual is the last stage's
                state.previous_residual = torch.zeros_like(state.head_block_input)
        flag = torch.ones(1, dtype=heads[0].dtype, device=heads[0].device) if state.should_compute else \
            torch.zeros(1, dtype=heads[0].dtype, device=heads[0].device)
        return (flag, *heads)


def _hooks(module: nn.Module) -> list:
    registry = hook_registry_of(module)
    return list(registry.hooks.values()) if registry is not None else []


