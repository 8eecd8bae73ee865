"""DeepCache for SD/SDXL UNets: the deep path runs every ``interval`` steps, the shallow path every step.

After Ma et al., *DeepCache: Accelerating Diffusion Models for Free* (CVPR 2024): the
high-level features a UNet's up path computes change slowly from one denoising step to
the next, while the shallow skip branch carries the detail. So on one step in
``interval`` the whole UNet runs and the feature the outermost live up block receives
from the deeper path is kept; on the steps in between only the shallow path runs
(``conv_in``, the first ``branch + 1`` down blocks' resnets and attentions, the last
``branch + 1`` up blocks with the kept feature as their input, ``conv_out``). The skip
tensors the shallow up blocks read are fresh every step; only the deep feature is
reused.

Built as ``diffusers.hooks``: :func:`apply_deep_cache` registers a stateful
:class:`DeepCacheHook` on the UNet (it counts the UNet's calls and decides, per call,
whether the deep path runs) and a :class:`DeepModuleHook` on each deep module: the
resnets, attentions and samplers of the deep down and up blocks, the mid block, and the
downsampler of the last live down block, whose output only the deep path reads (the
modules of the deep units of the UNet's split, :func:`deep_unit_mask`). On a full step a
deep module runs and keeps its output; on a cached step it returns the output it kept
without computing, so the UNet's own forward runs unchanged around it: the last deep up
module's output is the deep feature, and what the deep down modules return is read by
nothing but deep modules. The stock forward is what runs, so attention processors, LoRA
and FreeU keep working, and ``interval=1`` is the stock UNet exactly.

Each pipeline call starts with a full step. diffusers resets stateful hooks at the end of a
call only on models with its ``CacheMixin`` (transformers), not on ``UNet2DConditionModel``,
so the hook sees a new call itself: timesteps fall within a call, so a timestep larger than
the previous call's (or a sample of another shape, which the kept features would not fit)
starts afresh; this also covers a call that raised. A call whose first timestep is not
above the previous call's last (two one-step calls at the same timestep) needs
:func:`reset_deep_cache` in between. A pipeline calls an SD/SDXL UNet once per step with the
CFG halves in one batch, so one count per UNet call is one count per step (schedulers that
call the UNet twice per step, Heun's, count two).

Under AsyncDiff stages (``AsyncDiffPipeline(pipe, stages=N, cache=DeepCacheConfig(...))``)
the stage runtime calls the split's units one at a time (``asyncgen.split.unet``), and so
these very modules: :class:`StagedDeepCache` registers the same module hooks (not the UNet's
call counter, which the AsyncDiff hook never reaches) and, before each stage task, sets the
decision and which kept outputs the task uses:

* **The decision is schedule-driven, from the steps a task serves.** A stage replica runs its
  deep units when the stock DeepCache ran the deep path on a step since that replica's last
  task: on a step in (its previous served step, this one]. At stride 1 every stage serves
  every step, so this is ``step % interval == 0``, the stock decision of the step, made by
  every rank for its own units with no message. At stride S a replica serves every S-th step;
  the rule keeps its deep feature no older, in steps, than the stock cache lets it be
  (``interval - 1``), so with ``interval <= S`` every task runs the deep path.
* **Kept outputs are per (call, stage, replica)**, the context the task runs in: the last
  stage's replicas at stride S, and the two halves of CFG parallelism (each its own lane),
  keep their own. A replica that has kept nothing yet computes.
* The boundary messages are unchanged: a cached step's stage still sends its boundary state
  (the kept deep outputs where a deep unit ends the stage). With ``stages=1`` every step runs
  the whole UNet through these hooks at the stock decisions: DeepCache alone, exactly.

:func:`deep_unit_mask` says which units are deep, which is what the cost model's
composed-schedule cut chooser (:func:`asyncgen.cost.cuts.composed_cuts`) needs.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook

from asyncgen._compat import hook_original_forward, hook_registry_of

UNET_HOOK = "asyncgen_deep_cache"
MODULE_HOOK = "asyncgen_deep_cache_module"


@dataclass
class DeepCacheConfig:
    """How DeepCache runs a UNet.

    ``interval``: the deep path runs on the first step and then every ``interval``-th UNet
    call (1 = every step: the stock UNet). ``branch``: how many down/up block pairs stay
    live, minus one: with ``branch=0`` (DeepCache's cheapest setting) only the first down
    block and the last up block run on cached steps; a larger branch keeps more of the
    UNet live (slower, closer to stock).
    """

    interval: int = 3
    branch: int = 0

    def __post_init__(self):
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"DeepCacheConfig(interval={self.interval!r}): the interval must be an integer >= 1 "
                             "(1 runs the whole UNet every step)")
        if isinstance(self.branch, bool) or not isinstance(self.branch, int) or self.branch < 0:
            raise ValueError(f"DeepCacheConfig(branch={self.branch!r}): the branch must be an integer >= 0 "
                             "(0 keeps only the first down block and the last up block live)")


class DeepCacheState:
    """What the UNet's hook decided for the current call, read by every deep module's hook."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.calls = 0  # UNet calls since the last reset
        self.full = True  # whether the deep path runs in the current call
        self.last_timestep: float | None = None
        self.sample_shape: tuple | None = None
        self.full_calls = 0  # counted for reports and tests: how many calls (stage tasks) ran the deep path
        self.cached_calls = 0
        # whose kept outputs the deep modules use: None in one process, a stage task's (call, stage, replica) under
        # stages (StagedDeepCache sets it per task)
        self.context: str | None = None


def timestep_value(timestep: Any) -> float | None:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.flatten()[0]) if timestep.numel() else None
    if isinstance(timestep, (int, float)):
        return float(timestep)
    return None


