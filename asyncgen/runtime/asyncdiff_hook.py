"""The AsyncDiff schedule attached to a pipeline's own denoiser, as a ``diffusers.hooks`` hook.

The stock pipeline keeps calling ``self.unet(latents, t, ...)`` once per step. An
:class:`AsyncDiffHook` registered on that denoiser (``HookRegistry``, like diffusers' caches)
replaces its forward: each call becomes the schedule's work for this rank (an exact step,
a round, or a prediction cached from the round) and returns what the denoiser would
return. The denoiser stays ``pipe.unet``: its config, attention setters and LoRA methods
are its own. The progress of one call lives in an :class:`AsyncDiffLane` (a
``diffusers.hooks`` state with ``reset()``); a pipeline that runs several denoiser passes
per step (named with ``cache_context``, or unnamed on the same latents) gets a lane per pass.
This module must not load, split, place or wrap anything: it runs what it is given.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.hooks.hooks import BaseState, StateManager  # not re-exported by diffusers.hooks (0.40-0.42)
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

from asyncgen.schedules.cfg_parallel import batch_part
from asyncgen.schedules.asyncdiff import AsyncSchedule, StepKind, Topology
from asyncgen.split.units import DenoiserSplit

from .scoped_hook import ScopedHook, hooks_of

#: the name the hook is registered under in a denoiser's ``HookRegistry`` (a from_pipe sibling adds its number)
HOOK_NAME = "asyncgen_asyncdiff"


def default_warmup(total_steps: int | None) -> int:
    """Exact steps when the user gives none: 5% of the steps, at least one.

    The earliest steps move the latent the most, so stale inputs hurt there most; a few
    exact steps buy most of the quality back for little time.
    """
    if total_steps is None:
        return 1
    return max(1, math.ceil(0.05 * total_steps))


def _timestep_value(t: Any) -> float:
    return float(torch.as_tensor(t).reshape(-1)[0].item())


def _simplest(value: float, error: float) -> float:
    """The number with the fewest significant digits within ``error`` of ``value`` (``value`` itself if none)."""
    if value == 0 or error <= 0:
        return value
    for digits in range(1, 16):
        candidate = float(f"{value:.{digits - 1}e}")
        if abs(candidate - value) <= error:
            return candidate
    return value


@dataclass(frozen=True)
class TimestepMap:
    """How a pipeline turns its scheduler's timestep ``s`` into the one it passes its denoiser.

    ``(sign * s + offset) / divisor``, computed in the passed timestep's dtype: SD passes
    ``s`` itself, Flux ``s / 1000``, ZImage ``(1000 - s) / 1000``; with ``shift_first=False``
    it is scaled first, ``offset / divisor + sign * s / divisor`` (Lumina2's ``1 - s / 1000``).
    Doing the pipelines' own operations in their own dtype gives their values bit for bit.
    ``assumed``: learnt from a single step, where only a rescaling could be told (see
    :func:`learn_timestep_map`).
    """

    sign: int = 1
    offset: float = 0.0
    divisor: float = 1.0
    assumed: bool = False
    shift_first: bool = True

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        if self.divisor == 1.0:
            return x
        multiplier = round(1.0 / self.divisor)
        # a pipeline that scales up multiplies (s * 1000), one that scales down divides (s / 1000)
        up = multiplier > 1 and math.isclose(multiplier * self.divisor, 1.0, rel_tol=1e-12)
        return x * multiplier if up else x / self.divisor

    def __call__(self, scheduled: torch.Tensor) -> torch.Tensor:
        if not self.shift_first and self.offset:
            x = self._scaled(scheduled)
            return self.offset / self.divisor + (x if self.sign > 0 else -x)
        x = scheduled if self.sign > 0 else -scheduled
        if self.offset:
            x = self.offset + x
        return self._scaled(x)

    def describe(self) -> str:
        s = "s" if self.sign > 0 else "-s"
        if self.offset and not self.shift_first:
            return f"{self.offset / self.divisor:g} {'+' if self.sign > 0 else '-'} s / {self.divisor:g}"
        if self.offset:
            s = f"({s} + {self.offset:g})"
        return f"{s} / {self.divisor:g}" if self.divisor != 1.0 else s


def learn_timestep_map(scheduled: list[float], passed: list[float], resolution: float,
                       dtype: torch.dtype = torch.float64) -> TimestepMap | None:
    """The simplest :class:`TimestepMap` that takes ``scheduled[i]`` to ``passed[i]`` for every step seen.

    ``resolution`` is the relative precision of the passed values (a few units in the last
    place of their dtype). The simplest means: the identity, else a rescaling by step 0's
    ratio, else the affine map through the first step and the one farthest from it, its
    divisor and offset rounded to the fewest significant digits the observations allow (a
    pipeline's constants are round numbers: 1000, not 999.99994). From one step only a
    rescaling can be told (``assumed``); ``None`` when no map fits, or one step is not a rescaling.
    An affine map is shifted then scaled (ZImage) unless only scaling first gives the steps
    seen bit for bit in ``dtype`` (Lumina2); where both do, the two orders differ by at most a
    unit in the last place on the steps to come.
    """
    scale = max(max(abs(p) for p in passed), 1e-30)
    tolerance = resolution * scale

    def fits(candidate: TimestepMap) -> bool:
        got = candidate(torch.tensor(scheduled, dtype=torch.float64)).tolist()
        return all(abs(g - p) <= tolerance + 1e-5 * abs(p) for g, p in zip(got, passed))

    (s0, p0) = scheduled[0], passed[0]
    if all(s == p for s, p in zip(scheduled, passed)):
        return TimestepMap(assumed=len(scheduled) == 1)
    if s0 != 0 and p0 != 0:
        ratio = s0 / p0
        # p0's own rounding bounds the ratio's error
        proportional = TimestepMap(divisor=_simplest(ratio, abs(ratio) * (tolerance / abs(p0))))
        if len(scheduled) == 1:
            return TimestepMap(divisor=proportional.divisor, assumed=True)
        if fits(proportional):
            return proportional
    far = max(range(len(scheduled)), key=lambda i: abs(scheduled[i] - s0))
    if far == 0 or scheduled[far] == s0:
        return None  # one step (or several at one timestep) that is not a rescaling
    slope = (passed[far] - p0) / (scheduled[far] - s0)
    if slope == 0:
        return None
    slope_error = 2 * tolerance / abs(scheduled[far] - s0)
    sign = 1 if slope > 0 else -1
    divisor = _simplest(1 / abs(slope), slope_error / slope ** 2)
    offset = p0 * divisor - sign * s0
    offset = _simplest(offset, tolerance * divisor + abs(offset) * 1e-12)
    affine = TimestepMap(sign=sign, offset=offset, divisor=divisor)
    if not fits(affine):
        return None
    exact = torch.tensor(passed, dtype=dtype)
    if not torch.equal(affine(torch.tensor(scheduled, dtype=dtype)), exact):
        scaled_first = TimestepMap(sign=sign, offset=offset, divisor=divisor, shift_first=False)
        if torch.equal(scaled_first(torch.tensor(scheduled, dtype=dtype)), exact):
            return scaled_first
    return affine


def _resolution(timestep: Any) -> float:
    """The relative precision of a passed timestep: a few units in the last place of its dtype (0 for integers)."""
    dtype = timestep.dtype if isinstance(timestep, torch.Tensor) else torch.float64
    if not dtype.is_floating_point:
        return 0.0
    return 4 * torch.finfo(dtype).eps


def _on_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` (on the host) copied to ``device`` once; from pinned memory to CUDA, so the host does not wait."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


class PassName(StateManager):
    """Learns the name a pipeline gives the current denoiser pass with ``denoiser.cache_context(name)``.

    diffusers hands the context to every ``StateManager`` of a stateful hook (a name up to
    0.41, a ``CacheContext`` from 0.42 on) and clears it when the pass ends; ``name`` is
    ``None`` outside a named pass (SD and SDXL pipelines name none).
    """

    def __init__(self):
        super().__init__(BaseState)
        self.name: str | None = None

    def set_context(self, context) -> None:
        super().set_context(context)
        self.name = getattr(context, "name", context)


class AsyncDiffLane(BaseState):
    """One denoiser pass's progress through one pipeline call: its schedule, step, predictions made ahead.

    The lane owns an executor (the serial simulator, or this rank's distributed runtime),
    so two passes' stale boundary states never mix. ``reset()`` settles the call's
    transfers and forgets its steps.
    """

    def __init__(self, hook: "AsyncDiffHook", executor):
        self.hook, self.executor = hook, executor
        self.split, self.topology, self.cfg_parts = hook.split, hook.topology, hook.cfg_parts
        self.reset()

    @property
    def started(self) -> bool:
        return self._started

    def reset(self) -> None:
        """Start a new pipeline call: settle the previous call's transfers, forget its steps."""
        if getattr(self, "_started", False):
            self.executor.end_call()
            self._check_timesteps()
        self._last_sample: torch.Tensor | None = None  # held, so its id cannot be reused by a later latent
        self._last_timestep: Any = None
        self._unnamed_pass = 0
        self._started = False
        self._step = 0
        self._total: int | None = None
        self._timesteps: dict[int, Any] = {}  # as passed by the pipeline: this step's and the one before
        self._looked_up: dict[int, float] = {}  # timesteps taken from the scheduler ahead of time
        self._unchecked: list[tuple[int, torch.Tensor, float]] = []  # CUDA timesteps checked at the call's end
        self._predictions: dict[int, torch.Tensor] = {}
        self._scheduled: torch.Tensor | None = None  # the scheduler's timesteps from this call's first step on (host)
        self._observed: list[Any] = []  # the timesteps passed at this call's steps, until the map is learnt
        self._map: TimestepMap | None = None
        self._tolerance = 0.0  # the check's absolute tolerance: the passed dtype's precision at their scale
        self._upcoming = None  # the scheduled timesteps as the pipeline will pass them (host), once learnt
        self._upcoming_on: torch.Tensor | None = None  # the same on the pipeline's timestep device
        self.schedule: AsyncSchedule | None = None

    def _begin(self, sample: torch.Tensor, timestep: Any) -> None:
        if sample.shape[0] % self.cfg_parts:
            # the halves are independent, so any even batch splits correctly; CFG doubles it
            raise ValueError(
                f"cfg_parallel=True splits the denoiser's batch in two, but this call's batch is {sample.shape[0]}; "
                "use classifier-free guidance (guidance_scale > 1) or an even num_images_per_prompt"
            )
        for other in self.hook.takes_turns_with:
            if other.started:
                other.reset_lanes()
        scheduler = self.hook.scheduler()
        timesteps = getattr(scheduler, "timesteps", None)
        # One stage at stride 1 computes every step whole from the pipeline's own arguments:
        # it needs no step count and no timestep ahead, so it skips the lookup, which
        # would copy the scheduler's timesteps to the host (a GPU sync per call).
        needs_lookup = self.topology.stages > 1 or self.topology.stride > 1
        if needs_lookup and timesteps is not None and len(timesteps):
            timesteps = torch.as_tensor(timesteps).cpu()
            # a denoiser taking over mid-call (Wan 2.2's second expert) starts at the scheduler's current step
            begin = getattr(scheduler, "step_index", None)
            if begin is None:
                begin = getattr(scheduler, "begin_index", None)
            if begin is None:
                hits = (timesteps == _timestep_value(timestep)).nonzero()
                begin = int(hits[0]) if len(hits) else None
            if begin is None and getattr(scheduler, "step_index", 0) is None:
                # a converted timestep (Lumina2's 1 - t/1000) matches none, and the scheduler has not stepped in
                # this call (set_timesteps resets step_index), so the call starts at its first step; older
                # pipelines set no begin index (diffusers 0.40's Lumina2). Each step looked up is still checked
                # against the one passed when the pipeline gets there.
                begin = 0
            if begin is not None:
                # what the pipeline passes is learnt from the steps it takes, when the first look-ahead needs it
                self._scheduled = timesteps[begin:]
                self._total = len(self._scheduled)
        warmup = self.hook.warmup if self.hook.warmup is not None else default_warmup(self._total)
        self.schedule = AsyncSchedule(self.topology, warmup, self.hook.time_shift)
        self.executor.begin_call(self.schedule)
        self._started = True

    def _learn_map(self, step: int) -> None:
        """Learn how the pipeline converts its scheduler's timesteps from the steps passed so far (one sync)."""
        steps = range(min(len(self._observed), len(self._scheduled)))
        scheduled = [float(self._scheduled[i]) for i in steps]
        passed = [_timestep_value(self._observed[i]) for i in steps]
        like = self._observed[0]
        dtype = like.dtype if isinstance(like, torch.Tensor) else torch.float64
        timestep_map = learn_timestep_map(scheduled, passed, _resolution(like), dtype)
        if timestep_map is None:
            pairs = ", ".join(f"{s:g} -> {p:g}" for s, p in zip(scheduled, passed))
            raise RuntimeError(
                f"{self._needs(step)}: the pipeline passes its denoiser timesteps that are no affine map of its "
                f"scheduler's (scheduler -> passed: {pairs})"
                + ("; a map other than a rescaling is learnt from two steps: use warmup >= 1"
                   if len(passed) == 1 else "")
            )
        self._map = timestep_map
        scheduled_all = self._scheduled
        if (timestep_map.sign, timestep_map.offset, timestep_map.divisor) != (1, 0.0, 1.0):
            # the pipeline's operations in the passed dtype (the identity keeps the scheduler's values and dtype)
            scheduled_all = scheduled_all.to(dtype)
        self._upcoming = timestep_map(scheduled_all)
        if self._upcoming.numel():
            self._tolerance = _resolution(like) * float(self._upcoming.abs().max())

    def _needs(self, step: int) -> str:
        return (f"stages {self.topology.stages} at stride {self.topology.stride} need the timestep of step {step} "
                "before the pipeline reaches it")

    def _timestep_of(self, step: int, like: Any) -> Any:
        if step in self._timesteps:
            return self._timesteps[step]
        if self._scheduled is None or step >= len(self._scheduled):
            raise RuntimeError(
                f"stride {self.topology.stride} needs the timestep of step {step} before the pipeline reaches it, "
                "but the pipeline's scheduler does not list it (custom timesteps?); use stride=1"
            )
        if self._upcoming is None:
            self._learn_map(step)
        value = self._upcoming[step]
        self._looked_up[step] = float(value)
        if isinstance(like, torch.Tensor):
            if self._upcoming_on is None or self._upcoming_on.device != like.device:
                self._upcoming_on = _on_device(self._upcoming, like.device)  # once per call
            return self._upcoming_on[step].to(dtype=like.dtype).expand_as(like)
        return type(like)(value.item())

    def _check_timestep(self, step: int, timestep: Any) -> None:
        """The pipeline's timestep of ``step`` must be the one looked up ahead for it.

        Reading a CUDA timestep would make the host wait for the GPU every step; those
        are compared on the device and read once, when the call ends.
        """
        expected = self._looked_up.pop(step)
        if isinstance(timestep, torch.Tensor) and timestep.device.type == "cuda":
            self._unchecked.append((step, timestep.reshape(-1)[0], expected))
        elif not math.isclose(expected, _timestep_value(timestep), rel_tol=1e-5, abs_tol=self._tolerance):
            self._timesteps_changed(step, _timestep_value(timestep), expected)

    def _check_timesteps(self) -> None:
        unchecked, self._unchecked = self._unchecked, []
        if not unchecked:
            return
        passed = torch.stack([t.double() for _, t, _ in unchecked])
        expected = torch.tensor([e for _, _, e in unchecked], dtype=torch.float64, device=passed.device)
        wrong = (~torch.isclose(passed, expected, rtol=1e-5, atol=self._tolerance)).nonzero().flatten().tolist()
        if wrong:  # one sync per call
            self._timesteps_changed(unchecked[wrong[0]][0], float(passed[wrong[0]]), float(expected[wrong[0]]))

    def _timesteps_changed(self, step: int, value: float, expected: float):
        if self._map is not None and self._map.assumed:
            raise RuntimeError(
                f"step {step} was predicted ahead for timestep {expected:g}, taking the pipeline's timesteps for "
                f"its scheduler's rescaled ({self._map.describe()}, from step 0 alone), but the pipeline passed "
                f"{value:g}: with warmup=0 the map is learnt from one step; use warmup >= 1"
            )
        raise RuntimeError(
            f"step {step} was predicted ahead for a timestep the pipeline does not use now "
            f"({value}); the scheduler's timesteps changed during the call"
        )

    @contextlib.contextmanager
    def _lora_scale(self, arguments: dict):
        # what diffusers' denoiser forwards do for `cross_attention_kwargs={"scale": s}` (or joint_...)
        name = self.split.lora_kwargs_name
        kwargs = arguments.get(name)
        scale = 1.0
        if kwargs is not None and "scale" in kwargs:
            kwargs = dict(kwargs)
            scale = kwargs.pop("scale")
            arguments[name] = kwargs
        if USE_PEFT_BACKEND:
            scale_lora_layers(self.split.denoiser, scale)
        try:
            yield
        finally:
            if USE_PEFT_BACKEND:
                unscale_lora_layers(self.split.denoiser, scale)

    # ---------------------------------------------------------------- forward

    def forward(self, arguments: dict, unnamed_pass: Callable[[str], "AsyncDiffLane"] | None = None):
        """One denoiser call of the pipeline, its arguments bound by name; returns what the denoiser would."""
        if unnamed_pass is not None:
            # A pipeline may run a further pass per step without naming it (Lumina2: cond, then uncond, on the
            # same latents, no cache_context): a call on the very latent tensor of the call before, at the same
            # timestep, is that step's next pass (a step's scheduler update makes a new tensor), a lane of its own.
            sample, timestep = arguments[self.split.sample_argument], arguments[self.split.timestep_argument]
            if sample is self._last_sample and (timestep is self._last_timestep or
                                                _timestep_value(timestep) == _timestep_value(self._last_timestep)):
                self._unnamed_pass += 1
                return unnamed_pass(f"pass {self._unnamed_pass}").forward(arguments)
            self._last_sample, self._last_timestep, self._unnamed_pass = sample, timestep, 0
        return_dict = arguments.pop("return_dict", True)
        sample, timestep = arguments.pop(self.split.sample_argument), arguments.pop(self.split.timestep_argument)
        # a forward that takes per-sample lists (ZImage): the schedule and the wire carry one batch tensor
        sample = self.split.sample_tensor(sample)
        if self._started and self._total is not None and self._step >= self._total:
            self.reset()  # the stock pipeline was called again without the wrapper
        if not self._started:
            self._begin(sample, timestep)
        step = self._step
        self._step += 1
        self._timesteps[step] = timestep
        if self._scheduled is not None and self._upcoming is None:
            self._observed.append(timestep)  # read (a sync on a GPU) only when a look-ahead needs the map
        # the oldest conditioning a task can use is the previous step's (time_shift)
        self._timesteps.pop(step - 2, None)
        if step in self._looked_up:
            self._check_timestep(step, timestep)

        if self.schedule.kind(step) is StepKind.CACHED:
            return self.split.wrap_output(self._predictions.pop(step), return_dict)

        conds: dict[tuple, Any] = {}

        def cond_at(m: int, part: int | None = None):
            # ``part``: which half of a CFG-parallel batch the conditioning is for
            if (m, part) not in conds:
                t = self._timestep_of(m, timestep)
                x, args = sample, arguments
                if part is not None:
                    # a split may know arguments laid out per frame (AnimateDiff repeats the prompt per frame)
                    part_of = getattr(self.split, "batch_part", batch_part)
                    x, t, args = part_of((sample, t, arguments), part, self.cfg_parts, sample.shape[0])
                conds[(m, part)] = self.split.conditioning(x, t, **args)
            return conds[(m, part)]

        with torch.no_grad(), self._lora_scale(arguments):
            predictions = self.executor.run_step(step, self._total, sample, cond_at)
        self._predictions.update(predictions)
        return self.split.wrap_output(self._predictions.pop(step), return_dict)


class AsyncDiffHook(ScopedHook):
    """Runs a denoiser's calls through the AsyncDiff schedule (see the module docstring).

    Registered by :func:`asyncgen.pipelines.apply_asyncdiff`. ``split`` is the denoiser's
    split, ``new_executor`` makes the executor of one lane (this rank's stage, or the serial
    simulator of every stage), ``scheduler`` returns the pipeline's current scheduler (for
    the timesteps a stride or a round needs ahead). With ``scoped=True`` the hook works only
    inside :meth:`active` and passes every other call to the denoiser's own forward: a
    ``from_pipe`` sibling shares its denoiser with a pipeline that must stay stock.
    """

    _is_stateful = True

    def __init__(self, split: DenoiserSplit | None, new_executor: Callable[[], Any] | None, topology: Topology,
                 warmup: int | None, time_shift: bool, scheduler: Callable[[], Any], cfg_parts: int = 1,
                 scoped: bool = False, resident: list[torch.nn.Module] | None = None,
                 first_call: Callable[["AsyncDiffHook", dict], None] | None = None,
                 denoiser: torch.nn.Module | None = None):
        super().__init__(scoped)
        self.topology, self.cfg_parts = topology, cfg_parts
        self.warmup, self.time_shift, self.scheduler = warmup, time_shift, scheduler
        self.passes = PassName()  # diffusers sets the pipeline's cache_context on it
        # ``first_call(hook, arguments)`` runs once, on the first call's arguments, before its first step: the
        # attach takes the pipeline's real call as the split's example there (or, with ``split=None``, splits there
        # and hands the split over with ``take_split``)
        self._first_call = first_call
        self._signature = inspect.signature((split.denoiser if split is not None else denoiser).forward)
        self.split: DenoiserSplit | None = None
        self.main: AsyncDiffLane | None = None
        self.resident = [denoiser] if denoiser is not None else []
        if split is not None:
            self.take_split(split, new_executor, resident)
        self.lanes: dict[str, AsyncDiffLane] = {}
        self._main_pass: str | None = None
        # Hooks of the pipeline's other denoisers (Wan 2.2's two experts) that take turns within one call
        self.takes_turns_with: list[AsyncDiffHook] = []
        self._running = False

    def take_split(self, split: DenoiserSplit, new_executor: Callable[[], Any],
                   resident: list[torch.nn.Module] | None = None) -> None:
        """The split to run, the maker of a lane's executor, and the modules this rank computes with."""
        # the modules this rank computes with (its stage and the shared ones; every stage in the simulator)
        self.resident = resident if resident is not None else [split.denoiser]
        self.split, self.new_executor = split, new_executor
        # The first pass of a call runs on the main lane; each further pass name its own (Wan, HunyuanVideo and
        # Flux true CFG run "cond" then "uncond" every step)
        self.main = AsyncDiffLane(self, new_executor())

    # ------------------------------------------------------------ the hook's life

    def share_calls_with(self, others: list["AsyncDiffHook"]) -> None:
        """``others`` are hooks of denoisers the pipeline switches to and from during a call (Wan 2.2's experts).

        The switch is treated like the start of a call: when this denoiser takes its first step,
        every other one that has started is reset (its transfers settled, its steps
        forgotten), and this one starts its own schedule with its own warm-up. A stale
        boundary state of one expert is never an input of the other (they are different
        networks), and an expert's first step has no earlier state of its own to use.
        """
        self.takes_turns_with = [o for o in others if o is not self]

    @property
    def started(self) -> bool:
        if self.main is None:
            return False
        return self.main.started or any(lane.started for lane in self.lanes.values())

    def reset_lanes(self) -> None:
        """Start a new call: every lane settles its transfers and forgets its steps."""
        if self.main is None:
            return  # split at the first call: nothing ran yet
        self.main.reset()
        for lane in self.lanes.values():
            lane.reset()
        self._main_pass = None

    def reset_state(self, module):
        # diffusers calls this at the end of every pipeline call (maybe_free_model_hooks), for models with caches
        self.reset_lanes()
        return module

    @contextlib.contextmanager
    def stock_forward(self):
        """A context in which the denoiser's calls run its own forward (what measures the model runs it)."""
        running, self._running = self._running, True
        try:
            yield
        finally:
            self._running = running

    # ------------------------------------------------------------- what it shows

    @property
    def executor(self):
        """The main lane's executor: the first pass of every call runs on it (``None`` before a deferred split)."""
        return self.main.executor if self.main is not None else None

    def resident_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters this rank computes with, each once (a from_pipe sibling's denoiser keeps the others)."""
        return list({id(p): p for m in self.resident for p in m.parameters()}.values())

    @property
    def schedule(self) -> AsyncSchedule | None:
        """The main lane's schedule in the call that runs now (``None`` between calls)."""
        return self.main.schedule if self.main is not None else None

    # ------------------------------------------------------------------ forward

    def _lane(self, name: str) -> AsyncDiffLane:
        if name not in self.lanes:
            self.lanes[name] = AsyncDiffLane(self, self.new_executor())
        return self.lanes[name]

    def new_forward(self, module, *args, **kwargs):
        if self._running or not self.in_scope:
            # a stage runs the model's own forward inside this one (block splits), or a scoped hook outside its scope
            return self.wrapped_forward(*args, **kwargs)
        arguments = dict(self._signature.bind(*args, **kwargs).arguments)
        if self._first_call is not None:
            self._running = True  # the split's tracing and checks run the denoiser's own forward
            try:
                self._first_call(self, dict(arguments))
            finally:
                self._running = False
            self._first_call = None  # done (a refusal raises again on the next call)
        name = self.passes.name
        if name is not None and self._main_pass is None:
            self._main_pass = name
        self._running = True
        try:
            if name is not None and name != self._main_pass:
                return self._lane(name).forward(arguments)
            return self.main.forward(arguments, unnamed_pass=self._lane if name is None else None)
        finally:
            self._running = False


def asyncdiff_hooks(module) -> list[AsyncDiffHook]:
    """The AsyncDiff hooks registered on ``module`` (none for a stock denoiser)."""
    return hooks_of(module, AsyncDiffHook)
