"""Finding a transformer's block lists and its boundary by tracing its forward once.

The forward runs under ``FakeTensorMode`` (or on real tensors at the example's tiny size
when it reads tensor values) with hooks on every member of every ``ModuleList`` and a
dispatch mode that labels each tensor with the top-level calls it derives from. A list
whose members are each called once, in order, each taking something the previous one
produced, is a block list; the inputs of block ``k`` that derive from an earlier block are
the boundary state, its other inputs are conditioning the model recomputes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from diffusers.utils import logging
from torch import nn

from asyncgen._compat import torch_dispatch_mode, tree_leaves

logger = logging.get_logger(f"diffusers.{__name__}")


class SplitRefused(TypeError):
    """The generic block split cannot find this denoiser's blocks or prove itself exact on it.

    A ``TypeError``, like any other denoiser asyncgen cannot split: callers that ask
    whether a class splits (``describe_pipeline``) catch that one kind."""


class NeedsRealWeights(SplitRefused):
    """The forward reads tensor values in Python (a mask's ``.tolist()``, ``nonzero``): it traces on real
    tensors only, so a model built on the meta device (config only, no weights) cannot be split."""


class ExampleUnavailable(NeedsRealWeights):
    """No valid example call of the forward could be built from the signature and the config alone (the
    config path: ``asyncgen plan``, stage-only loading): a loaded pipeline's first denoiser call gives one."""


def bind_call(signature: inspect.Signature, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    return signature.bind(*args, **kwargs)


def named_values(bound: inspect.BoundArguments) -> dict[str, Any]:
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


def replace_named(bound: inspect.BoundArguments, values: dict[str, Any]) -> tuple[tuple, dict]:
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


class _Provenance(torch_dispatch_mode()):
    """Labels every tensor an op produces with the union of its inputs' labels (a bit mask
    of the top-level module calls it derives from, and of the sample: see ``_bit``). Keeps the tensors alive so ``id``s stay unique."""

    def __init__(self):
        super().__init__()
        self.labels: dict[int, int] = {}
        self._alive: list[torch.Tensor] = []

    def label(self, value) -> int:
        mask = 0
        for t in tree_leaves(value):
            if isinstance(t, torch.Tensor):
                mask |= self.labels.get(id(t), 0)
        return mask

    def add(self, value, bit: int, fresh: bool = False) -> None:
        # ``fresh``: a module call's outputs are labelled with that call alone, so a label says
        # which calls reach a tensor directly (through the code between calls, not through a call)
        for t in tree_leaves(value):
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
    output_is_list: bool = False  # the forward returns its prediction as a per-sample list (ZImage)


def _leaf_source(out: torch.Tensor, call: _Call, following: _Call | None,
                 boundary: Sequence[str]) -> tuple[str | None, bool]:
    """Which input of ``call`` a skipped block hands through in place of output ``out``, and whether that
    is known from the data flow (``True``) or only guessed from a matching shape (``False``)."""
    for name, value in call.inputs.items():
        if value is out:
            return name, True
    if following is not None:
        for name, value in following.inputs.items():
            if value is out and isinstance(call.inputs.get(name), torch.Tensor) and call.inputs[name].shape == out.shape:
                return name, True
    for names in (boundary, list(call.inputs)):
        for name in names:
            value = call.inputs.get(name)
            if isinstance(value, torch.Tensor) and value.shape == out.shape and value.dtype == out.dtype:
                return name, False
    return None, False


def _passthrough_spec(call: _Call, following: _Call | None, boundary: Sequence[str]):
    """The block's output structure with each leaf naming the input it stands in for, and whether every leaf
    was found by data flow (a last block of a list feeds code, not a block, so its leaves are found by shape,
    which is ambiguous where two inputs have one shape: AuraFlow's text and image streams at equal lengths)."""
    exact = [True]

    def spec(out):
        if out is None:
            return ("none",)
        if isinstance(out, torch.Tensor):
            source, known = _leaf_source(out, call, following, boundary)
            if source is None:
                raise SplitRefused(
                    f"block {call.list_name}.{call.index} returns a tensor of shape {tuple(out.shape)} that is not "
                    "the shape of any of its inputs, so it cannot be skipped on the ranks that do not run it"
                )
            exact[0] &= known
            return ("input", source)
        if isinstance(out, (tuple, list)):
            return ("seq", type(out), [spec(o) for o in out])
        raise SplitRefused(f"block {call.list_name}.{call.index} returns a {type(out).__name__}; "
                           "the generic split handles tensors, tuples and lists")
    result = spec(call.output)
    return result, exact[0]


def _same_structure(a, b) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "seq":
        return a[1] is b[1] and len(a[2]) == len(b[2]) and all(_same_structure(x, y) for x, y in zip(a[2], b[2]))
    return True


def build_passthrough(spec, inputs: dict[str, Any]):
    kind = spec[0]
    if kind == "none":
        return None
    if kind == "input":
        return inputs[spec[1]]
    return spec[1](build_passthrough(s, inputs) for s in spec[2])


def stacked(value) -> torch.Tensor:
    """A forward's per-sample list of tensors (ZImage's latents and predictions) as one batch tensor."""
    if isinstance(value, torch.Tensor):
        return value
    shapes = {tuple(v.shape) for v in value}
    if len(shapes) != 1:
        raise SplitRefused(f"the per-sample tensors have different shapes {sorted(shapes)}; the split needs one "
                           "shape per call (one resolution per batch)")
    return torch.stack(list(value))


# provenance labels: bit 0 marks what derives from the sample (the latents), bit i + 1 the output of call i
_SAMPLE = 1


def _bit(call: int) -> int:
    return 1 << (call + 1)


def _call_of(label: int) -> int:
    """The latest call whose output ``label`` (block bits only) derives from."""
    return label.bit_length() - 2


def _one_chain(calls: list[_Call], by_list: dict[str, list[int]], block_lists: set[str]) -> set[str]:
    """The block lists that form one chain, ending with the list called last.

    A list continues the chain when its first block reads the last block of exactly one
    other list. Lists that only prepare inputs for a later list, side by side (Lumina2's
    and ZImage's noise and context refiners, both read by the first main layer), are not
    stages: a cut between them would leave one refiner's output out of the boundary. They
    run as the model's code before the first block, on every rank.
    """
    if not block_lists:
        return block_lists
    last_call = {name: max(by_list[name]) for name in block_lists}
    chain = [max(block_lists, key=lambda name: last_call[name])]
    # only lists on the latents' path: a list that embeds conditioning (Wan I2V's image embedder's FeedForward,
    # called when the pipeline passes image states) feeds the blocks, but as conditioning every rank computes
    # (a call's outputs carry its own bit only, so the path is followed list by list, in call order)
    on_path: set[str] = set()
    for name in sorted(block_lists, key=lambda name: min(by_list[name])):
        reach = _SAMPLE | sum(_bit(i) for other in on_path for i in by_list[other])
        if any(label & reach for label in calls[min(by_list[name])].input_labels.values()):
            on_path.add(name)
    while True:
        first = calls[min(by_list[chain[-1]])]
        read = {name for name in on_path if name not in chain and
                any(label & _bit(last_call[name]) for label in first.input_labels.values())}
        if len(read) != 1:
            return set(chain)
        chain.append(read.pop())


def trace_blocks(model: nn.Module, inputs: dict, sample_argument: str,
                 to_model: Callable[[dict], dict] = dict) -> BlockTrace:
    """Find ``model``'s block lists and the boundary state at each block, from one fake forward.

    ``to_model`` turns a call as the split holds it (the sample one batch tensor) into the
    forward's own arguments (a per-sample list where the forward takes one)."""
    from asyncgen.cost.fake import run_on_shapes, value_read_errors

    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    member = {id(child): (name, i) for name, m in lists for i, child in enumerate(m)}
    calls: list[_Call] = []
    depth = [0]
    provenance = _Provenance()
    handles = []

    def pre(module, args, kwargs):
        if depth[0] == 0:
            signature = inspect.signature(module.forward)
            values = named_values(bind_call(signature, args, kwargs))
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
            provenance.add(output, _bit(index), fresh=True)

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
            provenance.add(shaped[sample_argument], _SAMPLE)
            return model(**to_model(shaped), return_dict=False), shaped[sample_argument]

    try:
        try:  # fake tensors (a partly loaded model, one rank's stage, mixes meta and real), or real ones if it must
            output, sample = run_on_shapes(model, inputs, sample_argument, traced)
        except Exception as exc:  # noqa: BLE001 - e.g. an op whose output shape depends on values, weights on meta
            refusal = NeedsRealWeights if isinstance(exc, value_read_errors()) else SplitRefused
            raise refusal(f"{type(model).__name__}: its forward cannot be traced on fake tensors "
                          f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})") from exc
        prediction = output[0] if isinstance(output, (tuple, list)) else output
        prediction_label = provenance.label(prediction)
        listed = isinstance(prediction, (tuple, list))
        if listed:  # a per-sample list (ZImage)
            prediction = stacked(prediction)
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
        if all(any(label & _bit(prev) for label in calls[i].input_labels.values())
               for prev, i in zip(indices, indices[1:])):
            block_lists.add(name)
    # a one-block list continues a chain (a final single block, say): it takes what a block produced
    chain_bits = sum(_bit(i) for i, c in enumerate(calls) if c.list_name in block_lists)
    for name, indices in by_list.items():
        if len(indices) == 1 and sizes[name] == 1 and any(
                label & chain_bits for label in calls[indices[0]].input_labels.values()):
            block_lists.add(name)
    if not block_lists:
        # every list has one member (a model of one block per list: ZImage with one layer, HiDream with one double-
        # and one single-stream block): the chain of such lists ending with the one called last
        block_lists = {name for name, indices in by_list.items() if len(indices) == 1 and sizes[name] == 1}
    block_lists = _one_chain(calls, by_list, block_lists)
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
    block_bits = sum(_bit(i) for i in order)
    # Each block must read block outputs only from the block just before it (and the head only
    # from the last block): a forward that holds an older block's output (a long skip in a
    # Python list, an accumulator) carries state past a cut that the boundary does not.
    suspect = []
    for j, i in enumerate(order):
        allowed = _bit(order[j - 1]) if j else 0
        for label in calls[i].input_labels.values():
            stray = label & block_bits & ~allowed
            if stray:
                producer = order.index(_call_of(stray))
                suspect.append((producer + 1, j + 1))
    stray = prediction_label & block_bits & ~_bit(order[-1])
    if stray:
        suspect.append((order.index(_call_of(stray)) + 1, len(order)))
    boundary = []
    for i in order:
        call = calls[i]
        names = [n for n, v in call.inputs.items() if isinstance(v, torch.Tensor) and call.input_labels[n] & block_bits]
        names.sort(key=lambda n: (n != sample_argument and n != "hidden_states", list(call.inputs).index(n)))
        boundary.append(tuple(names))
    # the first block's state is what later blocks call by the same names
    if not boundary[0] and len(order) > 1:
        boundary[0] = tuple(n for n in boundary[1] if isinstance(calls[first].inputs.get(n), torch.Tensor))
    passthrough, found_by_flow = [], {}
    for j, i in enumerate(order):
        spec, exact = _passthrough_spec(calls[i], calls[order[j + 1]] if j + 1 < len(order) else None, boundary[j])
        sibling = found_by_flow.get((calls[i].list_name, type(calls[i].module)))
        if not exact and sibling is not None and _same_structure(sibling, spec):
            spec = sibling  # the same block class hands its inputs through the same way
        if exact:
            found_by_flow[(calls[i].list_name, type(calls[i].module))] = spec
        passthrough.append(spec)
    dims = tuple(d if k >= sample.ndim or d != sample.shape[k] else None for k, d in enumerate(prediction.shape))
    dtype = None if prediction.dtype == sample.dtype else prediction.dtype
    return BlockTrace(
        names=[f"{calls[i].list_name}.{calls[i].index}" for i in order],
        modules=[calls[i].module for i in order],
        boundary=boundary,
        passthrough=passthrough,
        output_rule=(dims, dtype),
        output_is_list=listed,
        suspect_ranges=sorted(set(suspect)),
    )
