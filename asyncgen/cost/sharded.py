"""One rank's share of diffusers' Ulysses context parallelism, run in one process: what a unit costs at that shape.

Under Ulysses of degree ``P`` (``ContextParallelConfig(ulysses_degree=P)``) each rank runs the
model's forward on its share: the tensors the class's ``_cp_plan`` splits are cut to ``1/P``
along their split dimension, so every layer between the split and the gather works on ``1/P``
of the tokens, except self-attention, where all-to-alls turn the query, key and value from
(``1/P`` of the tokens, every head) into (every token, ``1/P`` of the heads), attention runs
there, and the output goes back the same way. Small shapes do not scale linearly (a kernel on
half the tokens is rarely half the time; the weights are read whole either way), so the layout
chooser prices a Ulysses rank by running exactly that work here:

* the plan's splits are applied by hooks that keep the first of the ``P`` chunks (diffusers'
  split keeps the rank's own chunk; every chunk has the same shape), its gathers by hooks that
  repeat the chunk ``P`` times (the shape the all-gather gives back);
* each self-attention call (a ``scaled_dot_product_attention`` whose keys are as long as its
  queries, as :func:`asyncgen.cost.layout.count_shapes` counts the calls Ulysses exchanges)
  runs over ``P`` times the tokens with ``1/P`` of the heads, with the two rearranging copies
  a Ulysses rank makes of each of query, key, value and output around an exchange;
* a cross-attention to a whole text runs on the share as it is (Wan); one whose keys come from
  a sequence the plan splits (LTX-Video's text) is refused: Ulysses exchanges it too, which
  neither this run nor the all-to-all count prices. (A text exactly as long as a split sequence
  would be taken for one: the test is on lengths.)

What is left out is the exchange itself: its bytes go over the link, priced by the link probe.
Values do not matter (the query's own numbers stand in for the gathered ones): only shapes,
layouts and the work they cost. Runs as well on fake tensors (counted FLOPs and bytes) as on
real ones (timed).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from asyncgen._compat import context_parallel_hooks, context_parallel_plan


@dataclass
class ShardedRun:
    """What one sharded run did: the tensors it cut and the attention calls it ran at the gathered shape."""

    degree: int
    # (plan key, input name or output index, shape before, shape after) per split
    splits: list[tuple[str, object, tuple, tuple]] = field(default_factory=list)
    # (query shape as called, query shape run) per self-attention call
    attention: list[tuple[tuple, tuple]] = field(default_factory=list)

    def split_lengths(self) -> set[int]:
        """The lengths the plan's splits left along the dimensions they cut."""
        return {after[d] for _, _, before, after in self.splits for d in range(len(after)) if after[d] != before[d]}


def _forward_parameters(module: nn.Module) -> list[str]:
    # the class's forward (a hook registry may have replaced the instance's with a wrapper taking *args)
    return list(inspect.signature(type(module).forward).parameters)[1:]


