"""Train the miniature text-to-image model on the shapes data set, on CPU.

    python -m asyncgen.evaluation.train_miniature --out DIR [--quick] [--seed N] [--threads N]

Three stages, each on its own seeded stream of freshly drawn shapes images:

1. **CLIP** (``transformers.CLIPModel``, a small config): text and image towers trained
   contrastively on (image, caption) pairs. Captions repeat within a batch (there are
   only a few hundred), so every pair with the same caption counts as a positive (soft
   targets) instead of being pushed apart.
2. **VAE** (``diffusers.AutoencoderKL``, downscaling factor 4): reconstruction plus a
   small KL term; its ``scaling_factor`` is then set so that latents have unit variance,
   as Stable Diffusion expects.
3. **UNet** (``diffusers.UNet2DConditionModel`` with cross-attention) on the VAE's latents,
   conditioned on the frozen CLIP text tower's last hidden states exactly as
   ``StableDiffusionPipeline`` computes them. A tenth of the captions are dropped to
   ``""`` so classifier-free guidance works. v-prediction on a cosine schedule whose
   last step is pure noise: the mean colour of a flat picture is the lowest frequency
   there is, and a schedule that leaves some of it at the last training step teaches
   the model to keep whatever mean the sampler's starting noise happens to have.
   An exponential moving average of the weights is what gets saved.

The output folder holds ``sd/`` (a ``StableDiffusionPipeline``: CLIP text tower as text
encoder, a ``CLIPTokenizer`` whose vocabulary has every caption word as one token,
the VAE, the UNet, a DDIM scheduler), ``clip/`` (the ``CLIPModel`` and its
``CLIPProcessor``) and ``training_log.json`` (configuration, time and losses per stage).
Both model folders are safetensors and load offline with ``from_pretrained``.
The same seed and thread count give the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import reporting, shapes
from .random_models import clip_byte_alphabet


@dataclass(frozen=True)
class TrainConfig:
    """Sizes and schedules of the three stages (defaults: the shipped model)."""

    image_size: int = shapes.IMAGE_SIZE
    max_length: int = 16  # tokens per prompt: the longest caption has 11 with start and end
    # CLIP
    clip_hidden: int = 64
    clip_layers: int = 4
    clip_heads: int = 4
    clip_patch: int = 4
    clip_steps: int = 1000
    clip_batch: int = 128
    clip_lr: float = 1e-3
    # VAE
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_groups: int = 16
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # UNet
    unet_channels: tuple[int, ...] = (48, 96, 96)
    unet_layers: int = 1
    unet_groups: int = 16
    unet_heads: int = 4
    unet_steps: int = 3500
    unet_batch: int = 64
    unet_lr: float = 8e-4
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    warmup_steps: int = 100


FULL = TrainConfig()
# the same architecture families at toy sizes, for a test: a few seconds in all
QUICK = TrainConfig(
    clip_hidden=32, clip_layers=1, clip_heads=2, clip_steps=30, clip_batch=32,
    vae_channels=(8, 16, 16), vae_groups=4, vae_steps=30, vae_batch=8,
    unet_channels=(16, 32, 32), unet_groups=8, unet_heads=2, unet_steps=30, unet_batch=16,
    warmup_steps=5, ema_decay=0.9,
)

START, END = "<|startoftext|>", "<|endoftext|>"


# ---------------------------------------------------------------- tokenizer


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none applies."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(p, math.inf), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges under which every word in ``words`` is one token.

    Appending the merge of a word's first two current symbols never undoes earlier
    merges (it ranks last, so it only applies where nothing else does) and shortens
    that word, so the loop ends with every word whole.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    while True:
        pending = [w for w in words if len(_bpe(w, ranks)) > 1]
        if not pending:
            return merges
        symbols = _bpe(pending[0], ranks)
        ranks[(symbols[0], symbols[1])] = len(merges)
        merges.append((symbols[0], symbols[1]))


def build_tokenizer(folder: str | os.PathLike, words: Sequence[str] = tuple(shapes.vocabulary()),
                    max_length: int = FULL.max_length):
    """A ``CLIPTokenizer`` with the byte-level alphabet plus one token per word in ``words``, saved in ``folder``.

    Any text still tokenizes (byte by byte where a word is unknown), as with CLIP's own
    vocabulary, but the caption words cost one token each. ``folder`` gets
    ``vocab.json`` and ``merges.txt`` (what the Python tokenizer of transformers 4.x
    reads) besides whatever ``save_pretrained`` writes.
    """
    from transformers import CLIPTokenizer

    bad = [w for w in words if not w or not w.isascii() or not w.isalpha() or w != w.lower()]
    if bad:
        raise ValueError(f"words must be non-empty lowercase ASCII letters; got {bad}")
    alphabet = clip_byte_alphabet()
    vocab = {s: i for i, s in enumerate(alphabet)}
    vocab.update({s + "</w>": i + len(alphabet) for i, s in enumerate(alphabet)})
    merges = word_merges(list(words))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[START] = len(vocab)
    vocab[END] = len(vocab)
    folder = Path(folder)
    vocab_file = reporting.write_atomic(folder / "vocab.json", json.dumps(vocab))
    merges_file = reporting.write_atomic(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    # file paths, passed by position: the one form every supported transformers version accepts
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length)
    whole = {w: tokenizer(w, add_special_tokens=False).input_ids for w in words}
    split = {w: ids for w, ids in whole.items() if len(ids) != 1}
    if split:
        raise RuntimeError(f"tokenizer splits caption words into several tokens: {split}")
    tokenizer.save_pretrained(folder)
    return tokenizer


def image_processor(image_size: int):
    """The ``CLIPImageProcessor`` of the miniature CLIP: resize and crop to ``image_size``, scale to [-1, 1]."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": image_size}, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length, as ``StableDiffusionPipeline.encode_prompt`` makes them."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------- models


