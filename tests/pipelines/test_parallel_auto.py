"""AsyncDiffPipeline(..., parallel="auto"): the layout chooser's choice, the one `generate --parallel auto` makes."""

import numpy as np
import pytest

import tiny_models
from asyncgen.cli.launcher import launch
from asyncgen.cost.layout import Layout
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.pipelines.layout_costs import (auto_layout_from_configs, auto_layout_of_pipeline, costs_from_configs,
                                             costs_from_pipeline)

# a measured-looking probe, fixed so that the choice is deterministic: a slow link (2 ms, 50 MB/s) and ranks that
# slow each other down by 10 %; the rate is one CPU thread's order of magnitude
RATE = dict(flops_per_s=2e10, bytes_per_s=5e9, device="cpu", dtype="float32", threads=1)
SLOW_LINK = dict(latency_s=2e-3, bandwidth_bytes_per_s=5e7, world_size=2, parallel_slowdown=1.1,
                 all_to_all_latency_s=3e-3, all_to_all_bytes_per_s=4e7, backend="gloo", device="cpu",
                 sizes=[4, 65536], repeats=5)
PROBE_TWO = dict(link=SLOW_LINK, rate=RATE)
PROBE_ONE = dict(link=None, rate=RATE)
STEPS = 6


# sizes the tiny models take (the tiny Wan's rotary table is too short for its config's native size)
@pytest.mark.parametrize("family, sizes", [("sd", [None, (64, 64)]), ("wan", [(64, 64)])])
def test_a_loaded_pipeline_and_its_folder_give_the_same_costs_and_choice(family_path, family, sizes, one_thread):
    """The wrapper counts the loaded denoiser's costs as the CLI counts them from the folder's configs."""
    from asyncgen.cost.device_rate import DeviceRate

    path = str(family_path(family))
    pipe = tiny_models.load_family(path, family)
    rate = DeviceRate.from_dict(RATE)
    for size in sizes:
        assert (costs_from_pipeline(pipe, rate, *(size or (None, None)))
                == costs_from_configs(path, *(size or (None, None)), rate=rate))
    size = sizes[0] or (None, None)
    for devices, probe in ((1, PROBE_ONE), (2, PROBE_TWO)):
        a = auto_layout_of_pipeline(pipe, probe, devices, STEPS, *size)
        b = auto_layout_from_configs(path, probe, devices, STEPS, *size)
        assert a.chosen.layout == b.chosen.layout and a.reason == b.reason
        assert a.chosen.layout.devices == devices  # every rank of the group works


def test_auto_in_one_process_is_the_stock_pipeline(family_path, one_thread):
    path = family_path("sd")
    wrapped = AsyncDiffPipeline(tiny_models.load_family(path, "sd"), parallel="auto", steps=STEPS, probe=PROBE_ONE)
    assert wrapped.layout_choice.chosen.layout == Layout()  # one process: one device, no stages
    assert wrapped.topology.stages == 1 and wrapped.cfg_parts == 1
    stock = tiny_models.load_family(path, "sd")(**tiny_models.family_call_kwargs("sd", num_inference_steps=STEPS))
    ours = wrapped(**tiny_models.family_call_kwargs("sd", num_inference_steps=STEPS))
    np.testing.assert_array_equal(ours.images, stock.images)  # one stage is the stock forward, exactly


@pytest.mark.parametrize("kwargs, message", [
    (dict(parallel="fast"), "parallel='fast': need 'auto'"),
    (dict(parallel="auto", stages=2), "stages=2 with parallel='auto'"),
    (dict(parallel="auto", cfg_parallel=True), "cfg_parallel=True with parallel='auto'"),
    (dict(parallel="auto", stride=2), "stride=2 with parallel='auto'"),
    (dict(steps=20), "steps: only with parallel='auto'"),
    (dict(parallel="auto", steps=0), "steps=0: need a whole number"),
    (dict(parallel="auto", size=(64,)), r"size=\(64,\): need \(height, width\)"),
    (dict(parallel="auto", probe={"link": None}), "probe=.*need"),
])
def test_bad_auto_arguments_are_refused_before_any_work(sd_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        AsyncDiffPipeline(sd_pipe, **kwargs)
    with pytest.raises(ValueError, match=message):
        AsyncDiffPipeline.from_pretrained("/nonexistent", **kwargs)


def _auto_on_ranks(rank, world, path, family):
    call = tiny_models.family_call_kwargs(family, num_inference_steps=STEPS)
    given = AsyncDiffPipeline(tiny_models.load_family(path, family), parallel="auto", steps=STEPS, probe=PROBE_TWO)
    measured = AsyncDiffPipeline.from_pretrained(path, parallel="auto", steps=STEPS)  # the link measured here
    layouts = [p.layout_choice.chosen.layout for p in (given, measured)]
    settings = [(p.topology.stages, p.topology.stride, p.cfg_parts) for p in (given, measured)]
    return dict(layouts=layouts, settings=settings, probe=measured.layout_probe, images=[given(**call).images,
                                                                                       measured(**call).images])


@pytest.mark.distributed
def test_auto_on_two_ranks_runs_the_chosen_layout(family_path, one_thread):
    """Both constructors on 2 gloo ranks: every rank makes the same choice, the one the CLI's path makes from the
    same numbers, and runs it: its images equal the serial simulator of the explicit layout."""
    family = "sd"
    path = str(family_path(family))
    per_rank = launch(_auto_on_ranks, 2, path, family, timeout=400)
    for rank in per_rank[1:]:
        assert rank["layouts"] == per_rank[0]["layouts"] and rank["probe"] == per_rank[0]["probe"]
    given, measured = per_rank[0]["layouts"]
    assert given == auto_layout_from_configs(path, PROBE_TWO, 2, STEPS).chosen.layout
    assert measured == auto_layout_from_configs(path, per_rank[0]["probe"], 2, STEPS).chosen.layout
    call = tiny_models.family_call_kwargs(family, num_inference_steps=STEPS)
    for i, layout in enumerate((given, measured)):
        assert layout.devices == 2
        for rank in per_rank:
            assert rank["settings"][i] == (layout.stages, layout.stride, 2 if layout.cfg_parallel else 1)
        explicit = AsyncDiffPipeline(tiny_models.load_family(path, family), stages=layout.stages, stride=layout.stride,
                                     warmup=layout.warmup if layout.stages > 1 else None,
                                     cfg_parallel=layout.cfg_parallel)(**call).images
        for r, rank in enumerate(per_rank):
            tiny_models.assert_equals_simulator(rank["images"][i], explicit, err_msg=f"{layout.name} rank {r}")
