"""Train the miniature text-to-image models on the shapes data set, on CPU.

    python -m asyncgen.evaluation.train_miniature --out DIR [--arch sd|dit] [--quick] [--seed N] [--threads N]

``--arch sd`` (the default) trains the miniature Stable Diffusion from scratch (below);
``--arch dit`` trains only a diffusion transformer on top of an existing miniature's
frozen text tower, tokenizer and VAE (see "The miniature transformer" further down).

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

The miniature transformer (``--arch dit``)
-------------------------------------------
A ``StableDiffusion3Pipeline`` whose ``SD3Transformer2DModel`` is trained here, and whose
other components are the miniature's, unchanged: the CLIP text tower (``sd/text_encoder``
plus the contrastively trained ``text_projection`` of ``clip/``, as the
``CLIPTextModelWithProjection`` SD3 loads) in both CLIP slots, the tokenizer, and the
VAE (the same weights; its config gains ``shift_factor: 0.0``, which SD3's pipeline adds
when decoding and the SD VAE leaves unset). There is no T5 (``text_encoder_3=None``):
the pipeline then appends as many all-zero tokens as the prompt has, which carry no
information. The output is ``dit/`` beside ``sd/`` and a ``"dit"`` entry in
``training_log.json`` (the other entries are kept).

SD3 rather than PixArt-α, because SD3's stock ``__call__`` runs these components with
its default arguments. ``PixArtAlphaPipeline`` does not: it pads prompts to
``max_sequence_length=120`` tokens, past the 16 positions of the miniature's CLIP (every
call would have to pass ``max_sequence_length=16``); its resolution binning (on by
default) raises "Invalid sample size" for any transformer sample size but 32, 64 or 128
latents (the miniature's is 8, so every call would need ``use_resolution_binning=False``);
and its ``clean_caption`` wants bs4 and ftfy, which asyncgen does not install. SD3's
pipeline takes two CLIP towers and an optional T5, and it is the architecture the
transformer benchmarks already run (``random_models.save_bench_sd3_pipeline``). The
two CLIP slots hold the same tower (the pipeline requires both): the transformer sees
its penultimate hidden states twice over, concatenated, which adds no information and
costs about 1 MB of weights.

Training is rectified flow, the objective of SD3 and of ``FlowMatchEulerDiscreteScheduler``:
``x_s = (1 - s) x_0 + s noise`` and the transformer predicts ``noise - x_0`` at timestep
``1000 s``. Half the noise levels are drawn logit-normal (SD3's choice: most work at
middle noise, where shape is decided), half uniform, so that the ends are learnt too: the
sampler starts at ``s = 1`` exactly, pure noise, where the mean colour is decided, and
finishes at low noise, where edges are. The scheduler's ``shift`` is 1: SD3's shift
spends more steps at high noise to make up for the redundancy of high-resolution images,
and an 8x8 latent has none. Text conditioning is computed by the pipeline's own
``encode_prompt``, so training sees exactly what sampling does; a tenth of the captions
are dropped to ``""``, the pipeline's negative prompt, for classifier-free guidance; the
saved weights are an exponential moving average.
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


@dataclass(frozen=True)
class DitConfig:
    """Size and schedule of the miniature transformer (defaults: the shipped model)."""

    patch_size: int = 1  # 8x8 latents are 64 tokens at patch 1; patch 2 would leave 16, too coarse for the shapes
    layers: int = 5
    heads: int = 4
    head_dim: int = 24
    steps: int = 1500
    batch: int = 32
    lr: float = 5e-4
    caption_dropout: float = 0.1
    ema_decay: float = 0.995  # averages about the last 200 steps: 0.999 would still hold the early weights at 1500
    warmup_steps: int = 100
    shift: float = 1.0  # FlowMatchEulerDiscreteScheduler's shift, at inference (training draws its own levels)


DIT_FULL = DitConfig()
DIT_QUICK = DitConfig(layers=2, heads=2, head_dim=8, steps=20, batch=8, warmup_steps=5, ema_decay=0.9)
ARCHITECTURES = ("sd", "dit")



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


# ---------------------------------------------------------------- the miniature transformer


def dit_components(base: str | os.PathLike) -> dict:
    """The frozen components of a miniature (``base/sd`` and ``base/clip``) as a ``StableDiffusion3Pipeline`` takes them.

    Both CLIP slots get the text tower of ``base/sd/text_encoder`` with the text projection of
    ``base/clip`` (a ``CLIPTextModelWithProjection``); the VAE is ``base/sd/vae`` with
    ``shift_factor`` 0 (the SD config leaves it unset, and SD3's pipeline adds it when decoding).
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = Path(base)
    missing = [str(base / m) for m in ("sd/model_index.json", "clip/config.json") if not (base / m).is_file()]
    if missing:
        raise FileNotFoundError(f"{base} is not a trained miniature (missing {', '.join(missing)}); train one with "
                                f"`python -m asyncgen.evaluation.train_miniature --out {base}` or pass the shipped "
                                f"one's folder")
    tower = CLIPTextModel.from_pretrained(base / "sd" / "text_encoder")
    clip = CLIPModel.from_pretrained(base / "clip")
    encoder = CLIPTextModelWithProjection(tower.config)
    # transformers 5: both text_model attributes are CLIPTextModel-shaped (no wrapper); 4.x wraps one level
    encoder.text_model.load_state_dict(getattr(tower, "text_model", tower).state_dict())
    encoder.text_projection.load_state_dict(clip.text_projection.state_dict())
    vae = AutoencoderKL.from_pretrained(base / "sd" / "vae")
    if vae.config.shift_factor is None:
        vae.register_to_config(shift_factor=0.0)
    return {"text_encoder": encoder.eval().requires_grad_(False),
            "tokenizer": CLIPTokenizer.from_pretrained(base / "sd" / "tokenizer"),
            "vae": vae.eval().requires_grad_(False)}


def dit_model(cfg: DitConfig, latent_size: int, latent_channels: int, text_hidden: int):
    """An ``SD3Transformer2DModel`` for two CLIP towers of width ``text_hidden`` and no T5."""
    from diffusers import SD3Transformer2DModel

    if latent_size % cfg.patch_size:
        raise ValueError(f"patch_size={cfg.patch_size} must divide the latent size {latent_size}")
    width = cfg.heads * cfg.head_dim
    return SD3Transformer2DModel(
        sample_size=latent_size, patch_size=cfg.patch_size, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=cfg.layers, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
        # the pipeline concatenates the two CLIP towers' features (and pools), and T5's zeros match that width
        joint_attention_dim=2 * text_hidden, pooled_projection_dim=2 * text_hidden, caption_projection_dim=width,
        # the position table covers the latent exactly: the default (96 patches a side) would ship 96x96 unused rows
        pos_embed_max_size=latent_size // cfg.patch_size,
    )


def flow_scheduler(cfg: DitConfig = DIT_FULL):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)


