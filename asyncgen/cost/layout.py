"""Choosing how to spread one pipeline over N devices: every layout's step time predicted, the fastest allowed chosen.

A *layout* is a way to use the devices: AsyncDiff stages ``N`` with stride ``S`` (and its
exact warm-up steps), CFG parallel (the [uncond, cond] batch split over two groups), diffusers'
context parallelism (Ulysses degree ``P``: each rank holds the sequence's ``1/P`` and all heads,
four all-to-alls per self-attention call turn that into all tokens and ``1/P`` of the heads and
back), and their products. :func:`enumerate_layouts` lists those that fit the devices,
:func:`predict` gives each one's mean step time from a cost model, :func:`choose` picks the
fastest among the allowed.

The cost model (:class:`DenoiserCosts`, one denoiser pass):

- compute: seconds per unit (measured on real weights, or counted FLOPs and bytes divided by
  a measured :class:`~asyncgen.cost.device_rate.DeviceRate`), plus the forward's part outside the
  units (embeddings, patching, output head), which every stage's rank runs;
- the stages' cuts: the ones the wrapper chooses (balanced on the FLOP estimate);
- bytes: the boundary state at each cut, the prediction, and per unit the self-attention
  calls and the bytes of one of their q/k/v/output tensors (what Ulysses exchanges);
- the link (:class:`Link`): one message of ``b`` bytes costs ``latency + b / bandwidth``,
  measured between the ranks (:func:`asyncgen.comm.link_probe.probe_link`), which also measures
  ``g``, how much slower each rank computes when all compute at once than alone (ranks that
  share a host's cores or memory bandwidth; 1 for one device).

Prediction for ``T`` steps, per denoiser pass (a pipeline may make two per step: Wan's CFG),
with batch share ``f`` (1/2 under CFG parallel) and sequence share ``1/P``:

- stage ``k`` computes ``t_k = g * (f * units_k + f * shared)`` (under CFG parallel the units'
  times on half the batch where they were measured so, instead of ``f * units_k``; under Ulysses
  ``P`` the units measured at one rank's sharded shape, :mod:`asyncgen.cost.sharded`: ``1/P`` of the
  tokens, self-attention over every token with ``1/P`` of the heads) plus its Ulysses all-to-alls
  (``4 * calls_k`` all-to-alls of ``f * attention_bytes / P`` each; an all-to-all over ``P``
  ranks as the probe timed it over that many, else ``P - 1`` messages of ``1/P`` of it) and,
  on the last stage, the all-gather of the
  output (``P - 1`` messages of ``f * output_bytes / P``);
- an exact step runs the stages one after the other: ``sum t_k`` plus each boundary's message
  plus, when other ranks wait for it (stages or CFG groups), the prediction's message;
- after the warm-up, a round of ``S`` steps runs every stage at once: ``max_k (t_k + its
  outgoing message)`` (the boundary state it sends on, or the prediction);
- ``E`` exact steps (``max(warmup, 1)`` with stages, every step without), ``ceil((T - E) / S)``
  rounds; the mean step is ``passes * (E * exact + rounds * round) / T``.

What it leaves out, on purpose: the work outside the denoiser (text encoders, the VAE: run
once per image in every layout), overlap of a transfer with the compute it was posted before
(counted as on the critical path, once per round), and contention between ranks on one host.

Exact layouts (the same picture as one device): one stage (with CFG parallel or context
parallelism or neither), or stages whose warm-up covers every step. Every layout listed runs on
asyncgen's wrapper: context parallelism alone and its products with stages or CFG parallel with
``context_parallel=P`` (:mod:`asyncgen.runtime.context_parallel`; with one stage it computes what
diffusers' ``enable_parallelism`` computes). Ulysses degrees are listed only where the units were
measured at that degree's sharded shape (which needs the degree to divide the heads and the
tokens), and with stages only where the class's plan can be moved onto a stage
(:attr:`DenoiserCosts.stages_context_parallel`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from asyncgen.cost.cuts import balanced_cuts

# all-to-alls per self-attention call under Ulysses: query, key and value to head shards, the output back
ALL_TO_ALLS_PER_ATTENTION = 4


@dataclass(frozen=True)
class Link:
    """One message of ``b`` bytes between two ranks costs ``latency_s + b / bandwidth_bytes_per_s``;
    ranks computing at once each compute ``parallel_slowdown`` times slower than one alone."""

    latency_s: float
    bandwidth_bytes_per_s: float
    parallel_slowdown: float = 1.0
    # an all-to-all measured as such over `all_to_all_world` ranks: latency + payload per rank / bytes_per_s
    all_to_all_latency_s: float | None = None
    all_to_all_bytes_per_s: float | None = None
    all_to_all_world: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(f"latency_s={self.latency_s}: need a finite number of seconds >= 0")
        if not (self.bandwidth_bytes_per_s > 0):
            raise ValueError(f"bandwidth_bytes_per_s={self.bandwidth_bytes_per_s}: need a positive number")
        if not (math.isfinite(self.parallel_slowdown) and self.parallel_slowdown > 0):
            raise ValueError(f"parallel_slowdown={self.parallel_slowdown}: need a positive finite factor")

    def message_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s if nbytes > 0 else 0.0

    def all_to_all_s(self, payload_bytes: float, world: int) -> float:
        """One all-to-all of ``payload_bytes`` per rank over ``world`` ranks: as measured where the probe timed
        all-to-alls over as many ranks; else each rank sends ``1/world`` of it to each other rank, one message
        after another (gloo's pairwise exchange; NCCL's runs them at once, so this is its upper bound)."""
        if self.all_to_all_world == world and self.all_to_all_bytes_per_s:
            return self.all_to_all_latency_s + payload_bytes / self.all_to_all_bytes_per_s
        return (world - 1) * self.message_s(payload_bytes / world)

    @classmethod
    def from_measurement(cls, data: dict | None) -> "Link":
        """From a :class:`~asyncgen.comm.link_probe.LinkMeasurement`'s ``to_dict()``; None (one device): free."""
        if data is None:
            return cls(0.0, math.inf, 1.0)
        return cls(data["latency_s"], data["bandwidth_bytes_per_s"], data["parallel_slowdown"],
                   data["all_to_all_latency_s"], data["all_to_all_bytes_per_s"], data["world_size"])

    def all_gather_s(self, shard_bytes: float, world: int) -> float:
        return (world - 1) * self.message_s(shard_bytes)


