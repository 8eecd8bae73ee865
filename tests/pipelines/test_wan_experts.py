"""Wan 2.2's two experts under AsyncDiffPipeline: ``transformer`` (high noise) and ``transformer_2`` (low noise).

Both are staged; the switch from one to the other starts the new expert's schedule
afresh (its own exact warm-up step), so a stale state of one expert never feeds the
other. The tiny ``wan22`` pipeline runs two steps on each side of the switch. The
``stages=1`` and the constructor's 2-rank checks are in test_transformer_pipelines.py.
"""

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen.cli.launcher import launch
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.schedules.asyncdiff import StepKind

FAMILY = "wan22"
EXPERTS = ("transformer", "transformer_2")


def _frames(pipe, **overrides) -> np.ndarray:
    return pipe(**tiny_models.family_call_kwargs(FAMILY, **overrides)).frames


def _step_kinds(wrapped) -> tuple[np.ndarray, list[tuple[str, StepKind]]]:
    """A call's frames, and which expert ran each step of it as what kind of step of its own schedule."""
    seen = []

    def record(pipe, i, t, tensors):
        # one expert has started at a time: the other has not yet, or was reset at the switch
        running = [name for name in EXPERTS if wrapped.hooks[name].started]
        assert len(running) == 1, running
        lane = wrapped.hooks[running[0]].main
        seen.append((running[0], lane.schedule.kind(lane._step - 1)))
        return {}

    return _frames(wrapped, callback_on_step_end=record), seen


def test_each_expert_is_staged_and_starts_with_its_own_warmup(family_path, one_thread):
    path = family_path(FAMILY)
    wrapped = AsyncDiffPipeline(tiny_models.load_family(path, FAMILY), stages=2, warmup=2)
    assert set(wrapped.hooks) == set(EXPERTS)  # a hook on each expert, each the pipeline's own module
    assert all(wrapped.hooks[name].split.denoiser is getattr(wrapped.pipeline, name) for name in EXPERTS)
    assert wrapped.pipeline.transformer_2 is not wrapped.denoiser
    frames, kinds = _step_kinds(wrapped)
    assert kinds == [("transformer", StepKind.EXACT)] * 2 + [("transformer_2", StepKind.EXACT)] * 2
    # two exact steps per expert reproduce the stock pipeline: transformer_2 took steps 2 and 3 at their timesteps
    assert np.array_equal(frames, _frames(tiny_models.load_family(path, FAMILY)))


def _lean_two_ranks(rank, world_size, path):
    torch.set_num_threads(1)
    wrapped = AsyncDiffPipeline.from_pretrained(path, stages=2, warmup=1)
    wrapped.set_progress_bar_config(disable=True)
    out = {"frames": _frames(wrapped), "info": wrapped.stage_info()}
    whole = tiny_models.load_family(path, FAMILY)  # the expert's every tensor name
    for name in EXPERTS:
        expert = getattr(wrapped.pipeline, name)  # other ranks' blocks are parameterless stand-ins here
        held = {k for k, v in expert.state_dict().items() if not v.is_meta}
        assert held == set(expert.state_dict())  # nothing left on meta in the module tree
        out[name] = dict(read=set(wrapped.load_reports[name].tensors), held=held,
                         all=set(getattr(whole, name).state_dict()),
                         held_bytes=sum(p.numel() * p.element_size() for p in expert.parameters()))
    return out


@pytest.mark.distributed
def test_two_ranks_lean_load_reads_their_stage_of_both_experts(family_path, one_thread):
    path = str(family_path(FAMILY))
    per_rank = launch(_lean_two_ranks, 2, path, timeout=600)
    serial = AsyncDiffPipeline(tiny_models.load_family(path, FAMILY), stages=2, warmup=1)
    expected, kinds = _step_kinds(serial)
    # each expert: one exact warm-up step, then one fed a stale state of its own (the switch restarts the schedule)
    assert kinds == [("transformer", StepKind.EXACT), ("transformer", StepKind.ROUND),
                     ("transformer_2", StepKind.EXACT), ("transformer_2", StepKind.ROUND)]
    assert _step_kinds(serial)[1] == kinds  # the next call starts both experts over
    assert not np.array_equal(expected, _frames(tiny_models.load_family(path, FAMILY)))  # stale inputs were used
    for rank, result in enumerate(per_rank):
        # received states sit at aligned offsets of one flat buffer (comm/wire.py): see assert_equals_simulator
        tiny_models.assert_equals_simulator(result["frames"], expected, err_msg=f"rank {rank}")
    for name in EXPERTS:
        first, second = (result[name] for result in per_rank)
        for mine in (first, second):
            assert mine["read"] == mine["held"] < mine["all"]  # read what it runs, nothing else, not everything
        assert first["read"] | second["read"] == first["all"]  # together the two ranks read the whole expert
        assert first["read"] - second["read"] and second["read"] - first["read"]  # a stage of its own on each
    for rank, result in enumerate(per_rank):
        # what a rank reports holding is its stage of both experts
        info = result["info"]
        assert info["resident_parameter_bytes"] == sum(result[name]["held_bytes"] for name in EXPERTS)
        units = info["expert_stage_units"]["transformer_2"]
        assert len(units) == 2 and info["stage"] == rank


def test_memory_plan_counts_each_ranks_stage_of_both_experts(family_path, one_thread):
    from asyncgen.pipelines.from_configs import plan_from_configs

    path = str(family_path(FAMILY))
    wrapped = AsyncDiffPipeline(tiny_models.load_family(path, FAMILY), stages=2, warmup=1)
    from_configs = plan_from_configs(path, stages=2, estimate_activations=False)
    loaded = wrapped.memory_plan()
    pipe = wrapped.pipeline
    for plan in (from_configs, loaded):
        assert "transformer_2" not in plan.notes.get("replicated", {})  # staged, not kept whole by every rank
        for rank, stages in zip(plan.ranks, zip(wrapped.stages, wrapped.expert_stages["transformer_2"])):
            # the shared modules (embeddings, output) on every rank, and this rank's blocks of each expert
            for name, stage in zip(EXPERTS, stages):
                split = wrapped.hooks[name].split
                expected = sum(p.numel() * p.element_size() for m in split.shared_modules() + stage.modules()
                               for p in dict.fromkeys(m.parameters()))
                key = "denoiser" if name == "transformer" else name
                assert rank.parameter_bytes[key] == expected, (name, rank.rank)
        every = {id(p): p for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()}
        every.update({id(p): p for name in EXPERTS for p in getattr(pipe, name).parameters()})
        assert plan.full_pipeline_bytes == sum(p.numel() * p.element_size() for p in every.values())
    assert [r.parameter_bytes for r in from_configs.ranks] == [r.parameter_bytes for r in loaded.ranks]
    assert from_configs.notes["transformer_2_cuts"] == wrapped.attachment.cuts("transformer_2")
