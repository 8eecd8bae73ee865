"""Activation memory per unit of a split, estimated on shapes.

The memory planner adds the largest unit's activations to each rank's weights.
"""

from __future__ import annotations

import weakref

import torch


def estimate_unit_activation_bytes(split, inputs: dict) -> list[int]:
    """Estimated peak bytes of live tensors while each unit runs (an estimate, not a measurement).

    The denoiser runs once under ``FakeTensorMode`` (no memory, no arithmetic; meta
    parameters work; real tensors where the forward reads values, see ``run_on_shapes``) with a dispatch mode that adds the bytes of every freshly allocated
    op output and subtracts them when Python frees the tensor. A unit's figure is the
    largest live total while it runs: the boundary state it receives (a UNet's pending
    skip tensors included), the step's conditioning, its intermediates and its output.
    ``scaled_dot_product_attention`` counts as the fused kernel GPUs run (flash or
    memory-efficient attention: the output, never the tokens x tokens matrix the CPU's
    math path would hold). What it leaves out: kernel workspace, allocator
    fragmentation, the CUDA context, and the runtime's communication buffers (about one
    boundary state each way). Views and in-place results add nothing.
    """
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    from asyncgen._compat import op_returns_alias, torch_dispatch_mode, tree_leaves
    from asyncgen.cost.estimate import run_chain_with_probe
    from asyncgen.cost.fake import run_on_shapes

    class _LiveBytes(torch_dispatch_mode()):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0

        def _free(self, nbytes: int) -> None:
            self.live -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not op_returns_alias(func):
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        nbytes = t.numel() * t.element_size()
                        self.live += nbytes
                        weakref.finalize(t, self._free, nbytes)
                self.peak = max(self.peak, self.live)
            return out

    class _FusedAttention(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                query = args[0] if args else kwargs["query"]
                value = args[2] if len(args) > 2 else kwargs["value"]
                return query.new_empty((*query.shape[:-1], value.shape[-1]))
            return func(*args, **kwargs)

    peaks: list[int] = []

    def measure(shaped: dict) -> list[int]:  # as estimate_unit_costs runs (fake, or real where it must)
        peaks.clear()
        counter = _LiveBytes()
        input_bytes = sum(t.numel() * t.element_size() for t in tree_leaves(shaped) if isinstance(t, torch.Tensor))

        def probe(i, step):
            counter.peak = counter.live
            step()
            peaks.append(counter.peak + input_bytes)

        with counter, _FusedAttention():
            run_chain_with_probe(split, shaped, probe)
        return peaks

    return run_on_shapes(split.denoiser, inputs, split.sample_argument, measure)
