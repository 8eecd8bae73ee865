"""The wrapper around the stock pipeline of every transformer class in the support matrix.

Per family (tiny_models.names("transformer")): ``stages=1`` equals the stock pipeline
exactly; CFG parallel in one process equals it where the pipeline batches CFG; on 2 gloo
ranks (components placed on one rank each, as by default) the wrapper equals the serial
simulator, which differs from the stock pipeline (one launch runs every family). Passing
checks are recorded for the support matrix.
"""

import numpy as np
import pytest
import torch

import tiny_models
from asyncgen.cli.launcher import launch
from asyncgen.evaluation import support_matrix
from asyncgen.pipelines import AsyncDiffPipeline

FAMILIES = tiny_models.names("transformer")
BATCHED_CFG = [family for family in FAMILIES if tiny_models.FAMILIES[family].batched_cfg]


def _pixels(output) -> np.ndarray:
    return output.frames if hasattr(output, "frames") else output.images


def _run(pipe, family) -> np.ndarray:
    return _pixels(pipe(**tiny_models.family_call_kwargs(family)))


def _class_name(wrapped) -> str:
    return type(wrapped.denoiser).__name__


_STOCK: dict = {}


def _stock(path, family) -> np.ndarray:
    if family not in _STOCK:
        _STOCK[family] = _run(tiny_models.load_family(path, family), family)
    return _STOCK[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_stage_equals_stock(family_path, family, one_thread):
    path = family_path(family)
    one = AsyncDiffPipeline(tiny_models.load_family(path, family), stages=1)
    assert np.array_equal(_run(one, family), _stock(path, family))
    support_matrix.record(_class_name(one), pipeline=tiny_models.FAMILIES[family].pipeline, one_stage="exact")


@pytest.mark.parametrize("family", BATCHED_CFG)
def test_cfg_parallel_serial_matches_stock(family_path, family, one_thread):
    path = family_path(family)
    wrapped = AsyncDiffPipeline(tiny_models.load_family(path, family), stages=1, cfg_parallel=True)
    # each half runs at batch 1 instead of 2: same maths, kernels may round differently
    np.testing.assert_allclose(_run(wrapped, family), _stock(path, family), atol=1e-5, rtol=0)
    support_matrix.record(_class_name(wrapped), cfg_parallel="yes (serial == stock, ≤ 1e-5)")


# also loaded as `asyncgen generate --devices` loads: AsyncDiffPipeline.from_pretrained under the group (stage-only
# reads; a decoder-only text encoder placed on one rank; Lumina2's value-reading forward cannot be split from its
# config alone, so it loads whole and keeps its stage)
FROM_PRETRAINED = [family for family in ("ovis_image", "lumina2") if family in FAMILIES]


def _two_ranks(rank, world_size, paths):
    torch.set_num_threads(1)
    out = {}
    for family, path in paths.items():
        # components="planned" (the default in a group): text encoders and the VAE run on one rank each
        wrapped = AsyncDiffPipeline(tiny_models.load_family(path, family), stages=2, warmup=1)
        out[family] = _run(wrapped, family)
    for family in FROM_PRETRAINED:
        out[f"{family} from_pretrained"] = _run(AsyncDiffPipeline.from_pretrained(paths[family], stages=2, warmup=1),
                                                family)
    return out


@pytest.mark.distributed
def test_two_ranks_equal_the_serial_simulator(family_path, one_thread):
    paths = {family: str(family_path(family)) for family in FAMILIES}
    per_rank = launch(_two_ranks, 2, paths, timeout=600)
    for family in FAMILIES:
        serial = AsyncDiffPipeline(tiny_models.load_family(paths[family], family), stages=2, warmup=1)
        expected = _run(serial, family)
        assert np.isfinite(expected).all() and not np.array_equal(expected, _stock(paths[family], family))  # stale inputs were used
        for rank, result in enumerate(per_rank):
            # received states sit at aligned offsets of one flat buffer (comm/wire.py): see assert_equals_simulator
            tiny_models.assert_equals_simulator(result[family], expected, err_msg=f"{family} rank {rank}")
            if family in FROM_PRETRAINED:
                # stage-only loaded, Ovis-Image differs from the whole-loaded simulator in the last float32 bit
                # (7e-7 at most here); not the wire, which is exact for every pipeline loaded whole; cause not
                # pinned down, so this one comparison keeps a tolerance far above that
                np.testing.assert_allclose(result[f"{family} from_pretrained"], expected, atol=1e-5, rtol=0,
                                           err_msg=f"{family} from_pretrained, rank {rank}")
        support_matrix.record(_class_name(serial), pipeline=tiny_models.FAMILIES[family].pipeline,
                              distributed="yes (pipeline, exact)")
