"""One wrapper, several callers (pipelines/wrapping.py): calls from several threads run one at a time, each with
the image a lone call gives; a call from inside a call is refused; a wrapper refuses to be pickled, saying why;
and the wrappers' plain arguments are refused in one line naming the value and what is accepted."""

import copy
import datetime
import pickle
import threading

import pytest
import torch

import tiny_models
from asyncgen.pipelines import ASGPipeline, AsyncDiffPipeline


def _overlapping_calls(wrapper, calls: list[dict]) -> tuple[list, list]:
    """``wrapper(**call)`` for each call, from one thread each, released together by a barrier (so they overlap)."""
    barrier = threading.Barrier(len(calls))
    images, errors = [None] * len(calls), []

    def run(i: int) -> None:
        barrier.wait()
        try:
            images[i] = wrapper(**calls[i]).images
        except Exception as exc:  # noqa: BLE001  (the test reports every failure)
            errors.append(repr(exc))

    # daemons: a call that never returns fails the test below instead of keeping the worker process alive
    threads = [threading.Thread(target=run, args=(i,), name=f"caller-{i}", daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a caller never returned"
    return images, errors


def _check_each_gets_its_lone_image(wrapper, make_calls) -> None:
    """``make_calls()``: the calls' arguments, afresh (a generator is used up by a call)."""
    alone = [wrapper(**call).images for call in make_calls()]
    assert not torch.equal(alone[0], alone[1])  # different seeds: a mix-up would show
    for _ in range(2):
        images, errors = _overlapping_calls(wrapper, make_calls())
        assert errors == []
        for got, expected in zip(images, alone):
            assert torch.equal(got, expected)


def test_two_threads_on_one_asyncdiff_pipeline_get_their_own_images(sd_pipe):
    """Before: KeyError: 0 in one thread, or images off by 0.1-0.25."""
    wrapper = AsyncDiffPipeline(sd_pipe, stages=2, warmup=1)
    _check_each_gets_its_lone_image(wrapper, lambda: [
        tiny_models.call_kwargs(seed=seed, num_inference_steps=4, output_type="pt") for seed in (1, 2)])


def test_two_threads_on_one_asg_pipeline_get_their_own_images(sd_pipe):
    """Before: both images off by about 0.13 (the scheduler and the maps were shared between the calls)."""
    wrapper = ASGPipeline(sd_pipe)
    height, width = wrapper.native_size
    _check_each_gets_its_lone_image(wrapper, lambda: [
        tiny_models.call_kwargs(seed=seed, num_inference_steps=3, output_type="pt", height=2 * height, width=width)
        for seed in (1, 2)])


def test_a_call_from_inside_a_call_is_refused(sd_pipe):
    wrapper = AsyncDiffPipeline(sd_pipe, stages=2)

    def again(pipe, step, timestep, kwargs):
        wrapper(**tiny_models.call_kwargs(num_inference_steps=1))
        return kwargs

    with pytest.raises(RuntimeError, match=r"^AsyncDiffPipeline was called from inside one of its own calls"):
        wrapper(**tiny_models.call_kwargs(num_inference_steps=2, callback_on_step_end=again))
    wrapper(**tiny_models.call_kwargs(num_inference_steps=1))  # the lock was released


@pytest.mark.parametrize("cls", [AsyncDiffPipeline, ASGPipeline])
def test_pickling_a_wrapper_says_it_cannot_and_why(sd_pipe, cls):
    wrapper = cls(sd_pipe)
    with pytest.raises(TypeError) as caught:
        pickle.dumps(wrapper)
    message = str(caught.value)
    assert message.startswith(f"{cls.__name__} cannot be pickled: it is bound to this process (") and "\n" not in message
    assert f"{cls.__name__}.from_pretrained" in message
    # copies still work: a shallow one shares the state, and the lock with it; a deep one is independent
    shallow = copy.copy(wrapper)
    assert shallow.__dict__["_call_lock"] is wrapper.__dict__["_call_lock"]
    assert copy.deepcopy(wrapper).__dict__.get("_call_lock") is not wrapper.__dict__["_call_lock"]


ASYNCDIFF_REFUSED = [
    (dict(warmup=True), "warmup must be None or an integer >= 0, got True"),
    (dict(warmup=2.0), "warmup must be None or an integer >= 0, got 2.0"),
    (dict(stages=True), "stages must be a positive integer, got True"),
    (dict(stride=False), "stride must be a positive integer, got False"),
    (dict(timeout=-5), "timeout=-5: the timeout must be a finite number of seconds > 0"),
    (dict(timeout=0), "timeout=0: the timeout must be a finite number of seconds > 0"),
    (dict(timeout=float("inf")), "timeout=inf: the timeout must be a finite number of seconds > 0"),
    (dict(timeout="60"), "timeout='60': not a duration"),
    (dict(timeout=datetime.timedelta(seconds=-1)), "the timeout must be a finite number of seconds > 0"),
    (dict(time_shift="no"), "time_shift='no': must be True or False"),
    (dict(cfg_parallel=1), "cfg_parallel=1: must be True or False"),
    (dict(device="gpu"), "device='gpu': not a device"),
]


ASG_REFUSED = [
    (dict(timeout=-5), "timeout=-5: the timeout must be a finite number of seconds > 0"),
    (dict(timeout=True), "timeout=True: not a duration"),
    (dict(structure_fraction=True), "structure_fraction=True: must be a number from 0 to 1"),
    (dict(structure_guidance="1"), "structure_guidance='1': must be a finite number >= 0"),
    (dict(attention_layers=5), "attention_layers=5: must be 'up', 'mid', 'down', 'all' or a list of module names"),
    (dict(tiled_decoding="no"), "tiled_decoding='no': must be True or False"),
    (dict(device="gpu"), "device='gpu': not a device"),
]


@pytest.mark.parametrize("cls, kwargs, message", [
    pytest.param(cls, kwargs, message, id=f"{cls.__name__}-{i}")
    for cls, refused in ((AsyncDiffPipeline, ASYNCDIFF_REFUSED), (ASGPipeline, ASG_REFUSED))
    for i, (kwargs, message) in enumerate(refused)])
def test_wrapper_arguments_are_refused_in_one_line(sd_pipe, cls, kwargs, message):
    with pytest.raises(ValueError) as caught:
        cls(sd_pipe, **kwargs)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ValueError) as caught:
        cls.from_pretrained("/no/such/folder", **kwargs)  # refused before anything is loaded
    assert message in str(caught.value)
