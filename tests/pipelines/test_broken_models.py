"""Pipeline folders broken on disk (pipelines/loading.py): one line naming the component, the file and the fault.

Each case copies the saved tiny SD pipeline and damages one thing, then loads it the ways a
user would: the loading helpers, ``AsyncDiffPipeline.from_pretrained`` (whole, and stage-only
as a rank of a process group reads it) and ``asyncgen generate --model DIR`` (exit 2, one line).
Before, these were diffusers' "no file named config.json" without the component, "it may hold
only pickle" for a corrupt file, or a traceback from torch.
"""

import json
import os
import re
import shutil

import pytest

from asyncgen.cli.main import main
from asyncgen.pipelines import AsyncDiffPipeline
from asyncgen.pipelines.lean_loading import local_pipeline_folder
from asyncgen.pipelines.from_configs import describe_pipeline
from asyncgen.pipelines.loading import BrokenModelError, PickleRefused, load_pipeline


def _edit_json(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def only_model_index(folder):
    for entry in folder.iterdir():
        if entry.name != "model_index.json":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def missing_vae(folder):
    shutil.rmtree(folder / "vae")


def truncated_unet(folder):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def random_bytes_text_encoder(folder):
    path = folder / "text_encoder" / "model.safetensors"
    path.write_bytes(os.urandom(path.stat().st_size))


def unknown_class(folder):
    _edit_json(folder / "model_index.json", unet=["diffusers", "UNetThatDoesNotExist"])


def unknown_pipeline_class(folder):
    _edit_json(folder / "model_index.json", _class_name="NoSuchPipeline")


def negative_channels(folder):
    _edit_json(folder / "unet" / "config.json", block_out_channels=[-16, 32])


def negative_latent_channels(folder):
    _edit_json(folder / "vae" / "config.json", latent_channels=-4)


def missing_unet_config(folder):
    (folder / "unet" / "config.json").unlink()


def unet_config_not_json(folder):
    (folder / "unet" / "config.json").write_text("{block_out_channels: [16, 32]")


def missing_unet_weights(folder):
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()


def pickle_only_unet(folder):
    import torch
    from safetensors.torch import load_file

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()


# damage, the error, what its message says (a regex; DIR is the damaged folder), whether the configs alone show it
CASES = [
    (only_model_index, BrokenModelError, r"DIR: model_index.json lists the components [a-z_, ]*unet, vae, but none "
                                         r"of their folders is there", True),
    (missing_vae, BrokenModelError, r"DIR: component vae: the folder DIR/vae is missing \(model_index.json lists vae "
                                    r"as diffusers.AutoencoderKL\)", True),
    (truncated_unet, BrokenModelError, r"DIR: component unet: DIR/unet/diffusion_pytorch_model.safetensors is "
                                       r"truncated: \d+ bytes, its header describes \d+", False),
    (random_bytes_text_encoder, BrokenModelError, r"DIR: component text_encoder: DIR/text_encoder/model.safetensors "
                                                  r"is not a safetensors file", False),
    (unknown_class, BrokenModelError, r"DIR: component unet: DIR/model_index.json names the class "
                                      r"diffusers.UNetThatDoesNotExist, which this environment \(diffusers", True),
    (unknown_pipeline_class, BrokenModelError, r"DIR: DIR/model_index.json names the pipeline class 'NoSuchPipeline', "
                                               r"which this environment", True),
    (negative_channels, BrokenModelError, r"DIR: component unet: DIR/unet/config.json has block_out_channels="
                                          r"\[-16, 32\]; channel counts and sizes must be positive", True),
    (negative_latent_channels, BrokenModelError, r"DIR: component vae: DIR/vae/config.json has latent_channels=-4", True),
    (missing_unet_config, BrokenModelError, r"DIR: component unet: DIR/unet/config.json is missing", True),
    (unet_config_not_json, BrokenModelError, r"DIR: component unet: DIR/unet/config.json is not valid JSON", True),
    (missing_unet_weights, BrokenModelError, r"DIR: component unet: no weights file in DIR/unet \(expected "
                                             r"diffusion_pytorch_model.safetensors .*\); the folder holds: config.json",
     False),
    (pickle_only_unet, PickleRefused, r"DIR: component unet: no safetensors weights found in DIR/unet, only pickle "
                                      r"\(.bin\) checkpoints \(diffusion_pytorch_model.bin\)", False),
]
IDS = [case[0].__name__ for case in CASES]


@pytest.fixture
def damaged(sd_path, tmp_path):
    def make(damage):
        folder = tmp_path / damage.__name__
        shutil.copytree(sd_path, folder)
        damage(folder)
        return folder

    return make


def _pattern(message: str, folder) -> str:
    return "^" + message.replace("DIR", re.escape(str(folder)))


@pytest.mark.parametrize("damage, error, message, configs_show_it", CASES, ids=IDS)
def test_the_loading_helpers_name_the_component_and_file(damaged, damage, error, message, configs_show_it):
    folder = damaged(damage)
    loaders = [lambda: load_pipeline(str(folder)), lambda: AsyncDiffPipeline.from_pretrained(str(folder))]
    # the stage-only loader's first step; a missing file is left to the later steps (a rank reads only what it runs,
    # and needs no file for a component it runs in no part), so is pickle (they know allow_pickle)
    if damage not in (pickle_only_unet, missing_unet_weights):
        loaders.append(lambda: local_pipeline_folder(str(folder)))
    for load in loaders:
        with pytest.raises(error) as caught:
            load()
        assert re.search(_pattern(message, folder), str(caught.value)), str(caught.value)
        assert "\n" not in str(caught.value)
    if configs_show_it:  # what asyncgen plan and the CLI's checks read: the configs, no weights
        with pytest.raises(BrokenModelError, match=_pattern(message, folder)):
            describe_pipeline(str(folder))
    else:
        describe_pipeline(str(folder))  # configs intact: describing needs no weights


def test_pickle_weights_still_load_when_allowed(damaged):
    folder = damaged(pickle_only_unet)
    assert load_pipeline(str(folder), allow_pickle=True).unet is not None


@pytest.mark.parametrize("damage, error, message, configs_show_it", CASES, ids=IDS)
def test_generate_with_a_broken_model_is_one_line_and_exit_2(damaged, tmp_path, capsys, damage, error, message,
                                                            configs_show_it):
    folder = damaged(damage)
    capsys.readouterr()
    code = main(["generate", "a red circle", "--model", str(folder), "-o", str(tmp_path / "out.png"), "--steps", "1",
                 "--height", "16", "--width", "16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("asyncgen generate: error: ") and "Traceback" not in err
    # the component and the file are named (the CLI may shorten the folder's own name to --model's)
    expected = message.split(": ", 1)[1] if message.startswith("DIR: component") else message
    assert re.search(expected.replace("DIR", re.escape(str(folder))), err), err
    assert not (tmp_path / "out.png").exists()


def test_a_config_no_model_can_be_built_from_is_one_line(damaged, tmp_path, capsys):
    """A damage the checks do not know by name (a negative kernel size): still one line, never a torch traceback."""
    def negative_kernel(folder):
        _edit_json(folder / "unet" / "config.json", conv_in_kernel=-3)

    folder = damaged(negative_kernel)
    describe = f"{folder}: component unet: cannot build a UNet2DConditionModel from {folder}/unet/config.json"
    with pytest.raises(BrokenModelError, match="^" + re.escape(describe)):
        describe_pipeline(str(folder))
    with pytest.raises(BrokenModelError, match="^" + re.escape(f"{folder}: could not build the pipeline")):
        load_pipeline(str(folder))
    capsys.readouterr()
    assert main(["generate", "a red circle", "--model", str(folder), "-o", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "component unet: cannot build a UNet2DConditionModel" in err, err