class DeepCacheHook(ModelHook):
    """On the UNet: decides per call whether the deep path runs (one call in ``interval``)."""

    _is_stateful = True

    def __init__(self, config: DeepCacheConfig, state: DeepCacheState):
        super().__init__()
        self.config, self.state = config, state

    def new_forward(self, module, sample, timestep, *args, **kwargs):
        state = self.state
        t = timestep_value(timestep)
        shape = tuple(sample.shape)
        # a call that raised leaves no reset behind: timesteps fall within a call, so a larger one (or another
        # sample shape, which the kept features would not fit) starts afresh
        if state.calls and ((t is not None and state.last_timestep is not None and t > state.last_timestep)
                            or shape != state.sample_shape):
            state.reset()
        state.full = state.calls % self.config.interval == 0
        state.calls += 1
        state.last_timestep, state.sample_shape = t, shape
        if state.full:
            state.full_calls += 1
        else:
            state.cached_calls += 1
        return hook_original_forward(self)(sample, timestep, *args, **kwargs)

    def reset_state(self, module):
        self.state.reset()
        return module


class DeepModuleHook(ModelHook):
    """On a deep module: runs and keeps its output on full steps, returns the kept output on cached steps."""

    _is_stateful = True

    def __init__(self, state: DeepCacheState):
        super().__init__()
        self.state = state
        self.kept: dict[str | None, Any] = {}  # the kept output, per context (see DeepCacheState.context)

    def new_forward(self, module, *args, **kwargs):
        context = self.state.context
        if self.state.full or context not in self.kept:
            self.kept[context] = hook_original_forward(self)(*args, **kwargs)
        return self.kept[context]

    def forget(self, prefix: str) -> None:
        """Drop the outputs kept for contexts starting with ``prefix`` (a finished call's, under stages)."""
        for context in [c for c in self.kept if c is not None and c.startswith(prefix)]:
            del self.kept[context]

    def reset_state(self, module):
        self.kept.clear()  # the kept tensors go with the call
        return module


def deep_modules(unet: torch.nn.Module, branch: int) -> list[tuple[str, torch.nn.Module]]:
    """``(unit name, module)`` of the modules that run only on full steps.

    They are the modules of the deep units of the UNet's split (:mod:`asyncgen.split.unet`;
    :func:`deep_unit_mask`): with ``B`` down blocks and ``branch = b``, the downsamplers of
    ``down_blocks[b]``, the resnets, attentions and samplers of ``down_blocks[b+1:]`` and
    ``up_blocks[:B-1-b]`` (a block of another type whole), and the mid block. The output of
    ``up_blocks[B-2-b]``'s last module is the deep feature ``up_blocks[B-1-b]`` receives.
    Hooking the units' own modules, not whole blocks, makes the same hooks work where the
    UNet runs as its stock forward (the blocks call these modules) and where a stage
    runtime calls the units one by one.
    """
    from asyncgen.split.unet import UNetSplit

    if not isinstance(unet, UNetSplit.handles):
        raise TypeError(f"DeepCache needs a UNet2DConditionModel (SD, SDXL); {type(unet).__name__} is not one")
    check_branch(unet, branch)
    units = UNetSplit(unet).build_units()
    mask = deep_unit_mask([u.name for u in units], len(unet.down_blocks), branch)
    return [(unit.name, module) for unit, deep in zip(units, mask) if deep for module in unit.modules]


