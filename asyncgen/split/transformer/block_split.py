"""Any transformer denoiser as a chain of blocks, found by tracing its forward.

Almost every diffusers transformer's ``forward`` is: embeddings, then one or more
``nn.ModuleList`` s of blocks called in sequence, then a norm/projection head. This
module finds those block lists and the state that crosses a cut without reading the
class name:

* **Tracing.** The forward runs once under ``FakeTensorMode`` (shapes only, no
  arithmetic) with hooks on every member of every ``ModuleList`` and a dispatch mode
  that labels each tensor with the top-level module calls it derives from. A list whose
  members are each called once, in order, each taking something the previous one
  produced, is a block list; its calls, in time order, are the units. A forward whose
  Python reads tensor values (sequence lengths from a mask's ``.tolist()``) is traced
  once on real tensors at the example's tiny size instead, when its weights are loaded.
* **Boundary.** The state entering block ``k`` is the inputs of block ``k`` that derive
  from an earlier block (one stream or two: image and text); its other inputs (rotary
  embeddings, timestep embeddings, masks) derive from the model's inputs only and are
  conditioning, which the model's own code recomputes on every rank.
* **A stage** ``[a, b)`` runs the model's own ``forward``: blocks before ``a`` hand their
  inputs through without computing, block ``a`` takes the received state in place of its
  inputs, and the inputs of block ``b`` (after whatever the forward does between blocks,
  such as ControlNet residual adds) are the stage's output, taken by a short-circuit
  that ends the forward there. The last stage runs on through the head. Embeddings and
  head are the model's code, so they stay exact; their modules (every module that is
  not a block: patch/time/text embeddings, final norm and projection, small next to the
  blocks) are shared by every rank.
* **Verification.** A forward whose between-block code keeps state the boundary misses
  (long skip connections held in a Python list, say) would split wrongly, so at split
  time every single-block range is run from the full forward's own state at its start
  and compared with the full forward's state at its end; a class that does not match is
  refused with the class, the block range and the max abs difference
  (``verify_split=False`` skips this).

Stages are switched by a :class:`diffusers.hooks.ModelHook` on each block that is inert
unless a stage of this split is running, so the blocks stay the model's own eager
modules (LoRA loading, attention processors and diffusers' own hooks keep working).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Sequence

import torch
from diffusers.utils import logging
from torch import nn

from asyncgen.split.boundary import BoundaryState
from asyncgen.split.transformer.stage_hook import BlockCall, stage_hook_of, StageExit, StageRun
from asyncgen.split.transformer.signature import is_list_of_tensors, sample_is_list, timestep_argument
from asyncgen.split.transformer.trace import SplitRefused, stacked, trace_blocks
from asyncgen.split.units import DenoiserSplit, Unit

logger = logging.get_logger(f"diffusers.{__name__}")


_LORA_KWARGS = ("joint_attention_kwargs", "attention_kwargs", "cross_attention_kwargs")


class BlockSplit(DenoiserSplit):
    """Any transformer whose forward runs its blocks in sequence: one unit per block.

    ``example_inputs`` (a function ``(model, batch, height, width) -> dict`` of forward
    keyword arguments) says what a valid call of this class looks like; the split
    itself reads nothing class-specific.
    """

    def __init__(self, denoiser: nn.Module, example_inputs: Callable[..., dict], verify: bool = True,
                 call: dict | None = None):
        parameters = inspect.signature(denoiser.forward).parameters
        self.sample_argument = next(iter(parameters))
        self.timestep_argument = timestep_argument(denoiser.forward)
        self.sample_is_list = sample_is_list(denoiser.forward)
        # the other arguments the forward takes as per-sample lists (CFG parallel cuts them as lists)
        self._list_arguments = {name for name, p in list(parameters.items())[1:] if is_list_of_tensors(p)}
        self.lora_kwargs_name = next((n for n in _LORA_KWARGS if n in parameters), "attention_kwargs")
        self._example = example_inputs
        self.denoiser = denoiser
        # ``call``: a real call of the denoiser (its pipeline's first) is the example; else one built from the config
        self.example_source = "the pipeline's first denoiser call" if call is not None else "the config"
        self._call = self._held(call) if call is not None else None
        self.trace = trace_blocks(denoiser, self.example_inputs(batch=1), self.sample_argument, self.model_arguments)
        self.stream_names = tuple(sorted({n for names in self.trace.boundary for n in names[1:]}))
        self._signatures = [inspect.signature(m.forward) for m in self.trace.modules]
        self._hooks = [stage_hook_of(m) for m in self.trace.modules]
        super().__init__(denoiser)
        self._unit_index = {id(u): i for i, u in enumerate(self.units)}
        if verify:
            self.verify()

    def _held(self, call: dict) -> dict:
        """A denoiser call as the split holds it: named arguments, the sample one batch tensor, no return_dict."""
        call = {k: v for k, v in call.items() if k != "return_dict"}
        call[self.sample_argument] = stacked(call[self.sample_argument])
        return call

    def model_arguments(self, call: dict) -> dict:
        """A call as the split holds it, as the forward takes it (the sample as a per-sample list where it wants one)."""
        if self.sample_is_list and isinstance(call.get(self.sample_argument), torch.Tensor):
            call = {**call, self.sample_argument: list(call[self.sample_argument].unbind(0))}
        return dict(call)

    def batch_part(self, value, part: int, parts: int, batch: int):
        """CFG parallel's slice of ``(sample, timestep, arguments)``: as :func:`asyncgen.schedules.cfg_parallel.batch_part`,
        except that an argument the forward takes as a per-sample list (ZImage's caption features, one tensor per
        prompt, [cond..., uncond...]) is cut as a list, its ``batch`` members into ``parts`` runs; the generic rule
        would leave the list whole and cut inside its members wherever their first size happened to be ``batch``."""
        from asyncgen.schedules.cfg_parallel import batch_part

        sample, timestep, arguments = value
        size = batch // parts

        def cut(name, v):
            if name in self._list_arguments and isinstance(v, (list, tuple)) and len(v) == batch:
                return type(v)(v[part * size:(part + 1) * size])
            return batch_part(v, part, parts, batch)

        return (batch_part(sample, part, parts, batch), batch_part(timestep, part, parts, batch),
                {k: cut(k, v) for k, v in arguments.items()})

    def sample_tensor(self, sample) -> torch.Tensor:
        """The forward's sample argument as one batch tensor (what the schedule and the wire carry)."""
        return stacked(sample)

    def adopt_call(self, call: dict, verify: bool = True) -> None:
        """Take a real call of the denoiser (the pipeline's first) as this split's example.

        The blocks were found on an example built from the config; the boundary and the
        skipped blocks' hand-through are traced again on the call the pipeline really makes
        (its sizes, its text length, its argument types), which must find the same blocks,
        and with the weights at hand every single-block stage is checked on it.
        """
        held = self._held(call)
        trace = trace_blocks(self.denoiser, held, self.sample_argument, self.model_arguments)
        if trace.names != self.trace.names:
            raise SplitRefused(
                f"{type(self.denoiser).__name__}: the pipeline's first call runs blocks {_span(trace.names)}, the "
                f"example from the config ran {_span(self.trace.names)}; the stages were cut for the latter")
        trace.modules = self.trace.modules  # the same blocks (a rank's released ones stand in for theirs)
        self.trace, self._call, self.example_source = trace, held, "the pipeline's first denoiser call"
        self.stream_names = tuple(sorted({n for names in self.trace.boundary for n in names[1:]}))
        if verify:
            self.verify(held)

    # ------------------------------------------------------------- structure

    def build_units(self) -> list[Unit]:
        return [
            Unit(name, (module,), lambda s, c, i=i: self._run(i, i + 1, s, c))
            for i, (name, module) in enumerate(zip(self.trace.names, self.trace.modules))
        ]

    def shared_modules(self) -> list[nn.Module]:
        """Every module that is not a block (embeddings, modulation, final norm and projection):
        small next to the blocks, and every rank runs the model's own code around its blocks."""
        blocks = {id(m) for m in self.trace.modules}
        shared: list[nn.Module] = []

        def visit(module: nn.Module) -> None:
            for child in module.children():
                if id(child) in blocks:
                    continue
                if any(id(m) in blocks for m in child.modules()):
                    visit(child)
                else:
                    shared.append(child)

        visit(self.denoiser)
        own = dict(self.denoiser.named_parameters(recurse=False))
        if own:  # parameters of the model itself (PixArt's scale_shift_table): the same objects, in a holder
            holder = nn.Module()
            for name, p in own.items():
                holder.register_parameter(name, p)
            shared.append(holder)
        return shared

    # ------------------------------------------------------------- state

    def _state_of(self, index: int, named: dict[str, Any]) -> BoundaryState:
        names = self.trace.boundary[index]
        return BoundaryState(named[names[0]], (), {n: named[n] for n in names[1:]})

    def _named_state(self, index: int, state: BoundaryState) -> dict[str, torch.Tensor]:
        names = self.trace.boundary[index]
        return {names[0]: state.hidden, **{n: state.streams[n] for n in names[1:]}}

    def conditioning(self, sample: torch.Tensor, timestep: Any, **kwargs) -> BlockCall:
        return BlockCall(sample, timestep, kwargs)

    def initial_state(self, sample: torch.Tensor, cond: BlockCall) -> BoundaryState:
        # the first stage starts from the model's own input: the forward embeds it
        return BoundaryState(sample)

    def output(self, state: BoundaryState) -> torch.Tensor:
        return state.hidden

    def output_like(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.sample_tensor(sample)
        dims, dtype = self.trace.output_rule
        shape = tuple(sample.shape[k] if d is None else d for k, d in enumerate(dims))
        return torch.empty(shape, dtype=dtype or sample.dtype, device=sample.device)

    def wrap_output(self, prediction: torch.Tensor, return_dict: bool):
        if self.trace.output_is_list:  # the forward returns one tensor per sample
            prediction = list(prediction.unbind(0))
        if not return_dict:
            return (prediction,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=prediction)

    def example_inputs(self, batch: int = 2, height: int | None = None, width: int | None = None) -> dict:
        """A call of the denoiser as the split holds it: the pipeline's own first call where the split has one
        (its batch and size: what the pipeline runs), else one built from the config at ``batch`` and size."""
        if self._call is not None:
            return dict(self._call)
        return self._held(self._example(self.denoiser, batch, height, width))

    # ------------------------------------------------------------- running

    def forward_units(self, state: BoundaryState, cond: BlockCall, units: Sequence[Unit]) -> BoundaryState:
        if not units:
            return state
        start = self._unit_index[id(units[0])]
        stop = self._unit_index[id(units[-1])] + 1
        if [self._unit_index[id(u)] for u in units] != list(range(start, stop)):
            raise ValueError(f"units {[u.name for u in units]} are not a contiguous run of blocks")
        return self._run(start, stop, state, cond)

    @contextlib.contextmanager
    def _active(self, run: StageRun):
        for index, hook in enumerate(self._hooks):
            hook.active = (run, index)
        try:
            yield
        finally:
            for hook in self._hooks:
                hook.active = None

    def _run(self, start: int, stop: int, state: BoundaryState, cond: BlockCall, record=None) -> BoundaryState:
        run = StageRun(self, start, stop, state if start > 0 else None, record)
        kwargs = {**cond.kwargs, self.sample_argument: state.hidden if start == 0 else cond.sample,
                  self.timestep_argument: cond.timestep}
        try:
            with self._active(run):
                output = self.denoiser(**self.model_arguments(kwargs), return_dict=False)
        except StageExit as done:
            return done.state
        if stop < len(self.units):
            raise RuntimeError(f"{type(self.denoiser).__name__}'s forward returned before block {self.trace.names[stop]}")
        prediction = output[0] if isinstance(output, (tuple, list)) else output.sample
        return BoundaryState(stacked(prediction))

    def run_units_with_probe(self, inputs: dict, probe: Callable[[int, Callable[[], None]], None]) -> None:
        """One forward in which ``probe(i, step)`` runs block ``i``'s compute (for unit costs)."""
        run = StageRun(self, 0, len(self.units), None, probe=probe)
        with self._active(run):
            self.denoiser(**self.model_arguments(inputs), return_dict=False)

    # ------------------------------------------------------------- verification

    def verify(self, inputs: dict | None = None) -> float:
        """Every single-block stage, fed the full forward's own state, must give the full forward's next state.

        Returns the largest difference found; raises :class:`SplitRefused` naming the
        class, the block range and the difference where one is not within rounding.
        """
        model = self.denoiser
        if any(p.device.type == "meta" for p in model.parameters()):
            return 0.0  # no weights to compute with (a config-only description)
        if inputs is None:
            inputs = self.random_inputs(batch=1)
        call = dict(inputs)
        sample, timestep = call.pop(self.sample_argument), call.pop(self.timestep_argument)
        cond = self.conditioning(sample, timestep, **call)
        states: dict[int, BoundaryState] = {}
        with torch.no_grad():
            reference = stacked(model(**self.model_arguments(inputs), return_dict=False)[0])
            full = self._run(0, len(self.units), BoundaryState(sample), cond, record=lambda i, s: states.setdefault(i, _cloned(s)))
            worst = self._compare(reference, full.hidden, 0, len(self.units))
            like = self.output_like(sample)
            if like.shape != reference.shape or like.dtype != reference.dtype:
                raise SplitRefused(f"{type(model).__name__}: the prediction is {tuple(reference.shape)} {reference.dtype}, "
                                   f"the split expected {tuple(like.shape)} {like.dtype}")
            for k in range(len(self.units)):
                out = self._checked_run(k, k + 1, states[k] if k else BoundaryState(sample), cond)
                target = states[k + 1] if k + 1 < len(self.units) else BoundaryState(reference)
                for got, want in zip(out.tensors(), target.tensors()):
                    worst = max(worst, self._compare(want, got, k, k + 1))
            for start, stop in self.trace.suspect_ranges:
                # a stage from ``start`` reads a block output from before ``start``: check that range whole
                out = self._checked_run(start, stop, states[start], cond)
                target = states[stop] if stop < len(self.units) else BoundaryState(reference)
                diff = max(self._compare(want, got, start, stop) for got, want in zip(out.tensors(), target.tensors()))
                span = f"{self.trace.names[start]}..{self.trace.names[stop - 1]}"
                raise SplitRefused(
                    f"{type(model).__name__}: the generic block split cannot be proved exact: block "
                    f"{self.trace.names[stop - 1]} reads a block output from before {self.trace.names[start]}, which "
                    f"no boundary carries (a stage of blocks {span} differs by max abs {diff:.3g} on a random input); "
                    "use verify_split=False to split it anyway"
                )
        logger.debug("verified the block split of %s: max abs difference %g", type(model).__name__, worst)
        return worst

    def _checked_run(self, start: int, stop: int, state: BoundaryState, cond: BlockCall) -> BoundaryState:
        """A stage's run in the check: a failure is a refusal naming the boundary it entered at, with shapes."""
        try:
            return self._run(start, stop, state, cond)
        except Exception as exc:  # noqa: BLE001 - any failure of a stage is this split's failure
            names = self.trace.boundary[start] if start else (self.sample_argument,)
            shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, state.tensors()))
            span = self.trace.names[start] if stop == start + 1 else \
                f"{self.trace.names[start]}..{self.trace.names[stop - 1]}"
            raise SplitRefused(
                f"{type(self.denoiser).__name__}: a stage of blocks {span} fed the boundary state at "
                f"{self.trace.names[start]} ({shapes}) fails: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            ) from exc

    def _compare(self, want: torch.Tensor, got: torch.Tensor, start: int, stop: int) -> float:
        span = self.trace.names[start] if stop == start + 1 else f"{self.trace.names[start]}..{self.trace.names[stop - 1]}"
        if want.shape != got.shape:
            raise SplitRefused(f"{type(self.denoiser).__name__}: a stage of blocks {span} gives shape {tuple(got.shape)}, "
                               f"the full forward {tuple(want.shape)}")
        diff = (want.double() - got.double()).abs().max().item() if want.numel() else 0.0
        # same ops on the same values: only a kernel's nondeterminism (GPU atomics) may differ
        scale = max(1.0, want.double().abs().max().item()) if want.numel() else 1.0
        tolerance = 16 * torch.finfo(want.dtype).eps * scale if want.is_floating_point() else 0.0
        if not diff <= tolerance:
            raise SplitRefused(
                f"{type(self.denoiser).__name__}: the generic block split is not exact: a stage of blocks {span} "
                f"differs from the full forward by max abs {diff:.3g} (state {tuple(want.shape)}); "
                "use verify_split=False to split it anyway"
            )
        return diff

    def random_inputs(self, batch: int = 1, seed: int = 0) -> dict:
        """``example_inputs`` with random values in its floating-point tensors (not the global RNG)."""
        generator = torch.Generator().manual_seed(seed)

        def fill(name, value):
            if isinstance(value, dict):
                return {k: fill(k, v) for k, v in value.items()}
            if isinstance(value, list):  # per-sample tensors (ZImage's caption features)
                return [fill(name, v) for v in value]
            if isinstance(value, torch.Tensor) and value.is_floating_point() and name not in _KEEP_VALUES and \
                    name != self.timestep_argument:
                noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
                return noise.to(device=value.device, dtype=value.dtype)
            return value

        return {k: fill(k, v) for k, v in self.example_inputs(batch=batch).items()}


def _span(names: Sequence[str]) -> str:
    return f"{names[0]}..{names[-1]} ({len(names)})" if names else "none"


def _cloned(state: BoundaryState) -> BoundaryState:
    # the forward may update a block's inputs in place after the block has read them
    return BoundaryState(state.hidden.clone(), (), {k: v.clone() for k, v in state.streams.items()})


# inputs whose values the example gives on purpose (positions, step, guidance scale)
_KEEP_VALUES = {"timestep", "timesteps", "img_ids", "txt_ids", "guidance", "image_rotary_emb", "video_coords",
                "encoder_attention_mask", "attention_mask", "encoder_hidden_states_mask", "timestep_r"}
