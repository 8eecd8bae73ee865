"""A real LoRA adapter under AsyncDiffPipeline: built with peft, saved as a diffusers LoRA file, loaded back.

The adapter (rank 4 on the tiny SD UNet's attention projections, random non-zero ``lora_B``
so that it changes the picture) is saved with ``StableDiffusionPipeline.save_lora_weights``
and loaded with ``load_lora_weights`` into pipelines loaded with ``from_pretrained``, the
way a user applies a LoRA downloaded from the hub. The stages then run PEFT's own LoRA
layers, not a stand-in (the proxy's scale handling against a recorded PEFT backend is in
tests/runtime/test_asyncdiff_hook.py).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from asyncgen.cli.launcher import launch
from asyncgen.pipelines import AsyncDiffPipeline
from tiny_models import call_kwargs

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections, self- and cross-attention


@pytest.fixture(scope="module")
def lora_dir(sd_path, tmp_path_factory) -> Path:
    """A LoRA for the tiny SD pipeline, in diffusers' file format (``pytorch_lora_weights.safetensors``)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=True))
    # PEFT starts lora_B at zero (the adapter a no-op); a trained one is not
    generator = torch.Generator().manual_seed(1)
    names = [name for name, _ in unet.named_parameters() if ".lora_B." in name]
    assert names, "no LoRA layer was added"
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    folder = tmp_path_factory.mktemp("lora")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    return folder


def _pipeline(sd_path, lora_dir=None):
    """The tiny SD pipeline from ``from_pretrained``, with the LoRA loaded when ``lora_dir`` is given."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_path))
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
        assert pipe.get_active_adapters(), "load_lora_weights loaded no adapter"
    return pipe


def test_one_stage_equals_the_stock_lora_pipeline(sd_path, lora_dir, one_thread):
    stock = _pipeline(sd_path, lora_dir)(**call_kwargs()).images
    without = _pipeline(sd_path)(**call_kwargs()).images
    assert not np.array_equal(stock, without), "the LoRA does not change the picture: the test would prove nothing"
    one = AsyncDiffPipeline(_pipeline(sd_path, lora_dir), stages=1)
    assert torch.equal(torch.from_numpy(one(**call_kwargs()).images), torch.from_numpy(stock))
    # a LoRA scale passed at call time reaches PEFT's layers through the proxy as it does in the stock denoiser
    half = {"cross_attention_kwargs": {"scale": 0.5}}
    stock_half = _pipeline(sd_path, lora_dir)(**call_kwargs(**half)).images
    assert not np.array_equal(stock_half, stock)
    assert torch.equal(torch.from_numpy(one(**call_kwargs(**half)).images), torch.from_numpy(stock_half))


def _two_stages(rank, world_size, sd_path, lora_dir):
    torch.set_num_threads(1)
    wrapped = AsyncDiffPipeline(_pipeline(sd_path, lora_dir), stages=2, warmup=1)
    return wrapped(**call_kwargs()).images


@pytest.mark.distributed
def test_two_ranks_equal_the_serial_simulator(sd_path, lora_dir, one_thread):
    per_rank = launch(_two_stages, 2, str(sd_path), str(lora_dir), timeout=300)
    serial = AsyncDiffPipeline(_pipeline(sd_path, lora_dir), stages=2, warmup=1)(**call_kwargs()).images
    stock = _pipeline(sd_path, lora_dir)(**call_kwargs()).images
    assert not np.array_equal(serial, stock)  # stale activations were used: the schedule ran asynchronously
    for rank, images in enumerate(per_rank):
        # as in tests/distributed/test_asyncdiff.py: the same stage kernels on the same inputs; received states
        # are views into one flat buffer, whose alignment can change SIMD summation order in the last bit
        np.testing.assert_allclose(images, serial, atol=1e-5, rtol=0, err_msg=f"rank {rank}")