def check_branch(unet: torch.nn.Module, branch: int) -> None:
    """Refuse a branch the UNet has no live blocks for, naming the range it has."""
    blocks = len(unet.down_blocks)
    if not 0 <= branch < blocks:
        raise ValueError(f"DeepCacheConfig(branch={branch}): this {type(unet).__name__} has {blocks} down blocks, "
                         f"so the branch must be between 0 and {blocks - 1}")


def apply_deep_cache(unet: torch.nn.Module, config: DeepCacheConfig) -> DeepCacheHook:
    """Register DeepCache on ``unet`` (the pipeline's own module); returns the UNet's hook (its ``state`` counts calls).

    Refuses a UNet that already has one (remove it first with :func:`remove_deep_cache`).
    """
    if not isinstance(config, DeepCacheConfig):
        raise TypeError(f"apply_deep_cache needs a DeepCacheConfig, got {type(config).__name__}")
    if deep_cache_hook(unet) is not None:
        raise ValueError(f"{type(unet).__name__} already has DeepCache; remove_deep_cache(unet) before applying another")
    modules = deep_modules(unet, config.branch)  # checks the UNet before anything is registered
    state = DeepCacheState()
    for _, module in modules:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(DeepModuleHook(state), MODULE_HOOK)
    hook = DeepCacheHook(config, state)
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(hook, UNET_HOOK)
    return hook


def deep_cache_hook(unet: torch.nn.Module) -> DeepCacheHook | None:
    """The DeepCache hook registered on ``unet``, or None."""
    return HookRegistry.check_if_exists_or_initialize(unet).get_hook(UNET_HOOK)


def reset_deep_cache(unet: torch.nn.Module) -> None:
    """Forget the kept features: the next call of ``unet`` runs the deep path (nothing happens without DeepCache)."""
    hook = deep_cache_hook(unet)
    if hook is not None:
        hook.state.reset()


def remove_deep_cache(unet: torch.nn.Module) -> None:
    """Remove DeepCache's hooks from ``unet`` and its modules (nothing happens where there are none)."""
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    registry.remove_hook(UNET_HOOK, recurse=False)
    registry.remove_hook(MODULE_HOOK, recurse=True)


def enabled_deep_cache(unet: torch.nn.Module) -> DeepCacheConfig | None:
    """The config of the DeepCache :func:`apply_deep_cache` registered on ``unet``, or None (no hook registry is
    created on a model that has none)."""
    registry = hook_registry_of(unet)
    hook = registry.get_hook(UNET_HOOK) if registry is not None else None
    return hook.config if hook is not None else None


_calls = itertools.count()