def clip_model(cfg: TrainConfig, tokenizer):
    from transformers import CLIPConfig, CLIPModel

    start, end = tokenizer.convert_tokens_to_ids([START, END])
    text = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.clip_hidden, intermediate_size=4 * cfg.clip_hidden,
        num_hidden_layers=cfg.clip_layers, num_attention_heads=cfg.clip_heads,
        max_position_embeddings=cfg.max_length, bos_token_id=start, eos_token_id=end, pad_token_id=end,
        projection_dim=cfg.clip_hidden,
    )
    vision = dict(
        hidden_size=cfg.clip_hidden, intermediate_size=4 * cfg.clip_hidden, num_hidden_layers=cfg.clip_layers,
        num_attention_heads=cfg.clip_heads, image_size=cfg.image_size, patch_size=cfg.clip_patch,
        projection_dim=cfg.clip_hidden,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.clip_hidden))


def text_encoder_from_clip(clip):
    """The CLIP text tower as a ``CLIPTextModel``, the class ``StableDiffusionPipeline`` loads."""
    from transformers import CLIPTextModel

    encoder = CLIPTextModel(clip.config.text_config)
    # transformers 5 makes CLIPModel.text_model a CLIPTextModel; 4.x a CLIPTextTransformer, which
    # CLIPTextModel wraps as .text_model
    target = encoder if isinstance(clip.text_model, CLIPTextModel) else encoder.text_model
    target.load_state_dict(clip.text_model.state_dict())
    return encoder.eval()


def vae_model(cfg: TrainConfig):
    from diffusers import AutoencoderKL

    levels = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1, norm_num_groups=cfg.vae_groups, sample_size=cfg.image_size,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
    )


def unet_model(cfg: TrainConfig, latent_size: int):
    from diffusers import UNet2DConditionModel

    levels = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers, norm_num_groups=cfg.unet_groups, cross_attention_dim=cfg.clip_hidden,
        attention_head_dim=cfg.unet_heads,  # diffusers' legacy name for the number of heads
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
    )


_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_SCHEDULE, clip_sample=False)


def inference_scheduler():
    """DDIM on the training schedule, starting from the last (pure-noise) timestep."""
    from diffusers import DDIMScheduler

    # steps_offset is unused with trailing spacing; 1 keeps the pipeline from warning about old configs
    return DDIMScheduler(**_SCHEDULE, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
                         steps_offset=1)


# ---------------------------------------------------------------- training


