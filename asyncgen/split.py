"""Splitting a denoiser into sequential stages.

A denoiser is described (by a model-family module such as :mod:`asyncgen.unet`) as a
chain of *units*: small pieces of the forward pass (a resnet/attention pair, a sampler,
a transformer block) that each map a :class:`~asyncgen.boundary.BoundaryState` to the
next. Composing all units reproduces the denoiser's forward exactly. A *stage* is a
contiguous run of units; the cut points are chosen from a per-unit cost so that stages
are balanced. Nothing here is keyed by checkpoint or repo id: units come from the module
structure and costs from counting (or timing) what each unit computes.
"""

from __future__ import annotations

import abc
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .boundary import BoundaryState

UnitFn = Callable[[BoundaryState, Any], BoundaryState]


@dataclass(eq=False)
class Unit:
    """One indivisible piece of a denoiser's forward pass."""

    name: str
    modules: tuple[nn.Module, ...]
    fn: UnitFn

    def __call__(self, state: BoundaryState, cond: Any) -> BoundaryState:
        return self.fn(state, cond)

    def parameters(self):
        for module in self.modules:
            yield from module.parameters()


class DenoiserSplit(abc.ABC):
    """A denoiser described as a chain of units, plus the pieces every rank shares.

    Subclasses implement one model family. ``conditioning`` computes what every unit of a
    step needs besides the boundary state (embeddings, processed text states, ControlNet
    residuals); it only uses the *shared* modules, which every rank keeps.
    """

    #: denoiser classes this split handles (checked with ``isinstance``)
    handles: tuple[type, ...] = ()
    #: names of the forward's latent argument and of the kwargs dict that carries a LoRA ``scale``
    sample_argument = "sample"
    lora_kwargs_name = "cross_attention_kwargs"
    #: extra streams a boundary state may carry besides ``hidden`` (in this order on the wire)
    stream_names: tuple[str, ...] = ()

    def __init__(self, denoiser: nn.Module):
        self.denoiser = denoiser
        self.units: list[Unit] = self.build_units()

    @abc.abstractmethod
    def build_units(self) -> list[Unit]:
        """The chain of units, in forward order."""

    @abc.abstractmethod
    def shared_modules(self) -> list[nn.Module]:
        """Small modules every rank keeps (time/text/class embeddings)."""

    @abc.abstractmethod
    def conditioning(self, sample: torch.Tensor, timestep: Any, **kwargs) -> Any:
        """Per-step inputs of the units other than the boundary state."""

    @abc.abstractmethod
    def initial_state(self, sample: torch.Tensor, cond: Any) -> BoundaryState:
        """B_0: the boundary state entering the first unit."""

    @abc.abstractmethod
    def output(self, state: BoundaryState) -> torch.Tensor:
        """The denoiser's prediction from B_N."""

    @abc.abstractmethod
    def output_like(self, sample: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor with the shape, dtype and device of the prediction."""

    @abc.abstractmethod
    def wrap_output(self, prediction: torch.Tensor, return_dict: bool):
        """The denoiser's return value (its output class, or a tuple) around ``prediction``."""

    @abc.abstractmethod
    def example_inputs(self, batch: int = 2, height: int | None = None, width: int | None = None) -> dict:
        """Keyword inputs of the denoiser's forward, used to estimate unit costs."""

    def forward_units(self, state: BoundaryState, cond: Any, units: Sequence[Unit]) -> BoundaryState:
        for unit in units:
            state = unit(state, cond)
        return state

    def __call__(self, sample: torch.Tensor, timestep: Any, **kwargs) -> torch.Tensor:
        """Run the whole chain: must equal the denoiser's own forward exactly."""
        cond = self.conditioning(sample, timestep, **kwargs)
        return self.output(self.forward_units(self.initial_state(sample, cond), cond, self.units))


# ---------------------------------------------------------------------------- costs


def _run_chain_with_probe(split: DenoiserSplit, inputs: dict, probe: Callable[[int, Callable[[], None]], None]):
    runner = getattr(split, "run_units_with_probe", None)
    if runner is not None:  # a split that runs all its units inside one forward (asyncgen.block_split)
        return runner(inputs, probe)
    inputs = dict(inputs)
    sample, timestep = inputs.pop(split.sample_argument), inputs.pop("timestep")
    cond = split.conditioning(sample, timestep, **inputs)
    state = [split.initial_state(sample, cond)]
    for i, unit in enumerate(split.units):
        def step(unit=unit):
            state[0] = unit(state[0], cond)
        probe(i, step)


def estimate_unit_costs(split: DenoiserSplit, inputs: dict | None = None) -> list[float]:
    """Floating-point operations of each unit plus a memory-traffic term.

    Runs under ``FakeTensorMode`` so no arithmetic happens: shapes flow through the
    real modules and every aten op is charged its FLOPs (matmul, conv, attention) and the
    bytes it reads and writes, weights included. Normalisation, elementwise ops and
    wide convolutions on small feature maps are memory-bound, so bytes are converted
    with a fixed FLOPs-per-byte ratio; without that term low-resolution blocks and
    GroupNorm/SiLU look nearly free and the split comes out lopsided. (A forward that
    reads tensor values runs on real tensors instead: see :func:`run_on_shapes`.)
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    flops_per_byte = 8.0
    bytes_moved = [0]

    class _ByteCounter(TorchDispatchMode):
        # bytes read (activations and weights) plus bytes written by every op
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.prim.device.default:  # a metadata query (fake tensors made from meta ask it)
                return out
            flat = torch.utils._pytree.tree_leaves((args, kwargs or {}, out))
            bytes_moved[0] += sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
            return out

    inputs = inputs if inputs is not None else split.example_inputs()
    costs: list[float] = []

    def probe(i, step):
        counter = FlopCounterMode(display=False)
        bytes_moved[0] = 0
        with counter, _ByteCounter():
            step()
        costs.append(float(counter.get_total_flops()) + flops_per_byte * bytes_moved[0])

    def count(shaped: dict) -> list[float]:
        costs.clear()
        _run_chain_with_probe(split, shaped, probe)
        return costs

    return run_on_shapes(split.denoiser, inputs, split.sample_argument, count)


def fake_device(sample: torch.Tensor) -> torch.device:
    """Where a fake run with ``sample`` pretends to be: its device, the CPU for a meta tensor."""
    return torch.device("cpu") if sample.is_meta else sample.device


@contextlib.contextmanager
def meta_weights_as_fake(model: nn.Module, fake_mode, device: torch.device):
    """``model``'s meta parameters and buffers stand in as fake tensors on ``device`` (restored on exit).

    A model built on the meta device, or partly loaded (one rank's stage), then runs under
    ``fake_mode`` exactly like the loaded model: weights on ``meta`` beside real ones would
    be a device mismatch, and on ``meta`` the kernels decompose differently (attention into
    its maths), which changes the counted bytes by up to 2x and could move the cuts.
    """
    converter = fake_mode.fake_tensor_converter
    swapped, fakes = [], {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None and tensor.is_meta:
                    if id(tensor) not in fakes:  # tied weights stay one tensor
                        fakes[id(tensor)] = converter.from_meta_and_device(fake_mode, tensor, device)
                    swapped.append((table, name, tensor))
                    table[name] = fakes[id(tensor)]
    try:
        yield
    finally:
        for table, name, tensor in swapped:
            table[name] = tensor


def clear_method_caches(model: nn.Module) -> None:
    """Empty the ``functools.lru_cache``s on the methods of ``model``'s module classes.

    Diffusers caches rotary tables per (module, shape, device): QwenImage's
    ``QwenEmbedRope._compute_video_freqs`` under ``lru_cache_unless_export``, which hides the
    cache in its closure. A run under ``FakeTensorMode`` leaves fake tensors there, and the
    first real forward at the same shapes would get them back (a meta-built model traced at
    the pipeline's size then fails on its first real step). The caches belong to the class,
    so clearing them costs a recomputation and nothing else.
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


def value_read_errors() -> tuple[type[Exception], ...]:
    """What a ``FakeTensorMode`` run raises where the forward reads tensor values in Python
    (``.tolist()``, ``nonzero``): such a forward runs on real tensors only."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    return DataDependentOutputException, DynamicOutputShapeException


def run_on_shapes(model: nn.Module, inputs: dict, sample_argument: str, fn: Callable[[dict], Any]) -> Any:
    """``fn(inputs)`` under ``FakeTensorMode``, every input faked and meta weights as fakes (no arithmetic).

    A forward whose Python reads tensor values (``.tolist()`` of a mask's sums, a ``nonzero``)
    cannot run on fake tensors. When the model and the inputs are all real, ``fn`` then runs
    on the real tensors instead (the example calls are tiny): what the callers record (the
    blocks called and what feeds them, FLOPs, bytes) depends on shapes, not on values, so
    both runs give the same answer. ``fn`` may therefore run twice: it must start afresh.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = fake_device(inputs[sample_argument])
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as fake_mode, \
                meta_weights_as_fake(model, fake_mode, device):
            return fn({k: _fake_nested(fake_mode, v, device) for k, v in inputs.items()})
    except value_read_errors():
        tensors = [*model.parameters(), *model.buffers(), *torch.utils._pytree.tree_leaves(inputs)]
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
            raise  # no weights (or inputs) to run for real
    finally:
        clear_method_caches(model)  # what the fake run cached is fake
    with torch.no_grad():
        return fn(dict(inputs))


def _fake_nested(mode, value, device: torch.device | None = None):
    """``value`` with every tensor faked; meta tensors pretend to be on ``device`` (see :func:`fake_device`)."""
    if isinstance(value, dict):
        return {k: _fake_nested(mode, v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_fake_nested(mode, v, device) for v in value)
    if isinstance(value, torch.Tensor):
        if value.is_meta and device is not None:
            return mode.fake_tensor_converter.from_meta_and_device(mode, value, device)
        return mode.from_tensor(value)
    return value


def measure_unit_costs(split: DenoiserSplit, inputs: dict | None = None, repeats: int = 3) -> list[float]:
    """Median wall time of each unit on the denoiser's device, in seconds."""
    inputs = inputs if inputs is not None else split.example_inputs()
    device = inputs[split.sample_argument].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    samples: list[list[float]] = [[] for _ in split.units]

    def probe(i, step):
        sync()
        start = time.perf_counter()
        step()
        sync()
        samples[i].append(time.perf_counter() - start)

    with torch.no_grad():
        for _ in range(repeats + 1):  # the first pass warms caches and allocators
            _run_chain_with_probe(split, inputs, probe)
    return [sorted(s[1:])[len(s[1:]) // 2] for s in samples]


# ------------------------------------------------------------------------ partition


def balanced_cuts(costs: Sequence[float], stages: int) -> list[int]:
    """Cut points splitting ``costs`` into ``stages`` contiguous non-empty runs.

    Minimises the most expensive run (the pipeline's bottleneck), by dynamic
    programming; among equally good splits the earliest cuts win, so the result is
    deterministic. Returns ``stages + 1`` indices starting with 0 and ending with
    ``len(costs)``.
    """
    n = len(costs)
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if stages > n:
        raise ValueError(f"cannot split {n} units into {stages} stages: stages must be between 1 and {n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: minimal bottleneck splitting the first i units into k runs
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    choice = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i] - 1e-12 * max(1.0, abs(value)):
                    best[k][i], choice[k][i] = value, j
    cuts, i = [n], n
    for k in range(stages, 0, -1):
        i = choice[k][i]
        cuts.append(i)
    return cuts[::-1]


@dataclass
class Stage:
    """A contiguous run of units: what one rank (or replica group) computes."""

    index: int
    units: list[Unit]

    def __call__(self, split: DenoiserSplit, state: BoundaryState, cond: Any) -> BoundaryState:
        return split.forward_units(state, cond, self.units)

    def modules(self) -> list[nn.Module]:
        return [m for unit in self.units for m in unit.modules]

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]


def make_stages(split: DenoiserSplit, cuts: Sequence[int]) -> list[Stage]:
    n = len(split.units)
    if list(cuts) != sorted(cuts) or cuts[0] != 0 or cuts[-1] != n or len(set(cuts)) != len(cuts):
        raise ValueError(f"cut points must increase strictly from 0 to {n}, got {list(cuts)}")
    return [Stage(k, split.units[a:b]) for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