@dataclass(frozen=True)
class DenoiserCosts:
    """What one denoiser pass costs, per unit of its split (see the module docstring)."""

    unit_names: tuple[str, ...]
    unit_seconds: tuple[float, ...]  # one pass over the whole pass batch
    shared_seconds: float  # the forward outside the units, per pass: every stage's rank runs it
    cut_costs: tuple[float, ...]  # what the wrapper balances its cuts on (its FLOP estimate)
    boundary_bytes: tuple[float, ...]  # len(units) - 1: the state crossing a cut after unit i
    output_bytes: float  # the prediction of one pass
    attention_calls: tuple[int, ...]  # per unit: self-attention calls Ulysses would exchange
    attention_bytes: float  # one of q/k/v/output of one such call, whole sequence, whole pass batch
    attention_heads: int | None  # the fewest heads of those calls (a Ulysses degree must divide it); None: none
    passes_per_step: int = 1  # denoiser calls per step (2 where a pipeline runs CFG as two calls: Wan)
    pass_batch: int = 2  # 2: [uncond, cond] in one pass, which CFG parallel can split; 1: nothing to split
    context_parallel: str | None = None  # None: diffusers can run this class context-parallel; else why not
    # each unit on half the pass batch (what a CFG-parallel rank runs), where measured: a kernel on half the
    # batch is rarely half the time on CPUs (None: half the whole batch's)
    half_batch_unit_seconds: tuple[float, ...] | None = None
    # per Ulysses degree P: each unit as one of P ranks runs it (asyncgen.cost.sharded), measured like unit_seconds;
    # a degree is a candidate only where it is here
    sharded_unit_seconds: dict[int, tuple[float, ...]] = field(default_factory=dict)
    # the same on half the pass batch (CFG parallel x Ulysses), where measured (else half of the above)
    half_batch_sharded_unit_seconds: dict[int, tuple[float, ...]] = field(default_factory=dict)
    # degrees not measured, and why (they do not divide the heads or the tokens ...)
    ulysses_refusals: dict[int, str] = field(default_factory=dict)
    # None: Ulysses can run inside stages (the plan splits the first block's inputs); else why not
    stages_context_parallel: str | None = None
    notes: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        n = len(self.unit_seconds)
        if n < 1 or len(self.unit_names) != n or len(self.cut_costs) != n or len(self.attention_calls) != n:
            raise ValueError("unit_names, unit_seconds, cut_costs and attention_calls need one entry per unit "
                             f"(got {len(self.unit_names)}, {n}, {len(self.cut_costs)}, {len(self.attention_calls)})")
        if len(self.boundary_bytes) != n - 1:
            raise ValueError(f"boundary_bytes needs one entry per cut between units ({n - 1}), "
                             f"got {len(self.boundary_bytes)}")
        if self.half_batch_unit_seconds is not None and len(self.half_batch_unit_seconds) != n:
            raise ValueError(f"half_batch_unit_seconds needs one entry per unit ({n}), "
                             f"got {len(self.half_batch_unit_seconds)}")
        if self.passes_per_step not in (1, 2) or self.pass_batch not in (1, 2):
            raise ValueError(f"passes_per_step={self.passes_per_step}, pass_batch={self.pass_batch}: each is 1 or 2")
        for name in ("sharded_unit_seconds", "half_batch_sharded_unit_seconds"):
            for degree, times in getattr(self, name).items():
                if int(degree) < 2 or len(times) != n:
                    raise ValueError(f"{name}[{degree}]: need a degree of at least 2 and one entry per unit ({n}), "
                                     f"got {len(times)}")

    def cuts(self, stages: int) -> list[int]:
        return balanced_cuts(self.cut_costs, stages)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Layout:
    stages: int = 1
    stride: int = 1
    warmup: int = 0  # requested exact steps (the schedule runs at least one with stages)
    cfg_parallel: bool = False
    ulysses: int = 1  # context-parallel degree (diffusers' Ulysses); 1: none

    @property
    def devices(self) -> int:
        return (self.stages + self.stride - 1) * (2 if self.cfg_parallel else 1) * self.ulysses

    @property
    def name(self) -> str:
        parts = []
        if self.stages > 1 or self.stride > 1:
            parts.append(f"stages {self.stages}, stride {self.stride}, warm-up {self.warmup}")
        if self.cfg_parallel:
            parts.append("CFG parallel")
        if self.ulysses > 1:
            parts.append(f"Ulysses {self.ulysses}")
        return " x ".join(parts) if parts else "one device"

    def exact_steps(self, steps: int) -> int:
        """Steps run exactly: all of them with one stage; with stages, the warm-up (at least one)."""
        return steps if self.stages == 1 else min(max(self.warmup, 1), steps)

    def is_exact(self, steps: int) -> bool:
        return self.exact_steps(steps) >= steps

    @property
    def settings(self) -> dict:
        """What ``AsyncDiffPipeline`` takes to run this layout (the warm-up only with stages)."""
        return dict(stages=self.stages, stride=self.stride, warmup=self.warmup if self.stages > 1 else None,
                    cfg_parallel=self.cfg_parallel, context_parallel=self.ulysses)


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    step_s: float  # mean over the steps, every pass of a step included
    exact_step_s: float  # one exact step (every pass)
    round_s: float  # one round of `stride` steps after the warm-up (every pass); 0 without stages
    exact_steps: int
    rounds: int
    compute_s: list[float]  # per stage per pass: compute (units share + shared part)
    attention_s: list[float]  # per stage per pass: Ulysses all-to-alls and the output all-gather
    message_s: list[float]  # per stage per pass: the message it sends on (boundary or prediction)
    exact: bool

    def to_dict(self) -> dict:
        return dict(name=self.layout.name, **asdict(self.layout), devices=self.layout.devices,
                    predicted_step_ms=1e3 * self.step_s, exact_step_ms=1e3 * self.exact_step_s,
                    round_ms=1e3 * self.round_s, exact_steps=self.exact_steps, rounds=self.rounds,
                    stage_compute_ms=[1e3 * s for s in self.compute_s],
                    stage_attention_ms=[1e3 * s for s in self.attention_s],
                    stage_message_ms=[1e3 * s for s in self.message_s], exact=self.exact)


