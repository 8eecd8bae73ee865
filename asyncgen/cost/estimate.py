"""The cost of each unit of a split: counted FLOPs/traffic on shapes, or measured time.

Owns the per-unit cost models the cut chooser reads; it runs the split's chain of units,
never a schedule.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from asyncgen.cost.fake import run_on_shapes
from asyncgen.split.units import DenoiserSplit


def run_chain_with_probe(split: DenoiserSplit, inputs: dict, probe: Callable[[int, Callable[[], None]], None]):
    runner = getattr(split, "run_units_with_probe", None)
    if runner is not None:  # a split that runs all its units inside one forward (asyncgen.split.transformer.block_split)
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
    from torch.utils.flop_counter import FlopCounterMode

    from asyncgen._compat import torch_dispatch_mode, tree_leaves

    flops_per_byte = 8.0
    bytes_moved = [0]

    class _ByteCounter(torch_dispatch_mode()):
        # bytes read (activations and weights) plus bytes written by every op
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.prim.device.default:  # a metadata query (fake tensors made from meta ask it)
                return out
            flat = tree_leaves((args, kwargs or {}, out))
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
        run_chain_with_probe(split, shaped, probe)
        return costs

    return run_on_shapes(split.denoiser, inputs, split.sample_argument, count)


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
            run_chain_with_probe(split, inputs, probe)
    return [sorted(s[1:])[len(s[1:]) // 2] for s in samples]


def least_unit_costs(split: DenoiserSplit, inputs: dict, repeats: int = 3) -> list[float]:
    """Seconds of each unit: the least of ``repeats`` timed passes (each after its own warm-up pass).

    The least, not the median: on a shared machine a pass that another process interrupted is
    slower, never faster, so the least is the compute's own cost.
    """
    passes = [measure_unit_costs(split, inputs, repeats=1) for _ in range(repeats)]
    return [min(times) for times in zip(*passes)]