def _learning_rate(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _Stage:
    """Optimiser, schedule, loss record and progress printing of one training stage."""

    def __init__(self, name: str, params, steps: int, lr: float, warmup: int, verbose: bool):
        self.name, self.steps, self.lr, self.warmup, self.verbose = name, steps, lr, warmup, verbose
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.01)
        self.losses: list[float] = []
        self.start = time.perf_counter()

    def step(self, step: int, loss: torch.Tensor) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = _learning_rate(step, self.steps, self.warmup, self.lr)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.losses.append(float(loss.detach()))
        every = max(1, self.steps // 20)
        if self.verbose and ((step + 1) % every == 0 or step + 1 == self.steps):
            recent = self.losses[-every:]
            print(f"[{self.name}] step {step + 1}/{self.steps} loss {sum(recent) / len(recent):.4f} "
                  f"({time.perf_counter() - self.start:.0f} s)", flush=True)

    def summary(self) -> dict:
        k = max(1, len(self.losses) // 10)
        windows = max(1, min(20, len(self.losses)))
        chunks = np.array_split(np.asarray(self.losses), windows)
        return {
            "steps": len(self.losses), "seconds": time.perf_counter() - self.start,
            "first_loss": float(np.mean(self.losses[:k])), "final_loss": float(np.mean(self.losses[-k:])),
            "loss_curve": [float(c.mean()) for c in chunks],
        }


def _contrastive_loss(clip, input_ids: torch.Tensor, pixel_values: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    out = clip(input_ids=input_ids, pixel_values=pixel_values)
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    targets = same / same.sum(dim=1, keepdim=True)
    logits = out.logits_per_image  # symmetric: logits_per_text is its transpose, and `same` is symmetric
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def train_clip(cfg: TrainConfig, tokenizer, seed: int, verbose: bool = True):
    torch.manual_seed(seed)
    data = shapes.ShapesDataset(seed=seed, image_size=cfg.image_size)
    clip = clip_model(cfg, tokenizer).train()
    stage = _Stage("clip", clip.parameters(), cfg.clip_steps, cfg.clip_lr, cfg.warmup_steps, verbose)
    for step in range(cfg.clip_steps):
        images, specs = data.sample(cfg.clip_batch)
        captions = [s.caption for s in specs]
        loss = _contrastive_loss(clip, tokenize(tokenizer, captions), shapes.to_tensor(images), captions)
        stage.step(step, loss)
    return clip.eval(), stage.summary()


def train_vae(cfg: TrainConfig, seed: int, verbose: bool = True):
    torch.manual_seed(seed)
    data = shapes.ShapesDataset(seed=seed, image_size=cfg.image_size)
    vae = vae_model(cfg).train()
    stage = _Stage("vae", vae.parameters(), cfg.vae_steps, cfg.vae_lr, cfg.warmup_steps, verbose)
    for step in range(cfg.vae_steps):
        x = shapes.to_tensor(data.sample(cfg.vae_batch)[0])
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, x) + cfg.vae_kl_weight * posterior.kl().mean()
        stage.step(step, loss)
    vae.eval()
    with torch.no_grad():
        x = shapes.to_tensor(data.sample(256)[0])
        latents = torch.cat([vae.encode(x[i:i + 64]).latent_dist.sample() for i in range(0, len(x), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    summary = stage.summary()
    summary["scaling_factor"] = vae.config.scaling_factor
    with torch.no_grad():
        summary["reconstruction_mse"] = float(F.mse_loss(vae.decode(vae.encode(x[:64]).latent_dist.mode()).sample, x[:64]))
    return vae, summary


def train_unet(cfg: TrainConfig, text_encoder, tokenizer, vae, seed: int, verbose: bool = True):
    torch.manual_seed(seed)
    data = shapes.ShapesDataset(seed=seed, image_size=cfg.image_size)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    scheduler = noise_scheduler()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = unet_model(cfg, cfg.image_size // factor).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    stage = _Stage("unet", unet.parameters(), cfg.unet_steps, cfg.unet_lr, cfg.warmup_steps, verbose)
    embeddings: dict[str, torch.Tensor] = {}  # the text tower is frozen: each caption is encoded once

    def embed(captions: list[str]) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in embeddings})
        if missing:
            with torch.no_grad():
                hidden = text_encoder(tokenize(tokenizer, missing))[0]
            embeddings.update(zip(missing, hidden))
        return torch.stack([embeddings[c] for c in captions])

    for step in range(cfg.unet_steps):
        images, specs = data.sample(cfg.unet_batch)
        captions = ["" if rng.random() < cfg.caption_dropout else s.caption for s in specs]
        with torch.no_grad():
            latents = vae.encode(shapes.to_tensor(images)).latent_dist.sample(generator) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)
        loss = F.mse_loss(unet(noisy, t, embed(captions)).sample, target)
        stage.step(step, loss)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
    return ema, stage.summary()


def train(out: str | os.PathLike, cfg: TrainConfig = FULL, seed: int = 0, threads: int | None = None,
          verbose: bool = True) -> dict:
    """Train all three stages and save ``out/sd``, ``out/clip`` and ``out/training_log.json``; returns the log.

    ``threads``: torch CPU threads while training (restored afterwards); ``None`` keeps the current setting.
    """
    if cfg.image_size % 2 ** (len(cfg.vae_channels) - 1):
        raise ValueError(f"image_size={cfg.image_size} must be divisible by the VAE's downscaling factor "
                         f"{2 ** (len(cfg.vae_channels) - 1)}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be at least 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return _train(Path(out), cfg, seed, verbose)
    finally:
        torch.set_num_threads(previous)


def _train(out: Path, cfg: TrainConfig, seed: int, verbose: bool) -> dict:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPProcessor

    start = time.perf_counter()
    tokenizer = build_tokenizer(out / "sd" / "tokenizer", shapes.vocabulary(), cfg.max_length)
    # a separate seeded stream (data, initialisation, noise) per stage
    clip, clip_log = train_clip(cfg, tokenizer, seed * 3 + 0, verbose)
    vae, vae_log = train_vae(cfg, seed * 3 + 1, verbose)
    text_encoder = text_encoder_from_clip(clip)
    unet, unet_log = train_unet(cfg, text_encoder, tokenizer, vae, seed * 3 + 2, verbose)

    CLIPProcessor(image_processor=image_processor(cfg.image_size), tokenizer=tokenizer).save_pretrained(out / "clip")
    clip.save_pretrained(out / "clip")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(out / "sd" / "tokenizer" / name, out / "clip" / name)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
        scheduler=inference_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out / "sd")
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*.safetensors"))}
    log = {
        "seed": seed, "threads": torch.get_num_threads(), "config": asdict(cfg),
        "clip": clip_log, "vae": vae_log, "unet": unet_log,
        "parameters": {"clip": sum(p.numel() for p in clip.parameters()),
                       "vae": sum(p.numel() for p in vae.parameters()),
                       "unet": sum(p.numel() for p in unet.parameters())},
        "weights_bytes": sizes, "total_weights_mb": sum(sizes.values()) / 2**20,
        "seconds": time.perf_counter() - start,
    }
    reporting.write_json(out / "training_log.json", log)
    return log


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m asyncgen.evaluation.train_miniature",
        description="Train the miniature text-to-image model (CLIP, VAE, UNet) on the synthetic shapes data set, "
                    "on CPU, and save it in diffusers format.",
    )
    parser.add_argument("--out", required=True, help="output folder; gets sd/, clip/ and training_log.json")
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes and 30 steps per stage (seconds, for tests); the default trains the "
                             "shipped model (about 30-45 minutes on one or two CPU cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and noise (default 0)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch CPU threads (default min(2, cores)); use 1 when another job shares the cores, "
                             "since oversubscribed threads slow training several-fold. Weights are reproducible "
                             "for the same seed and thread count")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    log = train(args.out, QUICK if args.quick else FULL, seed=args.seed, threads=args.threads, verbose=not args.quiet)
    print(f"saved {args.out}: {log['total_weights_mb']:.1f} MB of weights in {log['seconds']:.0f} s; final losses "
          f"clip {log['clip']['final_loss']:.4f}, vae {log['vae']['final_loss']:.5f}, unet {log['unet']['final_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