def predict(costs: DenoiserCosts, link: Link, layout: Layout, steps: int) -> Prediction:
    """The mean step time of ``layout`` over ``steps`` steps (formula in the module docstring)."""
    check_layout(costs, layout)
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least 1")
    f = 0.5 if layout.cfg_parallel else 1.0
    p = layout.ulysses
    # ranks that compute at once share the host (cores, memory bandwidth): measured by the link probe
    slowdown = link.parallel_slowdown if layout.devices > 1 else 1.0
    cuts = costs.cuts(layout.stages)
    n_stages = layout.stages
    # a rank's units: at its sequence share where sharded; on half the batch under CFG parallel as measured there,
    # else half the whole batch's
    whole, half = ((costs.sharded_unit_seconds[p], costs.half_batch_sharded_unit_seconds.get(p)) if p > 1
                   else (costs.unit_seconds, costs.half_batch_unit_seconds))
    units, unit_share = (half, 1.0) if layout.cfg_parallel and half is not None else (whole, f)
    compute, attention, message = [], [], []
    for k in range(n_stages):
        lo, hi = cuts[k], cuts[k + 1]
        compute.append(slowdown * (unit_share * sum(units[lo:hi]) + f * costs.shared_seconds))
        exchanged = 0.0
        if p > 1:
            calls = sum(costs.attention_calls[lo:hi])
            exchanged = calls * ALL_TO_ALLS_PER_ATTENTION * link.all_to_all_s(f * costs.attention_bytes / p, p)
            if k == n_stages - 1:
                exchanged += link.all_gather_s(f * costs.output_bytes / p, p)
        attention.append(exchanged)
        if k < n_stages - 1:
            message.append(link.message_s(f * costs.boundary_bytes[hi - 1] / p))
        else:  # the prediction, to the ranks that did not compute it (other stages, the other CFG group)
            waits = n_stages > 1 or layout.stride > 1 or layout.cfg_parallel
            message.append(link.message_s(f * costs.output_bytes) if waits else 0.0)
    stage = [c + a for c, a in zip(compute, attention)]
    exact_pass = sum(stage) + sum(message)
    exact_steps = layout.exact_steps(steps)
    rounds = math.ceil((steps - exact_steps) / layout.stride)
    round_pass = max(s + m for s, m in zip(stage, message)) if rounds else 0.0
    passes = costs.passes_per_step
    total = passes * (exact_steps * exact_pass + rounds * round_pass)
    return Prediction(layout=layout, step_s=total / steps, exact_step_s=passes * exact_pass,
                      round_s=passes * round_pass, exact_steps=exact_steps, rounds=rounds, compute_s=compute,
                      attention_s=attention, message_s=message, exact=layout.is_exact(steps))


