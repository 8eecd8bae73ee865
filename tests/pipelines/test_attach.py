"""apply_asyncdiff (pipelines/attach.py): AsyncDiff attached through diffusers.hooks, without the wrapper."""

import threading
import time

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry

import tiny_models
from asyncgen.cli.launcher import launch
from asyncgen.pipelines import AsyncDiffConfig, AsyncDiffPipeline, apply_asyncdiff
from asyncgen.placement.residency import ReleasedModule
from asyncgen.runtime.asyncdiff_hook import HOOK_NAME, AsyncDiffHook
from tiny_models import call_kwargs

STEPS = 4


def _images(pipe, **kwargs):
    return pipe(**call_kwargs(num_inference_steps=STEPS, **kwargs)).images


def test_one_stage_is_the_stock_pipeline_and_two_equal_the_wrapper(sd_path):
    stock = _images(tiny_models.load(sd_path))
    pipe = tiny_models.load(sd_path)
    unet = pipe.unet
    attached = apply_asyncdiff(pipe, AsyncDiffConfig(stages=1))
    assert pipe.unet is unet and type(unet).__name__ == "UNet2DConditionModel"  # the pipeline's own module
    assert HookRegistry.check_if_exists_or_initialize(unet).get_hook(HOOK_NAME) is attached.hook
    assert np.array_equal(_images(pipe), stock)  # one stage computes every step whole: exactly the stock call

    pipe = tiny_models.load(sd_path)
    apply_asyncdiff(pipe, AsyncDiffConfig(stages=2, warmup=1))
    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1)
    hooked = _images(pipe)
    assert np.array_equal(hooked, _images(wrapped))  # the wrapper is this hook plus its front door
    assert not np.array_equal(hooked, stock)  # stale inputs were used
    assert np.array_equal(_images(pipe), hooked)  # a second call starts afresh (the lanes were reset)


def test_a_pipeline_runs_asyncdiff_once(sd_path):
    pipe = tiny_models.load(sd_path)
    apply_asyncdiff(pipe, AsyncDiffConfig(stages=2))
    with pytest.raises(TypeError, match="already wrapped by AsyncDiffPipeline"):
        apply_asyncdiff(pipe, AsyncDiffConfig(stages=2))
    with pytest.raises(TypeError, match="config must be an AsyncDiffConfig, got dict"):
        apply_asyncdiff(tiny_models.load(sd_path), {"stages": 2})


@pytest.mark.parametrize("kwargs, message", [
    (dict(stages=True), "stages must be a positive integer, got True"),
    (dict(stages=0), "stages must be a positive integer, got 0"),
    (dict(warmup=-1), "warmup must be None or an integer >= 0, got -1"),
    (dict(cfg_parallel="yes"), "cfg_parallel='yes': must be True or False"),
    (dict(components="everywhere"), "components='everywhere' is not one of"),
    (dict(timeout=-5), "timeout"),
])
def test_a_bad_config_is_refused_when_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AsyncDiffConfig(**kwargs)


def test_from_pipe_siblings_share_the_denoiser_and_leave_the_original_stock(sd_path):
    pipe = tiny_models.load(sd_path)
    stock = _images(pipe)
    first = AsyncDiffPipeline.from_pipe(pipe, stages=2, warmup=1)
    second = AsyncDiffPipeline.from_pipe(pipe, stages=2, warmup=2)
    hooks = [h for h in HookRegistry.check_if_exists_or_initialize(pipe.unet).hooks.values()
             if isinstance(h, AsyncDiffHook)]
    assert hooks == [first.hook, second.hook] and all(h.scoped for h in hooks)  # one module, two scoped hooks
    one, two = _images(first), _images(second)
    assert np.array_equal(_images(pipe), stock)  # outside the siblings' calls the hooks stand aside
    assert np.array_equal(one, _images(AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1)))
    assert np.array_equal(two, _images(AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=2)))
    # a hook that would work in every call (the siblings' too) is refused while they exist
    with pytest.raises(TypeError, match="already wrapped by AsyncDiffPipeline"):
        AsyncDiffPipeline(pipe, stages=2)


def test_from_pipe_siblings_take_turns(sd_path):
    """Siblings share the scheduler and the denoiser: their calls from two threads run one after the other."""
    pipe = tiny_models.load(sd_path)
    siblings = [AsyncDiffPipeline.from_pipe(pipe, stages=2, warmup=1) for _ in range(2)]
    for sibling in siblings:  # a from_pipe pipeline starts with progress bars on; tqdm's locks are not under test
        sibling.set_progress_bar_config(disable=True)
    owner, interleaved = [None], []

    def step(p, i, t, tensors):
        if i == 0:
            owner[0] = threading.get_ident()  # this call has started
        elif owner[0] != threading.get_ident():
            interleaved.append(i)  # the other sibling's call started in the middle of this one
        time.sleep(0.01)  # room for the other thread to start, were it let in
        return {}

    results = [None, None]

    def run(k):
        results[k] = _images(siblings[k], callback_on_step_end=step)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a sibling's call never returned"
    assert not interleaved
    assert siblings[0].__dict__["_call_lock"] is siblings[1].__dict__["_call_lock"]
    expected = _images(AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1))
    assert all(np.array_equal(r, expected) for r in results)


def _released(rank, world_size, sd_path):
    torch.set_num_threads(1)
    pipe = tiny_models.load(sd_path)
    attached = apply_asyncdiff(pipe, AsyncDiffConfig(stages=world_size, warmup=1, components="replicated"))
    stand_ins = [m for m in pipe.unet.modules() if isinstance(m, ReleasedModule)]
    pipe.to("cpu", torch.float32)  # walks the denoiser's tree: would fail on a parameter left on meta
    images = _images(pipe, generator=torch.Generator().manual_seed(0))
    return dict(images=images, stand_ins=len(stand_ins),
                meta_in_tree=sum(p.is_meta for p in pipe.unet.parameters()),
                resident=sum(p.numel() for p in attached.hook.resident_parameters()),
                in_tree=sum(p.numel() for p in pipe.unet.parameters()))


@pytest.mark.distributed
def test_two_ranks_release_other_stages_into_stand_ins(sd_path, one_thread):
    results = launch(_released, 2, str(sd_path), timeout=300)
    serial = tiny_models.load(sd_path)
    apply_asyncdiff(serial, AsyncDiffConfig(stages=2, warmup=1))
    expected = _images(serial, generator=torch.Generator().manual_seed(0))
    for rank, r in enumerate(results):
        assert r["stand_ins"] > 0 and r["meta_in_tree"] == 0, rank
        assert r["resident"] == r["in_tree"], rank  # the module tree holds exactly what the rank runs
        # received states sit at aligned offsets of one flat buffer (comm/wire.py): see assert_equals_simulator
        tiny_models.assert_equals_simulator(r["images"], expected, err_msg=f"rank {rank}")


def test_a_deep_copy_runs_on_hooks_of_its_own(sd_path):
    import copy

    wrapped = AsyncDiffPipeline(tiny_models.load(sd_path), stages=2, warmup=1)
    twin = copy.deepcopy(wrapped)
    assert twin.hook is not wrapped.hook and twin.denoiser is not wrapped.denoiser
    assert twin.hook.split.denoiser is twin.denoiser  # the copy's hook runs the copy's modules
    assert np.array_equal(_images(twin), _images(wrapped))
