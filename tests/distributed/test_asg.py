"""ASG on gloo ranks against the serial run of the same schedule."""

import numpy as np
import pytest
import tiny_models
from asyncgen.cli.launcher import launch
from asyncgen.pipelines import ASGPipeline
from tiny_models import call_kwargs

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]

NATIVE = 16  # the tiny pipelines' native size in pixels
STEPS = 4
SD, SDXL = "StableDiffusionPipeline", "StableDiffusionXLPipeline"
# per world size: (model, options, (s_h, s_w)); patches and windows per rank in the comments
CASES = {
    2: [(SD, dict(mode="async"), (2, 2)),  # patches 2+2, windows 5+4
        (SD, dict(mode="sync"), (2, 3)),  # patches 3+3, windows 8+7
        (SDXL, dict(mode="async"), (2, 1))],  # patches 1+1, windows 2+1
    3: [(SD, dict(mode="async"), (2, 2)),  # patches 2+1+1 (uneven), windows 3+3+3
        (SD, dict(mode="sync", guidance_schedule="constant"), (1, 3))],  # patches 1+1+1, windows 2+2+1
}


def _call(pipe, s_h, s_w):
    return pipe(**call_kwargs(height=s_h * NATIVE, width=s_w * NATIVE, num_inference_steps=STEPS)).images


def _run(rank, world_size, paths):
    results = []
    for model, options, (s_h, s_w) in CASES[world_size]:
        wrapped = ASGPipeline(tiny_models.load(paths[model], model), **options)
        results.append(_call(wrapped, s_h, s_w))
    if world_size == 3:
        # more ranks than patches: every rank refuses before any communication, and the
        # group stays usable
        try:
            _call(ASGPipeline(tiny_models.load(paths[SD])), 1, 2)
        except ValueError as exc:
            results.append(str(exc))
        # one rank fails mid-call: the others end with its error instead of waiting
        pipe = tiny_models.load(paths[SD])
        real, calls = pipe.unet.forward, []

        def failing(*args, **kwargs):
            calls.append(1)
            if rank == 2 and len(calls) == 3:
                raise RuntimeError(f"injected failure on rank {rank}")
            return real(*args, **kwargs)

        pipe.unet.forward = failing
        try:
            _call(ASGPipeline(pipe), 2, 2)
        except Exception as exc:
            results.append(f"{type(exc).__name__}: {exc}")
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_equals_serial(sd_path, sdxl_path, world_size):
    paths = {SD: str(sd_path), SDXL: str(sdxl_path)}
    per_rank = launch(_run, world_size, paths, timeout=240)
    for index, (model, options, (s_h, s_w)) in enumerate(CASES[world_size]):
        serial = _call(ASGPipeline(tiny_models.load(paths[model], model), **options), s_h, s_w)
        assert serial.shape == (1, s_h * NATIVE, s_w * NATIVE, 3)
        for rank, results in enumerate(per_rank):
            # patches: bit-identical (each rank fills its slots, zeros elsewhere, summed);
            # windows: the overlap sums are added in another order, a few ulps apart
            np.testing.assert_allclose(results[index], serial, atol=1e-5, rtol=0,
                                       err_msg=f"rank {rank} of {world_size}, {model} {options} {s_h}x{s_w}")
    if world_size == 3:
        for rank, results in enumerate(per_rank):
            assert results[-2] == ("3 ranks are more than the K = 1x2 = 2 patches of a 16x32 picture; "
                                   "use at most 2 ranks (a rank needs a patch to work on)")
            assert "injected failure on rank 2" in results[-1], results[-1]
            if rank != 2:
                assert results[-1].startswith("RemoteRankError"), results[-1]


def test_serial_run_needs_no_process_group(sd_pipe):
    wrapped = ASGPipeline(sd_pipe)
    assert not wrapped.ctx.distributed and wrapped.ctx.world_size == 1
    layout = wrapped.layout(2 * NATIVE, 2 * NATIVE)
    assert list(layout.my_patches) == [0, 1, 2, 3] and len(layout.my_windows) == len(layout.windows) == 9
    assert np.isfinite(_call(wrapped, 2, 2)).all()