def check_layout(costs: DenoiserCosts, layout: Layout) -> None:
    """Refuse a layout this denoiser cannot take, naming the value and what would be accepted."""
    units = len(costs.unit_seconds)
    if not 1 <= layout.stages <= units:
        raise ValueError(f"stages={layout.stages}: this denoiser splits into 1 to {units} stages")
    if layout.stride < 1 or (layout.stride > 1 and layout.stages == 1):
        raise ValueError(f"stride={layout.stride}: a stride above 1 needs at least 2 stages (stride >= 1)")
    if layout.cfg_parallel and costs.pass_batch != 2:
        raise ValueError("cfg_parallel: this pipeline's denoiser passes carry no [uncond, cond] batch to split "
                         + ("(guidance-distilled)" if costs.passes_per_step == 1 else "(it runs CFG as two passes)"))
    if layout.ulysses > 1:
        if costs.context_parallel is not None:
            raise ValueError(f"ulysses={layout.ulysses}: {costs.context_parallel}")
        if costs.attention_heads is None or costs.attention_heads % layout.ulysses:
            raise ValueError(f"ulysses={layout.ulysses}: the degree must divide the attention heads "
                             f"({costs.attention_heads})")
        if layout.ulysses not in costs.sharded_unit_seconds:
            why = costs.ulysses_refusals.get(layout.ulysses, "the units were not measured at its sharded shape")
            measured = sorted(costs.sharded_unit_seconds)
            raise ValueError(f"ulysses={layout.ulysses}: {why} (measured at: {measured or 'no degree'})")
        if layout.stages > 1 and costs.stages_context_parallel is not None:
            raise ValueError(f"ulysses={layout.ulysses} with stages={layout.stages}: {costs.stages_context_parallel}")


