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
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils import logging
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .boundary import BoundaryState
from .split import DenoiserSplit, Unit

logger = logging.get_logger(f"diffusers.{__name__}")

_HOOK_NAME = "asyncgen_block_stage"
_LORA_KWARGS = ("joint_attention_kwargs", "attention_kwargs", "cross_attention_kwargs")


class SplitRefused(TypeError):
    """The generic block split cannot find this denoiser's blocks or prove itself exact on it.

    A ``TypeError``, like any other denoiser asyncgen cannot split: callers that ask
    whether a class splits (``describe_pipeline``) catch that one kind."""


class NeedsRealWeights(SplitRefused):
    """The forward reads tensor values in Python (a mask's ``.tolist()``, ``nonzero``): it traces on real
    tensors only, so a model built on the meta device (config only, no weights) cannot be split."""


# ------------------------------------------------------------------ arguments


def _bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    return signature.bind(*args, **kwargs)


def _named_values(bound: inspect.BoundArguments) -> dict[str, Any]:
    """A block call's arguments by name (``*args`` as ``args.0``, ``**kwargs`` by key)."""
    out = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out.update({f"{name}.{i}": v for i, v in enumerate(value)})
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _replace_named(bound: inspect.BoundArguments, values: dict[str, Any]) -> tuple[tuple, dict]:
    arguments = dict(bound.arguments)
    for name, value in values.items():
        if name in arguments and bound.signature.parameters[name].kind not in (
                inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            arguments[name] = value
            continue
        for pname, param in bound.signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_POSITIONAL and name.startswith(pname + "."):
                items = list(arguments[pname])
                items[int(name.rsplit(".", 1)[1])] = value
                arguments[pname] = tuple(items)
                break
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments.get(pname, {}):
                arguments[pname] = {**arguments[pname], name: value}
                break
        else:
            raise KeyError(name)
    rebound = inspect.BoundArguments(bound.signature, arguments)
    return rebound.args, rebound.kwargs


# ------------------------------------------------------------------ tracing


class _Provenance(TorchDispatchMode):
    """Labels every tensor an op produces with the union of its inputs' labels (a bit mask
    of the top-level module calls it derives from). Keeps the tensors alive so ``id``s stay unique."""

    def __init__(self):
        super().__init__()
        self.labels: dict[int, int] = {}
        self._alive: list[torch.Tensor] = []

    def label(self, value) -> int:
        mask = 0
        for t in torch.utils._pytree.tree_leaves(value):
            if isinstance(t, torch.Tensor):
                mask |= self.labels.get(id(t), 0)
        return mask

    def add(self, value, bit: int, fresh: bool = False) -> None:
        # ``fresh``: a module call's outputs are labelled with that call alone, so a label says
        # which calls reach a tensor directly (through the code between calls, not through a call)
        for t in torch.utils._pytree.tree_leaves(value):
            if isinstance(t, torch.Tensor):
                self.labels[id(t)] = bit if fresh else self.labels.get(id(t), 0) | bit
                self._alive.append(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        mask = self.label((args, kwargs))
        if mask:
            self.add(out, mask)
        return out


@dataclass
class _Call:
    list_name: str
    index: int
    module: nn.Module
    inputs: dict[str, Any]
    input_labels: dict[str, int]
    output: Any = None


@dataclass
class BlockTrace:
    """What one traced forward says about a transformer's blocks."""

    names: list[str]  # "transformer_blocks.3", in call order
    modules: list[nn.Module]
    boundary: list[tuple[str, ...]]  # per block: its inputs that carry the state (first = ``hidden``)
    passthrough: list[Any]  # per block: its output structure, leaves naming the input they stand in for
    output_rule: tuple  # (dims: tuple of int | None (None = the sample's size), dtype or None)
    suspect_ranges: list[tuple[int, int]] = field(default_factory=list)  # stages that read past their first cut


def _leaf_source(out: torch.Tensor, call: _Call, following: _Call | None, boundary: Sequence[str]) -> str | None:
    """Which input of ``call`` a skipped block hands through in place of output ``out``."""
    for name, value in call.inputs.items():
        if value is out:
            return name
    if following is not None:
        for name, value in following.inputs.items():
            if value is out and isinstance(call.inputs.get(name), torch.Tensor) and call.inputs[name].shape == out.shape:
                return name
    for names in (boundary, list(call.inputs)):
        for name in names:
            value = call.inputs.get(name)
            if isinstance(value, torch.Tensor) and value.shape == out.shape and value.dtype == out.dtype:
                return name
    return None


def _passthrough_spec(call: _Call, following: _Call | None, boundary: Sequence[str]):
    def spec(out):
        if out is None:
            return ("none",)
        if isinstance(out, torch.Tensor):
            source = _leaf_source(out, call, following, boundary)
            if source is None:
                raise SplitRefused(
                    f"block {call.list_name}.{call.index} returns a tensor of shape {tuple(out.shape)} that is not "
                    "the shape of any of its inputs, so it cannot be skipped on the ranks that do not run it"
                )
            return ("input", source)
        if isinstance(out, (tuple, list)):
            return ("seq", type(out), [spec(o) for o in out])
        raise SplitRefused(f"block {call.list_name}.{call.index} returns a {type(out).__name__}; "
                           "the generic split handles tensors, tuples and lists")
    return spec(call.output)


def _build_passthrough(spec, inputs: dict[str, Any]):
    kind = spec[0]
    if kind == "none":
        return None
    if kind == "input":
        return inputs[spec[1]]
    return spec[1](_build_passthrough(s, inputs) for s in spec[2])


def trace_blocks(model: nn.Module, inputs: dict, sample_argument: str) -> BlockTrace:
    """Find ``model``'s block lists and the boundary state at each block, from one fake forward."""
    from .split import run_on_shapes, value_read_errors

    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    member = {id(child): (name, i) for name, m in lists for i, child in enumerate(m)}
    calls: list[_Call] = []
    depth = [0]
    provenance = _Provenance()
    handles = []

    def pre(module, args, kwargs):
        if depth[0] == 0:
            signature = inspect.signature(module.forward)
            values = _named_values(_bind(signature, args, kwargs))
            name, index = member[id(module)]
            calls.append(_Call(name, index, module, values, {k: provenance.label(v) for k, v in values.items()}))
            module._asyncgen_call = len(calls) - 1
        else:
            module._asyncgen_call = None
        depth[0] += 1

    def post(module, args, kwargs, output):
        depth[0] -= 1
        index = module.__dict__.pop("_asyncgen_call", None)
        if index is not None:
            calls[index].output = output
            provenance.add(output, 1 << index, fresh=True)

    seen = set()
    for _, m in lists:
        for child in m:
            if id(child) in seen:
                continue
            seen.add(id(child))
            handles.append(child.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(child.register_forward_hook(post, with_kwargs=True))
    def traced(shaped: dict):
        calls.clear()
        depth[0] = 0
        provenance.labels.clear()
        provenance._alive.clear()
        with provenance:
            return model(**shaped, return_dict=False), shaped[sample_argument]

    try:
        try:  # fake tensors (a partly loaded model, one rank's stage, mixes meta and real), or real ones if it must
            output, sample = run_on_shapes(model, inputs, sample_argument, traced)
        except Exception as exc:  # noqa: BLE001 - e.g. an op whose output shape depends on values, weights on meta
            refusal = NeedsRealWeights if isinstance(exc, value_read_errors()) else SplitRefused
            raise refusal(f"{type(model).__name__}: its forward cannot be traced on fake tensors "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
        prediction = output[0] if isinstance(output, (tuple, list)) else output
    finally:
        for h in handles:
            h.remove()

    # block lists: every member called once, in order, each taking what the one before produced
    by_list: dict[str, list[int]] = {}
    for i, call in enumerate(calls):
        by_list.setdefault(call.list_name, []).append(i)
    sizes = dict((name, len(m)) for name, m in lists)
    block_lists = set()
    for name, indices in by_list.items():
        if [calls[i].index for i in indices] != list(range(sizes[name])) or len(indices) < 2:
            continue
        if all(any(label >> prev & 1 for label in calls[i].input_labels.values())
               for prev, i in zip(indices, indices[1:])):
            block_lists.add(name)
    # a one-block list continues a chain (a final single block, say): it takes what a block produced
    chain_bits = sum(1 << i for i, c in enumerate(calls) if c.list_name in block_lists)
    for name, indices in by_list.items():
        if len(indices) == 1 and sizes[name] == 1 and any(
                label & chain_bits for label in calls[indices[0]].input_labels.values()):
            block_lists.add(name)
    order = [i for i, c in enumerate(calls) if c.list_name in block_lists]
    if not order:
        raise SplitRefused(
            f"{type(model).__name__}: found no block list (an nn.ModuleList whose members its forward calls in "
            "sequence, each on what the one before produced)"
        )
    first = order[0]
    if any(i > first and i not in order and calls[i].list_name not in block_lists and
           any(label & chain_bits for label in calls[i].input_labels.values()) for i in range(len(calls))):
        logger.debug("a non-block module list consumes block outputs; verification decides")
    block_bits = sum(1 << i for i in order)
    # Each block must read block outputs only from the block just before it (and the head only
    # from the last block): a forward that holds an older block's output (a long skip in a
    # Python list, an accumulator) carries state past a cut that the boundary does not.
    suspect = []
    for j, i in enumerate(order):
        allowed = 1 << order[j - 1] if j else 0
        for label in calls[i].input_labels.values():
            stray = label & block_bits & ~allowed
            if stray:
                producer = order.index(stray.bit_length() - 1)
                suspect.append((producer + 1, j + 1))
    stray = provenance.label(prediction) & block_bits & ~(1 << order[-1])
    if stray:
        suspect.append((order.index(stray.bit_length() - 1) + 1, len(order)))
    boundary = []
    for i in order:
        call = calls[i]
        names = [n for n, v in call.inputs.items() if isinstance(v, torch.Tensor) and call.input_labels[n] & block_bits]
        names.sort(key=lambda n: (n != sample_argument and n != "hidden_states", list(call.inputs).index(n)))
        boundary.append(tuple(names))
    # the first block's state is what later blocks call by the same names
    if not boundary[0] and len(order) > 1:
        boundary[0] = tuple(n for n in boundary[1] if isinstance(calls[first].inputs.get(n), torch.Tensor))
    passthrough = [
        _passthrough_spec(calls[i], calls[order[j + 1]] if j + 1 < len(order) else None, boundary[j])
        for j, i in enumerate(order)
    ]
    dims = tuple(d if k >= sample.ndim or d != sample.shape[k] else None for k, d in enumerate(prediction.shape))
    dtype = None if prediction.dtype == sample.dtype else prediction.dtype
    return BlockTrace(
        names=[f"{calls[i].list_name}.{calls[i].index}" for i in order],
        modules=[calls[i].module for i in order],
        boundary=boundary,
        passthrough=passthrough,
        output_rule=(dims, dtype),
        suspect_ranges=sorted(set(suspect)),
    )


# ------------------------------------------------------------------ stages


class _StageExit(Exception):
    """Ends the model's forward at the first block after a stage, carrying that block's inputs."""

    def __init__(self, state: BoundaryState):
        super().__init__("stage done")
        self.state = state


@dataclass
class _StageRun:
    """One stage's pass through the model's forward: blocks ``[start, stop)`` compute."""

    split: "BlockSplit"
    start: int
    stop: int
    state: BoundaryState | None  # replaces block ``start``'s inputs (None: the forward's own)
    record: Callable[[int, BoundaryState], None] | None = None  # sees every block's incoming state

    replaced: bool = False
    probe: Callable | None = None  # estimate_unit_costs / measure_unit_costs: wraps each block's compute

    def block(self, index: int, module: nn.Module, forward, args: tuple, kwargs: dict):
        # A forward may leave blocks out (SD3's ``skip_layers``): the state enters at the first
        # block called at or after ``start`` and leaves at the first one at or after ``stop``.
        split = self.split
        bound = _bind(split._signatures[index], args, kwargs)
        if self.record is not None and index > 0:
            self.record(index, split._state_of(index, _named_values(bound)))
        if index < self.start:
            return _build_passthrough(split.trace.passthrough[index], _named_values(bound))
        if index >= self.stop:
            if self.state is not None and not self.replaced:
                # the forward left out every block of this stage: the state passes unchanged
                raise _StageExit(self.state)
            raise _StageExit(split._state_of(index, _named_values(bound)))
        if not self.replaced and self.state is not None:
            self.replaced = True
            # a copy: blocks may update their inputs in place, and a stale state is read again
            # (stride > 1 replicas, the next round)
            received = {k: v.clone() for k, v in split._named_state(index, self.state).items()}
            args, kwargs = _replace_named(bound, received)
        if self.probe is None:
            return forward(*args, **kwargs)
        result = []
        self.probe(index, lambda: result.append(forward(*args, **kwargs)))
        return result[0]


class _BlockStageHook(ModelHook):
    """Inert unless a stage is running: then the stage decides what this block does."""

    _is_stateful = False

    def __init__(self):
        super().__init__()
        self.active: tuple[_StageRun, int] | None = None

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        if self.active is None:
            return forward(*args, **kwargs)
        run, index = self.active
        return run.block(index, module, forward, args, kwargs)


def _stage_hook(block: nn.Module) -> _BlockStageHook:
    registry = HookRegistry.check_if_exists_or_initialize(block)
    hook = registry.get_hook(_HOOK_NAME)
    if hook is None:
        hook = _BlockStageHook()
        registry.register_hook(hook, _HOOK_NAME)
    return hook


@dataclass
class BlockCall:
    """A step's call of the denoiser, kept whole: every stage reruns the model's forward on it."""

    sample: torch.Tensor
    timestep: Any
    kwargs: dict = field(default_factory=dict)


class BlockSplit(DenoiserSplit):
    """Any transformer whose forward runs its blocks in sequence: one unit per block.

    ``example_inputs`` (a function ``(model, batch, height, width) -> dict`` of forward
    keyword arguments) says what a valid call of this class looks like; the split
    itself reads nothing class-specific.
    """

    def __init__(self, denoiser: nn.Module, example_inputs: Callable[..., dict], verify: bool = True):
        parameters = inspect.signature(denoiser.forward).parameters
        self.sample_argument = next(iter(parameters))
        self.lora_kwargs_name = next((n for n in _LORA_KWARGS if n in parameters), "attention_kwargs")
        self._example = example_inputs
        self.denoiser = denoiser
        self.trace = trace_blocks(denoiser, self.example_inputs(batch=1), self.sample_argument)
        self.stream_names = tuple(sorted({n for names in self.trace.boundary for n in names[1:]}))
        self._signatures = [inspect.signature(m.forward) for m in self.trace.modules]
        self._hooks = [_stage_hook(m) for m in self.trace.modules]
        super().__init__(denoiser)
        self._unit_index = {id(u): i for i, u in enumerate(self.units)}
        if verify:
            self.verify()

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
        dims, dtype = self.trace.output_rule
        shape = tuple(sample.shape[k] if d is None else d for k, d in enumerate(dims))
        return torch.empty(shape, dtype=dtype or sample.dtype, device=sample.device)

    def wrap_output(self, prediction: torch.Tensor, return_dict: bool):
        if not return_dict:
            return (prediction,)
        try:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput
        except ImportError:  # pragma: no cover - moved between releases
            from diffusers.models.transformers.transformer_2d import Transformer2DModelOutput
        return Transformer2DModelOutput(sample=prediction)

    def example_inputs(self, batch: int = 2, height: int | None = None, width: int | None = None) -> dict:
        return self._example(self.denoiser, batch, height, width)

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
    def _active(self, run: _StageRun):
        for index, hook in enumerate(self._hooks):
            hook.active = (run, index)
        try:
            yield
        finally:
            for hook in self._hooks:
                hook.active = None

    def _run(self, start: int, stop: int, state: BoundaryState, cond: BlockCall, record=None) -> BoundaryState:
        run = _StageRun(self, start, stop, state if start > 0 else None, record)
        kwargs = {**cond.kwargs, self.sample_argument: state.hidden if start == 0 else cond.sample,
                  "timestep": cond.timestep, "return_dict": False}
        try:
            with self._active(run):
                output = self.denoiser(**kwargs)
        except _StageExit as done:
            return done.state
        if stop < len(self.units):
            raise RuntimeError(f"{type(self.denoiser).__name__}'s forward returned before block {self.trace.names[stop]}")
        return BoundaryState(output[0] if isinstance(output, (tuple, list)) else output.sample)

    def run_units_with_probe(self, inputs: dict, probe: Callable[[int, Callable[[], None]], None]) -> None:
        """One forward in which ``probe(i, step)`` runs block ``i``'s compute (for unit costs)."""
        call = dict(inputs)
        sample, timestep = call.pop(self.sample_argument), call.pop("timestep")
        run = _StageRun(self, 0, len(self.units), None, probe=probe)
        with self._active(run):
            self.denoiser(**{**call, self.sample_argument: sample, "timestep": timestep, "return_dict": False})

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
        sample, timestep = call.pop(self.sample_argument), call.pop("timestep")
        cond = self.conditioning(sample, timestep, **call)
        states: dict[int, BoundaryState] = {}
        with torch.no_grad():
            reference = model(**inputs, return_dict=False)[0]
            full = self._run(0, len(self.units), BoundaryState(sample), cond, record=lambda i, s: states.setdefault(i, _cloned(s)))
            worst = self._compare(reference, full.hidden, 0, len(self.units))
            like = self.output_like(sample)
            if like.shape != reference.shape or like.dtype != reference.dtype:
                raise SplitRefused(f"{type(model).__name__}: the prediction is {tuple(reference.shape)} {reference.dtype}, "
                                   f"the split expected {tuple(like.shape)} {like.dtype}")
            for k in range(len(self.units)):
                out = self._run(k, k + 1, states[k] if k else BoundaryState(sample), cond)
                target = states[k + 1] if k + 1 < len(self.units) else BoundaryState(reference)
                for got, want in zip(out.tensors(), target.tensors()):
                    worst = max(worst, self._compare(want, got, k, k + 1))
            for start, stop in self.trace.suspect_ranges:
                # a stage from ``start`` reads a block output from before ``start``: check that range whole
                out = self._run(start, stop, states[start], cond)
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
                f"differs from the full forward by max abs {diff:.3g}; use verify_split=False to split it anyway"
            )
        return diff

    def random_inputs(self, batch: int = 1, seed: int = 0) -> dict:
        """``example_inputs`` with random values in its floating-point tensors (not the global RNG)."""
        generator = torch.Generator().manual_seed(seed)

        def fill(name, value):
            if isinstance(value, dict):
                return {k: fill(k, v) for k, v in value.items()}
            if isinstance(value, torch.Tensor) and value.is_floating_point() and name not in _KEEP_VALUES:
                noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
                return noise.to(device=value.device, dtype=value.dtype)
            return value

        return {k: fill(k, v) for k, v in self.example_inputs(batch=batch).items()}


def _cloned(state: BoundaryState) -> BoundaryState:
    # the forward may update a block's inputs in place after the block has read them
    return BoundaryState(state.hidden.clone(), (), {k: v.clone() for k, v in state.streams.items()})


# inputs whose values the example gives on purpose (positions, step, guidance scale)
_KEEP_VALUES = {"timestep", "timesteps", "img_ids", "txt_ids", "guidance", "image_rotary_emb", "video_coords",
                "encoder_attention_mask", "attention_mask", "encoder_hidden_states_mask", "timestep_r"}