def _dit_pipeline(components: dict, transformer, cfg: DitConfig):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_scheduler(cfg), vae=components["vae"],
        text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        text_encoder_2=components["text_encoder"], tokenizer_2=components["tokenizer"],
        text_encoder_3=None, tokenizer_3=None,
    )


def _noise_levels(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` noise levels in (0, 1): the first half logit-normal(0, 1), the rest uniform."""
    logit_normal = torch.sigmoid(torch.randn(n, generator=generator))
    uniform = torch.rand(n, generator=generator)
    return torch.where(torch.arange(n) < n // 2, logit_normal, uniform)


def train_dit(cfg: DitConfig, components: dict, image_size: int, seed: int, verbose: bool = True):
    """Train an ``SD3Transformer2DModel`` against frozen ``components``; returns (EMA transformer, log)."""
    torch.manual_seed(seed)
    data = shapes.ShapesDataset(seed=seed, image_size=image_size)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    vae, encoder = components["vae"], components["text_encoder"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    transformer = dit_model(cfg, image_size // factor, vae.config.latent_channels, encoder.config.hidden_size).train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    pipe = _dit_pipeline(components, ema, cfg)  # for its encode_prompt: the conditioning sampling will see
    stage = _Stage("dit", transformer.parameters(), cfg.steps, cfg.lr, cfg.warmup_steps, verbose)
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # frozen text towers: each caption once

    def embed(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({c for c in captions if c not in embeddings})
        if missing:
            with torch.no_grad():
                tokens, _, pooled, _ = pipe.encode_prompt(prompt=missing, prompt_2=None, prompt_3=None,
                                                          device=torch.device("cpu"),
                                                          do_classifier_free_guidance=False)
            embeddings.update(zip(missing, zip(tokens, pooled)))
        pairs = [embeddings[c] for c in captions]
        return torch.stack([t for t, _ in pairs]), torch.stack([p for _, p in pairs])

    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    for step in range(cfg.steps):
        images, specs = data.sample(cfg.batch)
        captions = ["" if rng.random() < cfg.caption_dropout else s.caption for s in specs]
        with torch.no_grad():
            latents = (vae.encode(shapes.to_tensor(images)).latent_dist.sample(generator) - shift) * scale
        noise = torch.randn(latents.shape, generator=generator)
        levels = _noise_levels(len(latents), generator)
        s = levels.view(-1, 1, 1, 1)
        tokens, pooled = embed(captions)
        prediction = transformer(hidden_states=(1 - s) * latents + s * noise, encoder_hidden_states=tokens,
                                 pooled_projections=pooled, timestep=levels * 1000).sample
        loss = F.mse_loss(prediction, noise - latents)
        stage.step(step, loss)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), transformer.parameters()):
                e.lerp_(p, 1 - decay)
    return ema, stage.summary()


def train_dit_pipeline(out: str | os.PathLike, base: str | os.PathLike | None = None, cfg: DitConfig = DIT_FULL,
                       seed: int = 0, threads: int | None = None, verbose: bool = True) -> dict:
    """Train the miniature transformer on ``base``'s frozen components; save ``out/dit`` and add a ``"dit"``
    entry to ``out/training_log.json`` (other entries kept); returns that entry.

    ``base``: a folder with ``sd/`` and ``clip/`` (default: the shipped miniature).
    ``threads``: torch CPU threads while training (restored afterwards); ``None`` keeps the current setting.
    """
    from asyncgen.pipelines.miniature import MINIATURE_WEIGHTS

    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be at least 1")
    out, base = Path(out), Path(base if base is not None else MINIATURE_WEIGHTS)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        components = dit_components(base)
        image_size = components["vae"].config.sample_size
        transformer, transformer_log = train_dit(cfg, components, image_size, seed, verbose)
        _dit_pipeline(components, transformer, cfg).save_pretrained(out / "dit")
        sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted((out / "dit").rglob("*.safetensors"))}
        entry = {
            "seed": seed, "threads": torch.get_num_threads(), "config": asdict(cfg), "image_size": image_size,
            "base": str(base), "transformer": transformer_log,
            "parameters": {"transformer": sum(p.numel() for p in transformer.parameters())},
            "weights_bytes": sizes, "total_weights_mb": sum(sizes.values()) / 2**20,
            "seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
        }
    finally:
        torch.set_num_threads(previous)
    log_path = out / "training_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    log["dit"] = entry
    reporting.write_json(log_path, log)
    return entry


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
    previous_log = out / "training_log.json"
    if previous_log.is_file():  # a transformer trained earlier into this folder keeps its record
        dit = json.loads(previous_log.read_text()).get("dit")
        if dit is not None:
            log["dit"] = dit
    reporting.write_json(out / "training_log.json", log)
    return log


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m asyncgen.evaluation.train_miniature",
        description="Train a miniature text-to-image model on the synthetic shapes data set, on CPU, and save it in "
                    "diffusers format: --arch sd trains CLIP, VAE and UNet; --arch dit trains an SD3 transformer on "
                    "an existing miniature's frozen text tower, tokenizer and VAE.",
    )
    parser.add_argument("--out", required=True,
                        help="output folder; --arch sd writes sd/, clip/ and training_log.json, --arch dit writes "
                             "dit/ and adds a \"dit\" entry to training_log.json")
    parser.add_argument("--arch", default="sd", choices=ARCHITECTURES,
                        help="sd (default): the miniature Stable Diffusion (UNet), from scratch; dit: the miniature "
                             "transformer (StableDiffusion3Pipeline), reusing --base's text tower, tokenizer and VAE")
    parser.add_argument("--base", default=None,
                        help="--arch dit only: folder holding the miniature's sd/ and clip/ whose components the "
                             "transformer reuses (default: the shipped miniature)")
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes and a few dozen steps (seconds, for tests); the default trains the "
                             "shipped model (sd: about 45 minutes on one CPU core; dit: about 27 CPU minutes on one thread)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and noise (default 0)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch CPU threads (default min(2, cores)); use 1 when another job shares the cores, "
                             "since oversubscribed threads slow training several-fold. Weights are reproducible "
                             "for the same seed and thread count")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if args.base is not None and args.arch != "dit":
        parser.error(f"--base is for --arch dit only (got --arch {args.arch})")
    if args.arch == "dit":
        entry = train_dit_pipeline(args.out, args.base, DIT_QUICK if args.quick else DIT_FULL, seed=args.seed,
                                   threads=args.threads, verbose=not args.quiet)
        print(f"saved {Path(args.out) / 'dit'}: {entry['total_weights_mb']:.1f} MB of weights in "
              f"{entry['seconds']:.0f} s ({entry['cpu_seconds']:.0f} CPU s); final loss "
              f"{entry['transformer']['final_loss']:.4f}")
        return 0
    log = train(args.out, QUICK if args.quick else FULL, seed=args.seed, threads=args.threads, verbose=not args.quiet)
    print(f"saved {args.out}: {log['total_weights_mb']:.1f} MB of weights in {log['seconds']:.0f} s; final losses "
          f"clip {log['clip']['final_loss']:.4f}, vae {log['vae']['final_loss']:.5f}, unet {log['unet']['final_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
