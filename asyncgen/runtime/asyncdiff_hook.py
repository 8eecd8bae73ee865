"""A module that stands in for a pipeline's denoiser and runs the asynchronous schedule.

The stock pipeline keeps calling ``self.unet(latents, t, ...)`` once per step; the proxy
counts those calls, turns each into the schedule's work for this rank (an exact step, a
round, or a prediction cached from the round) and returns what the denoiser would
return. It registers only the modules this rank keeps, so ``parameters()`` is exactly
the rank's resident weights; any other attribute (``config``, ``add_embedding``,
attention-processor setters, ...) is looked up on the wrapped denoiser.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Callable

import torch
from torch import nn

from asyncgen.schedules.cfg_parallel import batch_part
from asyncgen.schedules.asyncdiff import AsyncSchedule, StepKind, Topology
from asyncgen.split.units import DenoiserSplit

try:  # LoRA scaling moved around between diffusers releases; absent means no PEFT backend
    from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
except ImportError:  # pragma: no cover
    USE_PEFT_BACKEND = False


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


def _on_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` (on the host) copied to ``device`` once; from pinned memory to CUDA, so the host does not wait."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


class StagedDenoiser(nn.Module):
    def __init__(
        self,
        split: DenoiserSplit,
        resident: list[nn.Module],
        executor,
        topology: Topology,
        warmup: int | None,
        time_shift: bool,
        scheduler: Callable[[], Any],
        cfg_parts: int = 1,
        new_executor: Callable[[], Any] | None = None,
    ):
        super().__init__()
        # not registered as a submodule: its other stages' weights are gone on this rank
        object.__setattr__(self, "_denoiser", split.denoiser)
        unique: list[nn.Module] = []
        for module in resident:
            if all(module is not m for m in unique):
                unique.append(module)
        self.resident = nn.ModuleList(unique)
        self.split, self.executor, self.topology = split, executor, topology
        self.warmup, self.time_shift, self._scheduler = warmup, time_shift, scheduler
        self.cfg_parts = cfg_parts
        self._signature = inspect.signature(split.denoiser.forward)
        # Pipelines that call the denoiser more than once per step (Wan, HunyuanVideo and Flux true CFG: "cond" then
        # "uncond") name each pass with cache_context. Each further pass is a lane of its own: a proxy with its own
        # executor and schedule, so the passes' stale boundary states never mix.
        self._new_executor = new_executor
        self._lanes: dict[str, StagedDenoiser] = {}
        self._pass: str | None = None
        self._primary: str | None = None
        # Proxies of the pipeline's other denoisers (Wan 2.2's two experts) that take turns within one call: see
        # share_calls_with
        self._takes_turns_with: list[StagedDenoiser] = []
        self.reset()

    def share_calls_with(self, others: list["StagedDenoiser"]) -> None:
        """``others`` are denoisers the pipeline switches to and from during a call (Wan 2.2's experts).

        The switch is treated like the start of a call: when this proxy takes its first step,
        every other one that has started is reset (its transfers settled, its steps
        forgotten), and this one starts its own schedule with its own warm-up. A stale
        boundary state of one expert is never an input of the other (they are different
        networks), and an expert's first step has no earlier state of its own to use.
        """
        self._takes_turns_with = [o for o in others if o is not self]

    # -------------------------------------------------------------- attributes

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            denoiser = self.__dict__.get("_denoiser")
            if denoiser is None:
                raise
            return getattr(denoiser, name)

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        """Pipelines mark each denoiser pass (``"cond"``, ``"uncond"``, ``"cond_uncond"``) for diffusers' caches.

        The first pass name of a call runs on this proxy; any other name gets its own lane
        (see ``__init__``). Without an executor factory a second pass is refused: the
        schedule counts one call per step and would take it for the next step.
        """
        if self._primary is None:
            self._primary = name
        if name != self._primary and self._new_executor is None:
            raise NotImplementedError(
                f"the pipeline runs a second denoiser pass per step ({name!r}, e.g. Flux true CFG with "
                "true_cfg_scale > 1 and a negative prompt); this proxy schedules one pass per step"
            )
        previous, self._pass = self._pass, name
        try:
            with self._denoiser.cache_context(name, **kwargs):
                yield
        finally:
            self._pass = previous

    def _lane(self, name: str) -> "StagedDenoiser":
        if name not in self._lanes:
            lane = StagedDenoiser(self.split, [], self._new_executor(), self.topology, self.warmup, self.time_shift,
                                  self._scheduler, self.cfg_parts)
            self._lanes[name] = lane
        return self._lanes[name]

    @property
    def denoiser(self) -> nn.Module:
        return self._denoiser

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    # -------------------------------------------------------------- call state

    def reset(self) -> None:
        """Start a new pipeline call: settle the previous call's transfers, forget its steps."""
        if getattr(self, "_started", False):
            self.executor.end_call()
            self._check_timesteps()
        for lane in getattr(self, "_lanes", {}).values():
            lane.reset()
        self._primary = None
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
        self._upcoming = None  # scheduler timesteps from this call's first step on, on the host
        self._upcoming_on: torch.Tensor | None = None  # the same on the pipeline's timestep device
        self.schedule: AsyncSchedule | None = None

    def _begin(self, sample: torch.Tensor, timestep: Any) -> None:
        if sample.shape[0] % self.cfg_parts:
            # the halves are independent, so any even batch splits correctly; CFG doubles it
            raise ValueError(
                f"cfg_parallel=True splits the denoiser's batch in two, but this call's batch is {sample.shape[0]}; "
                "use classifier-free guidance (guidance_scale > 1) or an even num_images_per_prompt"
            )
        for other in self._takes_turns_with:
            if other._started:
                other.reset()
        scheduler = self._scheduler()
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
            if begin is not None:
                # pipelines may pass a rescaled timestep (Flux passes t / 1000): keep their scale
                scheduled, passed = float(timesteps[begin]), _timestep_value(timestep)
                ratio = scheduled / passed if scheduled != 0 and passed != 0 else 1.0
                self._upcoming = timesteps[begin:] / ratio if ratio != 1.0 else timesteps[begin:]
                self._total = len(self._upcoming)
        warmup = self.warmup if self.warmup is not None else default_warmup(self._total)
        self.schedule = AsyncSchedule(self.topology, warmup, self.time_shift)
        self.executor.begin_call(self.schedule)
        self._started = True

    def _timestep_of(self, step: int, like: Any) -> Any:
        if step in self._timesteps:
            return self._timesteps[step]
        if self._upcoming is None or step >= len(self._upcoming):
            raise RuntimeError(
                f"stride {self.topology.stride} needs the timestep of step {step} before the pipeline reaches it, "
                "but the pipeline's scheduler does not list it (custom timesteps?); use stride=1"
            )
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
        elif not math.isclose(expected, _timestep_value(timestep), rel_tol=1e-5):
            self._timesteps_changed(step, _timestep_value(timestep))

    def _check_timesteps(self) -> None:
        unchecked, self._unchecked = self._unchecked, []
        if not unchecked:
            return
        passed = torch.stack([t.double() for _, t, _ in unchecked])
        expected = torch.tensor([e for _, _, e in unchecked], dtype=torch.float64, device=passed.device)
        wrong = (~torch.isclose(passed, expected, rtol=1e-5, atol=0)).nonzero().flatten().tolist()  # one sync per call
        if wrong:
            self._timesteps_changed(unchecked[wrong[0]][0], float(passed[wrong[0]]))

    @staticmethod
    def _timesteps_changed(step: int, value: float):
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
            scale_lora_layers(self._denoiser, scale)
        try:
            yield
        finally:
            if USE_PEFT_BACKEND:
                unscale_lora_layers(self._denoiser, scale)

    # ---------------------------------------------------------------- forward

    def forward(self, *args, **kwargs):
        if self._pass is not None and self._pass != self._primary:
            return self._lane(self._pass).forward(*args, **kwargs)
        arguments = dict(self._signature.bind(*args, **kwargs).arguments)
        if self._pass is None:
            # A pipeline may run a further pass per step without naming it (Lumina2: cond, then uncond, on the
            # same latents, no cache_context): a call on the very latent tensor of the call before, at the same
            # timestep, is that step's next pass (a step's scheduler update makes a new tensor), a lane of its own.
            sample, timestep = arguments[self.split.sample_argument], arguments["timestep"]
            if sample is self._last_sample and (timestep is self._last_timestep or
                                                _timestep_value(timestep) == _timestep_value(self._last_timestep)):
                self._unnamed_pass += 1
                if self._new_executor is None:
                    raise NotImplementedError("the pipeline runs a second denoiser pass per step on the same latents; "
                                              "this proxy schedules one pass per step")
                return self._lane(f"pass {self._unnamed_pass}").forward(*args, **kwargs)
            self._last_sample, self._last_timestep, self._unnamed_pass = sample, timestep, 0
        return_dict = arguments.pop("return_dict", True)
        sample, timestep = arguments.pop(self.split.sample_argument), arguments.pop("timestep")
        if self._started and self._total is not None and self._step >= self._total:
            self.reset()  # the stock pipeline was called again without the wrapper
        if not self._started:
            self._begin(sample, timestep)
        step = self._step
        self._step += 1
        self._timesteps[step] = timestep
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