def enumerate_layouts(costs: DenoiserCosts, devices: int, steps: int, warmup: int | None = None,
                      exact: bool = False, context_parallel: bool = True) -> list[Layout]:
    """Every layout on at most ``devices`` devices this denoiser can take, in a fixed order.

    Ulysses degrees: those the units were measured at (``costs.sharded_unit_seconds``), only with one stage
    where the plan cannot be moved onto stages; none with ``context_parallel=False`` (a run that cannot take it:
    a step cache, a process sub-group).

    ``warmup``: the exact steps of the layouts with stages (None: the wrapper's default, 5 %
    of the steps, at least one). With ``exact`` only exact layouts: those with stages get a
    warm-up of every step. A stride above 1 comes only with stages (with one stage it would
    predict a step from a stale latent without any exact step to start from).
    """
    if devices < 1:
        raise ValueError(f"devices={devices}: need at least 1")
    if warmup is None:
        from asyncgen.runtime.asyncdiff_hook import default_warmup

        warmup = default_warmup(steps)
    if warmup < 0:
        raise ValueError(f"warmup={warmup}: need a number of steps >= 0")
    units = len(costs.unit_seconds)
    cfg_options = (False, True) if costs.pass_batch == 2 else (False,)
    ulysses_options = [1]
    if costs.context_parallel is None and costs.attention_heads and context_parallel:
        ulysses_options += [p for p in sorted(costs.sharded_unit_seconds)
                            if p <= devices and costs.attention_heads % p == 0]
    out = []
    for cfg in cfg_options:
        for p in ulysses_options:
            for stages in range(1, units + 1):
                if p > 1 and stages > 1 and costs.stages_context_parallel is not None:
                    break
                for stride in range(1, devices + 1):
                    if stride > 1 and stages == 1:
                        continue
                    layout = Layout(stages, stride, (steps if exact else warmup) if stages > 1 else 0, cfg, p)
                    if layout.devices > devices:
                        break
                    if exact and not layout.is_exact(steps):
                        continue
                    out.append(layout)
    return out


@dataclass(frozen=True)
class Choice:
    chosen: Prediction
    candidates: list[Prediction]  # every layout predicted, in enumeration order
    allowed: list[Prediction]  # those it chose among
    reason: str

    def to_dict(self) -> dict:
        return dict(chosen=self.chosen.to_dict(), reason=self.reason,
                    candidates=[dict(c.to_dict(), allowed=c in self.allowed) for c in self.candidates])


