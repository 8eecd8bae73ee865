"""The miniature transformer (``train_miniature --arch dit``): trained, saved, loaded back, and run by AsyncDiff."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from asyncgen.evaluation import miniature_quality, prompts, train_miniature
from asyncgen.pipelines import AsyncDiffPipeline, miniature

PROMPT = "a large red circle on a blue background"


def _load(folder):
    from diffusers import StableDiffusion3Pipeline

    # saved without T5, so from_pretrained must be told the absent components
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(next(folder.glob("*.safetensors"))))


@pytest.fixture(scope="module")
def quick_dit(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick_dit")
    # an earlier record in the log (the UNet model's, when both are trained into one folder) must survive
    (out / "training_log.json").write_text(json.dumps({"unet": {"steps": 7}}))
    entry = train_miniature.train_dit_pipeline(out, cfg=train_miniature.DIT_QUICK, seed=0, threads=1, verbose=False)
    return out, entry


def test_quick_dit_trains_and_logs_beside_earlier_records(quick_dit):
    out, entry = quick_dit
    assert entry["transformer"]["steps"] == train_miniature.DIT_QUICK.steps
    assert entry["transformer"]["final_loss"] < entry["transformer"]["first_loss"], entry["transformer"]
    assert entry["cpu_seconds"] > 0 and entry["base"] == str(miniature.MINIATURE_WEIGHTS)
    log = json.loads((out / "training_log.json").read_text())
    assert log["unet"] == {"steps": 7} and log["dit"] == json.loads(json.dumps(entry))


def test_quick_dit_loads_back_and_generates(quick_dit):
    out, _ = quick_dit
    pipe = _load(out / "dit")
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel" and pipe.text_encoder_3 is None
    image = pipe(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_dit_reuses_the_miniatures_frozen_components(quick_dit):
    out, _ = quick_dit
    sd, dit = miniature.MINIATURE_SD_PATH, out / "dit"
    vae, shipped_vae = _weights(dit / "vae"), _weights(sd / "vae")
    assert vae.keys() == shipped_vae.keys() and all(torch.equal(vae[k], shipped_vae[k]) for k in vae)
    tower = _weights(sd / "text_encoder")
    for slot in ("text_encoder", "text_encoder_2"):
        encoder = _weights(dit / slot)
        # the same tower (under the projection model's prefix) plus the trained CLIP's text projection
        assert all(torch.equal(encoder[f"text_model.{k}"], v) for k, v in tower.items())
        assert torch.equal(encoder["text_projection.weight"],
                           _weights(miniature.MINIATURE_CLIP_PATH)["text_projection.weight"])
    from transformers import CLIPTokenizer

    tokenizer, shipped_tokenizer = (CLIPTokenizer.from_pretrained(f / "tokenizer") for f in (dit, sd))
    assert tokenizer.get_vocab() == shipped_tokenizer.get_vocab()
    assert tokenizer.model_max_length == shipped_tokenizer.model_max_length
    assert tokenizer(PROMPT).input_ids == shipped_tokenizer(PROMPT).input_ids
    assert json.loads((dit / "vae" / "config.json").read_text())["shift_factor"] == 0.0


def test_dit_training_is_reproducible_from_the_seed(tmp_path):
    cfg = replace(train_miniature.DIT_QUICK, steps=3)
    runs = {name: train_miniature.train_dit_pipeline(tmp_path / name, cfg=cfg, seed=seed, threads=1, verbose=False)
            for name, seed in (("first", 0), ("again", 0), ("other", 1))}
    weights = {name: _weights(tmp_path / name / "dit" / "transformer") for name in runs}
    assert all(torch.equal(weights["first"][k], weights["again"][k]) for k in weights["first"])
    assert not all(torch.equal(weights["first"][k], weights["other"][k]) for k in weights["first"])


def test_dit_needs_a_trained_base(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a trained miniature.*sd/model_index.json"):
        train_miniature.train_dit_pipeline(tmp_path / "out", base=tmp_path / "empty", cfg=train_miniature.DIT_QUICK)


def test_help_names_the_architectures(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_miniature.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--arch {sd,dit}" in text and "--base" in text
    with pytest.raises(SystemExit) as exit_info:
        train_miniature.main(["--out", "x", "--base", "y"])
    assert exit_info.value.code == 2 and "--base is for --arch dit only" in capsys.readouterr().err


# ------------------------------------------------------------------ the shipped miniature transformer


def test_shipped_dit_is_safetensors_within_25_mb():
    files = [p for p in miniature.miniature_dit_path().rglob("*") if p.is_file()]
    assert all(p.suffix not in (".bin", ".pt", ".pth", ".ckpt", ".pkl") for p in files)
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 4  # transformer, VAE and the two text encoders
    assert sum(p.stat().st_size for p in weights) <= 25 * 2**20
    assert "dit" in json.loads((miniature.MINIATURE_WEIGHTS / "training_log.json").read_text())


def test_shipped_dit_one_stage_equals_stock():
    stock = miniature.load_miniature_dit()
    call = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=miniature.DEFAULT_GUIDANCE, output_type="np")
    reference = stock(**call, generator=torch.Generator().manual_seed(0)).images
    wrapped = AsyncDiffPipeline(miniature.load_miniature_dit(), stages=1)
    assert np.array_equal(wrapped(**call, generator=torch.Generator().manual_seed(0)).images, reference)


def test_shipped_dit_follows_prompts():
    result = miniature_quality.evaluate_quality(miniature.load_miniature_dit(), prompts=prompts.miniature_prompts(12, seed=7))
    s = result.summary
    # 12 of the 180 prompts (the transformer samples about 5x slower than the UNet here). Over all 180 it measured
    # colour 96.7 %, background 100 %, shape 60 % (README); the bar leaves up to 3 misses of 12 for the sample.
    # Shape is not asserted: at 60 % a 12-prompt sample says little
    assert s["colour_accuracy"] >= 0.75 and s["background_accuracy"] >= 0.75, s
    assert s["pipeline"] == "StableDiffusion3Pipeline"


def test_builtin_names_resolve_and_a_wrong_one_lists_them(capsys):
    from asyncgen.cli.main import main

    assert miniature.resolve_model(None) == (str(miniature.MINIATURE_SD_PATH), True)
    assert miniature.resolve_model("miniature-dit") == (str(miniature.MINIATURE_DIT_PATH), True)
    assert miniature.resolve_model("org/model") == ("org/model", False)
    code = main(["generate", PROMPT, "--model", "miniature-ditt"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--model miniature-ditt" in err and "the built-in models are miniature, miniature-dit" in err


def test_quality_command_takes_the_builtin_names(tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(PROMPT + "\n")
    assert miniature_quality.main(["--model", "miniature-dit", "--prompts", str(prompt_file), "--steps", "2",
                                   "--no-clip-score", "--out", str(tmp_path / "q")]) == 0
    summary = json.loads((tmp_path / "q" / "quality.json").read_text())["summary"]
    assert summary["pipeline"] == "StableDiffusion3Pipeline" and summary["prompts"] == 1
    with pytest.raises(SystemExit):
        miniature_quality.main(["--model", "miniature-ditt", "--out", str(tmp_path / "q2")])
    assert "not a built-in model (miniature, miniature-dit)" in capsys.readouterr().err