class _Shard:
    """Cuts a plan entry's tensors to one rank's share."""

    def __init__(self, key: str, degree: int, run: ShardedRun):
        self.key, self.degree, self.run = key, degree, run

    def cut(self, name, value, entry):
        if isinstance(value, (list, tuple)):
            entries = entry if isinstance(entry, (list, tuple)) else [entry] * len(value)
            return type(value)(self.cut(name, v, e) for v, e in zip(value, entries))
        if not isinstance(value, torch.Tensor) or (entry.expected_dims is not None
                                                   and value.dim() != entry.expected_dims):
            return value  # as diffusers' split leaves a tensor of another rank alone
        size = value.shape[entry.split_dim]
        if size % self.degree:
            raise ValueError(f"Ulysses degree {self.degree} does not divide '{self.key or '(the model)'}'s {name} "
                             f"along dimension {entry.split_dim} ({size}); the degree must divide the tokens")
        out = value.narrow(entry.split_dim, 0, size // self.degree)
        self.run.splits.append((self.key, name, tuple(value.shape), tuple(out.shape)))
        return out


def _split_inputs(shard: _Shard, entries: dict):
    def hook(module, args, kwargs):
        names = _forward_parameters(module)
        args = list(args)
        for name, entry in entries.items():
            if name in kwargs:
                kwargs[name] = shard.cut(name, kwargs[name], entry)
            elif isinstance(name, str) and name in names and names.index(name) < len(args):
                args[names.index(name)] = shard.cut(name, args[names.index(name)], entry)
        return tuple(args), kwargs
    return hook


def _split_outputs(shard: _Shard, entries: dict):
    def hook(module, args, output):
        single = isinstance(output, torch.Tensor)
        outputs = [output] if single else list(output)
        for index, entry in entries.items():
            outputs[index] = shard.cut(index, outputs[index], entry)
        return outputs[0] if single else type(output)(outputs)
    return hook


def _gather_outputs(degree: int, entries: list):
    def hook(module, args, output):
        single = isinstance(output, torch.Tensor)
        outputs = [output] if single else list(output)
        for i, entry in enumerate(entries):
            if entry is not None:
                # the all-gather's result: P chunks side by side (a contiguous copy, as the gather makes)
                outputs[i] = torch.cat([outputs[i].contiguous()] * degree, dim=entry.gather_dim)
        return outputs[0] if single else type(output)(outputs)
    return hook


def heads_to_sequence_layout(x: torch.Tensor, degree: int) -> torch.Tensor:
    """A query (or key, value) as attention is called with it, ``(batch, heads, tokens, width)`` viewed from
    ``(batch, tokens, heads, width)``, rearranged as a Ulysses rank has it after its exchange: ``(batch, heads / P,
    P * tokens, width)``, viewed the same way. Two copies, as the rank makes them: grouped by destination to send,
    then the received groups laid out as one sequence."""
    b, h, s, d = x.shape
    per_rank = x.transpose(1, 2).reshape(b, s, degree, h // degree, d)
    to_send = per_rank.permute(2, 1, 0, 3, 4).contiguous()  # (P, tokens, batch, heads / P, width)
    received = to_send.flatten(0, 1).permute(1, 0, 2, 3).contiguous()  # (batch, P * tokens, heads / P, width)
    return received.transpose(1, 2)


def sequence_to_heads_layout(out: torch.Tensor, degree: int) -> torch.Tensor:
    """The way back: attention's output over every token and ``1/P`` of the heads, ``(batch, heads / P, P * tokens,
    width)``, as the rank's share of the tokens with every head, ``(batch, heads, tokens, width)`` viewed from a
    contiguous ``(batch, tokens, heads, width)``; again two copies."""
    b, h_part, total, d = out.shape
    s = total // degree
    to_send = out.transpose(1, 2).reshape(b, degree, s, h_part, d).permute(1, 3, 0, 2, 4).contiguous()
    received = to_send.flatten(0, 1).permute(1, 2, 0, 3).contiguous()  # (batch, tokens, heads, width)
    return received.transpose(1, 2)


class _UlyssesAttention(TorchFunctionMode):
    """Each self-attention call run at the gathered shape (every token, ``1/P`` of the heads)."""

    def __init__(self, run: ShardedRun):
        super().__init__()
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value")
        q, k, v = (args[i] if len(args) > i else kwargs.pop(n) for i, n in enumerate(names))
        rest = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), args[3:]), **kwargs)
        if q.ndim != 4 or q.shape[-2] != k.shape[-2]:
            if q.ndim == 4 and k.shape[-2] in self.run.split_lengths():
                # keys from a sequence the plan cut (LTX-Video splits its text): Ulysses exchanges this call too, at
                # a cost neither this run nor the all-to-all count (self-attention calls only) prices
                raise ValueError(f"a cross-attention whose {k.shape[-2]} keys come from a sequence the context-"
                                 "parallel plan splits: Ulysses exchanges it too, which the layout chooser does not "
                                 "price")
            return func(q, k, v, **rest)  # cross-attention to the whole text: not exchanged, runs on the share
        degree = self.run.degree
        if q.shape[1] % degree or k.shape[1] % degree:
            raise ValueError(f"Ulysses degree {degree} does not divide the attention heads ({q.shape[1]}); the "
                             "degree must divide them")
        if rest.get("attn_mask") is not None:
            raise ValueError("a self-attention call with a mask: its sharded shape is not modelled here")
        q2, k2, v2 = (heads_to_sequence_layout(t, degree) for t in (q, k, v))
        self.run.attention.append((tuple(q.shape), tuple(q2.shape)))
        return sequence_to_heads_layout(func(q2, k2, v2, **rest), degree)


@contextlib.contextmanager
def ulysses_share(model: nn.Module, degree: int):
    """While inside, ``model``'s forward does one Ulysses rank's work of degree ``degree`` (see the module
    docstring); yields the :class:`ShardedRun` that records what it cut and ran."""
    plan = context_parallel_plan(type(model))
    if plan is None:
        raise ValueError(f"diffusers gives {type(model).__name__} no context-parallel plan (_cp_plan)")
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2:
        raise ValueError(f"degree={degree!r}: a Ulysses degree is a whole number of at least 2")
    cp_input = context_parallel_hooks()[2]
    run = ShardedRun(degree)
    handles = []
    try:
        for key, entry in plan.items():
            if "*" in key:
                raise ValueError(f"{type(model).__name__}'s context-parallel plan names '{key}' (a wildcard), which "
                                 "the sharded timing does not resolve")
            module = model.get_submodule(key) if key else model
            if isinstance(entry, dict):
                shard = _Shard(key, degree, run)
                outputs = {i: e for i, e in entry.items() if isinstance(e, cp_input) and e.split_output}
                inputs = {n: e for n, e in entry.items() if n not in outputs}
                if inputs:
                    handles.append(module.register_forward_pre_hook(_split_inputs(shard, inputs), with_kwargs=True))
                if outputs:
                    handles.append(module.register_forward_hook(_split_outputs(shard, outputs)))
            else:
                handles.append(module.register_forward_hook(
                    _gather_outputs(degree, list(entry) if isinstance(entry, (list, tuple)) else [entry])))
        with _UlyssesAttention(run):
            yield run
    finally:
        for handle in handles:
            handle.remove()


def sharded_unit_times(split, inputs: dict, degree: int, repeats: int = 3) -> list[float]:
    """Seconds of each unit of ``split`` as one rank of Ulysses degree ``degree`` runs it on ``inputs``
    (the least of ``repeats`` timed passes, :func:`asyncgen.cost.estimate.least_unit_costs`, as the whole units
    are timed)."""
    from asyncgen.cost.estimate import least_unit_costs

    with ulysses_share(split.denoiser, degree) as run:
        times = least_unit_costs(split, inputs, repeats)
    _check_sharded(run, split)
    return times


def _check_sharded(run: ShardedRun, split) -> None:
    if not run.splits:
        raise ValueError(f"{type(split.denoiser).__name__}: its context-parallel plan cut nothing on this call")