def choose(costs: DenoiserCosts, link: Link, devices: int, steps: int, warmup: int | None = None,
           exact: bool = False, use_all: bool = False, context_parallel: bool = True) -> Choice:
    """The fastest predicted layout (exact, with ``exact``; using every one of the ``devices``, with ``use_all``: a
    launcher that has started that many workers; without Ulysses, with ``context_parallel=False``).

    Ties go to fewer devices, then to the earlier layout in :func:`enumerate_layouts`' order.
    ``reason`` says in words why: the chosen time against the runner-up's, and any faster
    layout left out (on fewer devices, with ``use_all``).
    """
    predictions = [predict(costs, link, layout, steps)
                   for layout in enumerate_layouts(costs, devices, steps, warmup, exact, context_parallel)]
    allowed = [p for p in predictions if not use_all or p.layout.devices == devices]
    if not allowed:
        raise ValueError(f"no layout of this denoiser uses {'exactly ' if use_all else ''}{devices} device(s)"
                         + (" and is exact" if exact else "") + (" without context parallelism"
                                                                 if not context_parallel else ""))
    order = {id(p): i for i, p in enumerate(predictions)}
    ranked = sorted(allowed, key=lambda p: (p.step_s, p.layout.devices, order[id(p)]))
    best = ranked[0]
    reason = (f"{best.layout.name} on {best.layout.devices} device(s): {1e3 * best.step_s:.1f} ms per step predicted, "
              f"the least of the {len(allowed)} allowed layout(s)" + (" (exact only)" if exact else ""))
    if len(ranked) > 1:
        second = ranked[1]
        reason += (f"; next: {second.layout.name}, {1e3 * second.step_s:.1f} ms "
                   f"({100 * (second.step_s / best.step_s - 1):+.1f} %)")
    faster = [p for p in predictions if p not in allowed and p.step_s < best.step_s]
    if faster:
        quickest = min(faster, key=lambda p: p.step_s)
        reason += (f"; {quickest.layout.name} is predicted faster ({1e3 * quickest.step_s:.1f} ms) but uses "
                   f"{quickest.layout.devices} of the {devices} devices")
    return Choice(chosen=best, candidates=predictions, allowed=allowed, reason=reason)


# ------------------------------------------------------------------------------------------ costs of a split


