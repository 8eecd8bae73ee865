"""Transformers and CFG parallelism on gloo ranks against the serial simulator."""

import numpy as np
import pytest

import tiny_models
from asyncgen.cli.launcher import launch, run_workers
from asyncgen.evaluation import support_matrix
from asyncgen.pipelines import AsyncDiffPipeline

pytestmark = pytest.mark.distributed

# (family, stages, stride, time_shift) per world size
DIT_CONFIGS = {
    2: [("sd3", 2, 1, False), ("pixart", 2, 1, True), ("flux", 1, 2, False)],
    3: [("sd3", 3, 1, False), ("pixart", 2, 2, False), ("flux", 2, 2, True)],
}


def _dit_configs(rank, world_size, paths):
    out = []
    for family, stages, stride, time_shift in DIT_CONFIGS[world_size]:
        wrapped = AsyncDiffPipeline(tiny_models.load_family(paths[family], family), stages=stages, stride=stride,
                                    warmup=1, time_shift=time_shift)
        out.append(wrapped(**tiny_models.family_call_kwargs(family)).images)
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_transformers_distributed_equal_serial(dit_paths, world_size, one_thread):
    per_rank = launch(_dit_configs, world_size, {k: str(v) for k, v in dit_paths.items()}, timeout=300)
    for i, (family, stages, stride, time_shift) in enumerate(DIT_CONFIGS[world_size]):
        serial = AsyncDiffPipeline(tiny_models.load_family(dit_paths[family], family), stages=stages, stride=stride,
                                   warmup=1, time_shift=time_shift)
        expected = serial(**tiny_models.family_call_kwargs(family)).images
        for rank, images in enumerate(per_rank):
            # received states sit at aligned offsets of one flat buffer (comm/wire.py): see assert_equals_simulator
            tiny_models.assert_equals_simulator(images[i], expected, err_msg=f"{family} rank {rank}")
        if world_size == 2:
            support_matrix.record(type(serial.pipeline.transformer).__name__,
                                  pipeline=tiny_models.FAMILIES[family].pipeline, distributed="yes (pipeline, exact)")


def _cfg(rank, world_size, sd_path, sd3_path, stages):
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=stages, warmup=1, cfg_parallel=True)
    out = {"sd": wrapped(**tiny_models.call_kwargs()).images, "info": wrapped.stage_info()}
    if stages == 1:
        wrapped = AsyncDiffPipeline(tiny_models.load_family(sd3_path, "sd3"), stages=1, cfg_parallel=True)
        out["sd3"] = wrapped(**tiny_models.family_call_kwargs("sd3")).images
    return out


def test_cfg_parallel_one_stage_equals_stock(sd_path, dit_paths):
    per_rank = launch(_cfg, 2, str(sd_path), str(dit_paths["sd3"]), 1, timeout=300)
    stock = tiny_models.load(sd_path)(**tiny_models.call_kwargs()).images
    stock_sd3 = tiny_models.load_family(dit_paths["sd3"], "sd3")(**tiny_models.family_call_kwargs("sd3")).images
    assert [r["info"]["cfg_part"] for r in per_rank] == [0, 1]
    for r in per_rank:
        # each half is computed at batch 1 rather than 2: same maths, possibly different rounding
        np.testing.assert_allclose(r["sd"], stock, atol=1e-5, rtol=0)
        np.testing.assert_allclose(r["sd3"], stock_sd3, atol=1e-5, rtol=0)
    support_matrix.record("SD3Transformer2DModel", cfg_parallel="yes (2 ranks == stock)")


def test_cfg_parallel_times_asyncdiff_on_four_ranks_equals_serial(sd_path, one_thread):
    per_rank = launch(_cfg, 4, str(sd_path), None, 2, timeout=400)
    serial = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1, cfg_parallel=True)
    expected = serial(**tiny_models.call_kwargs()).images
    assert [(r["info"]["cfg_part"], r["info"]["stage"]) for r in per_rank] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in per_rank:
        tiny_models.assert_equals_simulator(r["sd"], expected)  # the serial CFG-parallel schedule
    stock = tiny_models.load(sd_path)(**tiny_models.call_kwargs()).images
    assert not np.array_equal(per_rank[0]["sd"], stock)  # the asynchronous steps really ran


def _wrong_world_cfg(rank, world_size, sd_path):
    AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, cfg_parallel=True)


def test_cfg_parallel_world_size_must_be_twice_the_stage_ranks(sd_path):
    for r in run_workers(_wrong_world_cfg, 2, str(sd_path), timeout=120):
        assert not r.ok
        assert "world size 2 does not match 2 * (stages + stride - 1) = 2 * (2 + 1 - 1) = 4 (cfg_parallel)" in r.value