class StagedDeepCache:
    """DeepCache under AsyncDiff stages: the module hooks on the split's deep units, a decision and a context per
    stage task (the module docstring says which). Made by ``StagedCache(config, stages, stride)``
    (:mod:`asyncgen.runtime.step_cache`) for a :class:`DeepCacheConfig`, with the same interface the executors
    use: :meth:`new_call` at a call's start, :meth:`run` for every stage task.
    """

    kind = "DeepCacheConfig"
    signal = False
    shadows_exact_steps = False  # no replica needs the exact steps: one that has kept nothing computes

    def __init__(self, config: DeepCacheConfig, stages: Sequence, stride: int):
        if not isinstance(config, DeepCacheConfig):
            raise TypeError(f"StagedDeepCache needs a DeepCacheConfig, got {type(config).__name__}")
        self.config, self.stages, self.stride = config, list(stages), stride
        self.n_stages = len(self.stages)
        self.state = DeepCacheState()  # read by every deep module's hook; counts this process's tasks
        self.hooks: list[DeepModuleHook] = []
        self.served: dict[str, int] = {}  # context -> the step its last task served
        self.applied = False

    def apply(self, split) -> None:
        """Register the module hooks on the deep units of ``split`` (a UNet's; once)."""
        if self.applied:
            return
        from asyncgen.split.unet import UNetSplit

        unet = split.denoiser
        if not isinstance(split, UNetSplit):
            raise ValueError(f"cache=DeepCacheConfig runs on SD/SDXL UNets (UNet2DConditionModel); "
                             f"{type(unet).__name__} is not one")
        check_branch(unet, self.config.branch)
        mask = deep_unit_mask([u.name for u in split.units], len(unet.down_blocks), self.config.branch)
        for unit, deep in zip(split.units, mask):
            for module in unit.modules if deep else ():
                hook = DeepModuleHook(self.state)
                HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, MODULE_HOOK)
                self.hooks.append(hook)
        self.applied = True

    def new_call(self, previous: str = "") -> str:
        """A context prefix for one call of one lane; what the lane's ``previous`` call kept is dropped."""
        if previous:
            for hook in self.hooks:
                hook.forget(previous + "/")
            self.served = {c: s for c, s in self.served.items() if not c.startswith(previous + "/")}
        self.state.full_calls = self.state.cached_calls = 0  # the counts are the latest call's
        return f"asyncgen-deep-call-{next(_calls)}"

    def full(self, context: str, step: int) -> bool:
        """Whether the task of ``context`` serving ``step`` runs the deep path: the stock cache did on a step since
        that context's last task (the first task of a context always does)."""
        previous = self.served.get(context)
        interval = self.config.interval
        # a multiple of the interval in (previous, step]; a step served again (never, in a schedule) recomputes
        return previous is None or step <= previous or step // interval > previous // interval

    def run(self, stage, split, state, cond: Any, *, call: str, replica: int, step: int):
        """Stage ``stage`` (replica ``replica``) on ``state`` for served step ``step``, deep units through the cache."""
        self.apply(split)  # the first task: the split is the traced one the runtime runs
        context = f"{call}/stage{stage.index}.{replica}"
        full = self.full(context, step)
        self.served[context] = step
        self.state.context, self.state.full = context, full
        if full:
            self.state.full_calls += 1
        else:
            self.state.cached_calls += 1
        try:
            return stage(split, state, cond)
        finally:
            self.state.context, self.state.full = None, True


_UNIT = re.compile(r"(down|up)(\d+)(?:\.(resnet|attn|sample)\d*)?")


def deep_unit_mask(unit_names: Sequence[str], blocks: int, branch: int) -> list[bool]:
    """For each unit of a UNet split (``asyncgen.split.unet`` names), whether it is deep (runs only on full steps).

    ``blocks`` is the UNet's number of down (= up) blocks. Deep: ``down{b}.sample`` (the
    downsampler of the last live down block), ``down{j}.*`` for ``j > b``, ``mid``, and
    ``up{j}.*`` for ``j < blocks-1-b``; ``conv_in``, the live blocks' units and ``conv_out``
    run every step. The mask is what :func:`deep_modules` hooks, unit by unit.
    """
    if not 0 <= branch < blocks:
        raise ValueError(f"branch={branch}: a UNet of {blocks} down blocks takes a branch between 0 and {blocks - 1}")
    mask = []
    for name in unit_names:
        if name in ("conv_in", "conv_out"):
            mask.append(False)
            continue
        if name == "mid":
            mask.append(True)
            continue
        match = _UNIT.fullmatch(name)
        if match is None:
            raise ValueError(f"unit {name!r} is not a UNet split's unit (conv_in, downB.resnetI, downB.attnI, "
                             "downB.sample, downB, mid, upB..., conv_out)")
        kind, block, part = match.group(1), int(match.group(2)), match.group(3)
        if kind == "down":
            mask.append(block > branch or (block == branch and part == "sample"))
        else:
            mask.append(block < blocks - 1 - branch)
    return mask


def deep_cache_runs(deep_mask: Sequence[bool], steps: int, interval: int, first: int = 0) -> list[list[bool]]:
    """Which units run on each of ``steps`` steps: all on every ``interval``-th step, the shallow ones on the others.

    ``deep_mask`` from :func:`deep_unit_mask`; ``first`` is the step index of the first
    row (the steps after an exact warm-up start later in the count). The rows are what
    :func:`asyncgen.cost.cuts.composed_cuts` takes.
    """
    return [[True] * len(deep_mask) if (first + t) % interval == 0 else [not deep for deep in deep_mask]
            for t in range(steps)]