def denoiser_costs(split, inputs: dict, passes_per_step: int, unit_seconds: Sequence[float] | None = None,
                   shared_seconds: float | None = None, rate=None, cut_costs: Sequence[float] | None = None,
                   context_parallel: str | None = None,
                   half_batch_unit_seconds: Sequence[float] | None = None) -> DenoiserCosts:
    """:class:`DenoiserCosts` of ``split`` for one pass called with ``inputs`` (its batch, size and text length).

    Bytes and attention calls are counted on shapes (no arithmetic; meta weights do). Compute is
    ``unit_seconds`` when given, measured on real weights (``shared_seconds``, the forward outside the
    units, given or else scaled from the units' by counted work); otherwise each unit's counted FLOPs
    and bytes through ``rate`` (a :class:`~asyncgen.cost.device_rate.DeviceRate`).
    ``cut_costs``: what the wrapper balances its cuts on (default: its FLOP estimate on the split's own
    example, as ``split="flops"`` does at attach time). ``context_parallel``: None where diffusers can
    run the denoiser's class context-parallel, else the reason it cannot (see :func:`context_parallel_refusal`).
    ``half_batch_unit_seconds``: the units timed on half of a doubled batch (what CFG parallel runs).
    """
    from asyncgen.cost.estimate import estimate_unit_costs

    counted = count_shapes(split, inputs)
    n = len(split.units)
    if unit_seconds is None:
        if rate is None:
            raise ValueError("denoiser_costs needs unit_seconds (measured) or rate (a DeviceRate) for the compute")
        unit_seconds = [rate.seconds(fl, by) for fl, by in zip(counted["unit_flops"], counted["unit_bytes"])]
        shared_seconds = rate.seconds(counted["shared_flops"], counted["shared_bytes"])
    elif len(unit_seconds) != n:
        raise ValueError(f"unit_seconds has {len(unit_seconds)} entries for {n} units")
    elif shared_seconds is None:
        # the part outside the units at the units' measured pace: its counted work (FLOPs plus the cut
        # estimate's 8 FLOPs a byte) over theirs. A timed whole forward minus the timed units would do on an
        # idle machine; on a shared one the difference is mostly other processes' time slices
        work = [fl + 8.0 * by for fl, by in zip(counted["unit_flops"], counted["unit_bytes"])]
        shared_work = counted["shared_flops"] + 8.0 * counted["shared_bytes"]
        shared_seconds = sum(unit_seconds) * shared_work / sum(work) if sum(work) > 0 else 0.0
    batch = int(split.sample_tensor(inputs[split.sample_argument]).shape[0])
    return DenoiserCosts(
        unit_names=tuple(u.name for u in split.units), unit_seconds=tuple(float(s) for s in unit_seconds),
        shared_seconds=float(shared_seconds or 0.0),
        cut_costs=tuple(float(c) for c in (cut_costs if cut_costs is not None else estimate_unit_costs(split))),
        boundary_bytes=tuple(float(b) for b in counted["boundary_bytes"]), output_bytes=float(counted["output_bytes"]),
        attention_calls=tuple(counted["attention_calls"]), attention_bytes=float(counted["attention_bytes"]),
        attention_heads=counted["attention_heads"], passes_per_step=passes_per_step, pass_batch=batch,
        context_parallel=context_parallel,
        half_batch_unit_seconds=tuple(float(t) for t in half_batch_unit_seconds)
        if half_batch_unit_seconds is not None else None,
        notes=dict(unit_flops=counted["unit_flops"], unit_bytes=counted["unit_bytes"],
                   shared_flops=counted["shared_flops"], shared_bytes=counted["shared_bytes"]))


def context_parallel_refusal(denoiser) -> str | None:
    """None where diffusers can run ``denoiser``'s class with ``ContextParallelConfig``; else why not, in words."""
    import diffusers
    from diffusers import ModelMixin

    from asyncgen._compat import context_parallel_plan

    if not (hasattr(ModelMixin, "enable_parallelism") and hasattr(diffusers, "ContextParallelConfig")):
        return f"diffusers {diffusers.__version__} has no context parallelism (ModelMixin.enable_parallelism)"
    if context_parallel_plan(type(denoiser)) is None:
        return f"diffusers gives {type(denoiser).__name__} no context-parallel plan"
    return None


def count_shapes(split, inputs: dict) -> dict:
    """Per unit FLOPs, bytes moved and self-attention calls; the boundary bytes at each cut; the whole forward's.

    One pass of the chain under ``FakeTensorMode`` with counters (as
    :func:`~asyncgen.cost.estimate.estimate_unit_costs` runs it), one pass of the whole forward
    (what is outside the units is the difference), and the chain once more unit by unit through
    ``forward_units`` for the state each cut hands on. A self-attention call is a
    ``scaled_dot_product_attention`` whose keys are as long as its queries (the sequence Ulysses
    shards; cross-attention to the text is not exchanged).
    """
    from asyncgen._compat import tree_leaves
    from asyncgen.cost.fake import run_on_shapes

    tally = dict(bytes=0, calls=0, attention_bytes=0, heads=None)
    counters = _counters(tally)

    def measure(shaped: dict) -> dict:
        result = _unit_work(split, shaped, tally)
        flops, counter, attention = counters()
        tally["bytes"] = 0
        with flops, counter, attention:
            output = split.denoiser(**_model_arguments(split, shaped), return_dict=False)
        result["shared_flops"] = max(float(flops.get_total_flops()) - sum(result["unit_flops"]), 0.0)
        result["shared_bytes"] = max(float(tally["bytes"]) - sum(result["unit_bytes"]), 0.0)
        prediction = output[0] if isinstance(output, (tuple, list)) else output
        result["output_bytes"] = sum(t.numel() * t.element_size() for t in tree_leaves(prediction)
                                     if isinstance(t, torch.Tensor))
        # the state each cut hands on: the chain again, one unit at a time
        named = dict(shaped)
        sample = named.pop(split.sample_argument)
        timestep = named.pop(getattr(split, "timestep_argument", "timestep"))
        cond = split.conditioning(sample, timestep, **named)
        state = split.initial_state(sample, cond)
        boundary = []
        for unit in split.units[:-1]:
            state = split.forward_units(state, cond, [unit])
            boundary.append(float(sum(t.numel() * t.element_size() for t in state.tensors())))
        result["boundary_bytes"] = boundary
        return result

    return run_on_shapes(split.denoiser, inputs, split.sample_argument, measure)


def count_units(split, inputs: dict, ulysses: int = 1) -> dict:
    """Per unit FLOPs, bytes moved and self-attention calls, as :func:`count_shapes` counts them; with ``ulysses``
    above 1 as one of that many Ulysses ranks runs the unit (:func:`asyncgen.cost.sharded.ulysses_share`)."""
    from asyncgen.cost.fake import run_on_shapes
    from asyncgen.cost.sharded import ulysses_share

    tally = dict(bytes=0, calls=0, attention_bytes=0, heads=None)

    def measure(shaped: dict) -> dict:
        if ulysses == 1:
            return _unit_work(split, shaped, tally)
        with ulysses_share(split.denoiser, ulysses):
            return _unit_work(split, shaped, tally)

    return run_on_shapes(split.denoiser, inputs, split.sample_argument, measure)


def _counters(tally: dict):
    """A maker of the three counters of one measured step: FLOPs (torch's), bytes read and written by every op,
    and the self-attention calls with their q/k/v bytes and heads (what Ulysses exchanges), into ``tally``."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils.flop_counter import FlopCounterMode

    from asyncgen._compat import torch_dispatch_mode, tree_leaves

    class _Bytes(torch_dispatch_mode()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is not torch.ops.prim.device.default:
                tally["bytes"] += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs or {}, out))
                                      if isinstance(t, torch.Tensor))
            return out

    class _Attention(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                query = args[0] if args else kwargs["query"]
                key = args[1] if len(args) > 1 else kwargs["key"]
                if query.ndim >= 3 and query.shape[-2] == key.shape[-2]:
                    tally["calls"] += 1
                    tally["attention_bytes"] = max(tally["attention_bytes"], query.numel() * query.element_size())
                    heads = int(query.shape[-3]) if query.ndim == 4 else 1
                    tally["heads"] = heads if tally["heads"] is None else min(tally["heads"], heads)
            return func(*args, **kwargs)

    def counters():
        return FlopCounterMode(display=False), _Bytes(), _Attention()

    return counters


def _unit_work(split, shaped: dict, tally: dict) -> dict:
    """The chain of units once, each counted (under the current fake mode, or on real tensors)."""
    from asyncgen.cost.estimate import run_chain_with_probe

    counters = _counters(tally)
    result = dict(unit_flops=[], unit_bytes=[], attention_calls=[])
    tally.update(bytes=0, calls=0, attention_bytes=0, heads=None)

    def probe(i, step):
        flops, counter, attention = counters()
        before_bytes, before_calls = tally["bytes"], tally["calls"]
        with flops, counter, attention:
            step()
        result["unit_flops"].append(float(flops.get_total_flops()))
        result["unit_bytes"].append(float(tally["bytes"] - before_bytes))
        result["attention_calls"].append(tally["calls"] - before_calls)

    run_chain_with_probe(split, shaped, probe)
    result.update(attention_bytes=tally["attention_bytes"], attention_heads=tally["heads"])
    return result


def _model_arguments(split, call: dict) -> dict:
    arguments = getattr(split, "model_arguments", None)
    return arguments(call) if arguments is not None else dict(call)
