"""How well the built-in miniature model follows its prompts.

``evaluate_quality`` generates one picture per shapes caption and grades it with the
pixel checker (``pixel_checker.py``, no neural network): is the shape's colour, the
background colour, the shape (and its size) what the prompt asked for? The model
itself lives on the product path, in ``asyncgen.pipelines.miniature``.

    python -m asyncgen.evaluation.miniature_quality --out eval_results
    python -m asyncgen.evaluation.miniature_quality --model miniature-dit --out eval_results/dit
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from asyncgen.cli.files import load_prompts
from asyncgen.pipelines.miniature import (DEFAULT_GUIDANCE, DEFAULT_STEPS, builtin_model_names, load_miniature,
                                          resolve_model)

from . import pixel_checker, prompts as prompt_sets, reporting

# fraction of generated pictures in which the checker must find what was asked for
QUALITY_BAR = {"colour": 0.85, "background": 0.85, "shape": 0.70}


def generate(pipe, prompts: Sequence[str], seed: int = 0, num_inference_steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 32) -> list[np.ndarray]:
    """One ``(H, W, 3)`` uint8 picture per prompt; prompt ``i`` uses a generator seeded ``seed + i``,
    so a picture does not depend on the batch it was made in."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    images: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        out = pipe(batch, generator=generators, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, output_type="np")
        images += [np.rint(np.clip(im, 0, 1) * 255).astype(np.uint8) for im in out.images]
    return images


@dataclass
class QualityResult:
    """Per-prompt grades (``rows``), the summary, and the generated pictures."""

    rows: list[dict]
    summary: dict
    images: list[np.ndarray] = field(repr=False, default_factory=list)


def evaluate_quality(pipe=None, prompts: Sequence[str] | None = None, seed: int = 0,
                     num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                     batch_size: int = 32, clip_scorer=None) -> QualityResult:
    """Generate one picture per shapes caption and grade it with the pixel checker.

    ``pipe``: any pipeline taking the stock call arguments (default: the shipped
    miniature); ``prompts``: shapes captions (default: all 180 combinations);
    ``clip_scorer``: a ``ClipScorer`` to add CLIP scores (``None``: none).
    """
    pipe = pipe if pipe is not None else load_miniature()
    prompts = list(prompts) if prompts is not None else prompt_sets.miniature_prompts()
    if not prompts:
        raise ValueError("no prompts to evaluate")
    start = time.perf_counter()
    images = generate(pipe, prompts, seed, num_inference_steps, guidance_scale, batch_size)
    seconds = time.perf_counter() - start
    rows = []
    for prompt, image in zip(prompts, images):
        grade = pixel_checker.grade(image, prompt)
        found = grade["detected"]
        rows.append({"prompt": prompt, **{k: grade[k] for k in ("colour", "background", "shape", "size")},
                     "found": f"{found['size']} {found['colour']} {found['shape']} on {found['background']}"})
    keys = ("colour", "background", "shape", "size")
    summary = {f"{k}_accuracy": sum(r[k] for r in rows) / len(rows) for k in keys}
    summary["all_accuracy"] = sum(all(r[k] for k in keys) for r in rows) / len(rows)
    summary["meets_quality_bar"] = all(summary[f"{k}_accuracy"] >= bar for k, bar in QUALITY_BAR.items())
    summary.update(prompts=len(prompts), seed=seed, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, generation_seconds=seconds,
                   pipeline=type(pipe).__name__, model=str(getattr(pipe, "name_or_path", "") or ""))
    if clip_scorer is not None:
        scores = clip_scorer.scores(images, prompts)
        for row, value in zip(rows, scores):
            row["clip_score"] = float(value)
        summary.update(clip_score=float(np.mean(scores)), clip_model=clip_scorer.name)
    return QualityResult(rows, summary, images)


def write_report(out_dir: str | os.PathLike, name: str, summary: dict, rows: Sequence[dict],
                 columns: Sequence[str], formats: dict[str, str] | None = None) -> tuple[Path, Path]:
    """Write ``name.json`` (summary and rows) and ``name.md`` (a summary table, then a row table), atomically."""
    out_dir = Path(out_dir)
    json_path = reporting.write_json(out_dir / f"{name}.json", {"summary": summary, "rows": list(rows)})
    # bools shown as words: the number format would print True as 1
    summary_rows = [{"metric": k, "value": str(v) if isinstance(v, bool) else v} for k, v in summary.items()]
    text = (f"# {name}\n\n" + reporting.markdown_table(summary_rows, ["metric", "value"], {"value": ".4g"})
            + "\n\n" + reporting.markdown_table(rows, list(columns), formats) + "\n")
    md_path = reporting.write_atomic(out_dir / f"{name}.md", text)
    return json_path, md_path


def save_grid(images: Sequence[np.ndarray], path: str | os.PathLike, columns: int = 15, scale: int = 2) -> Path:
    """The pictures tiled row by row into one PNG (each enlarged ``scale`` times), written atomically."""
    from PIL import Image

    if not images:
        raise ValueError("no images to tile")
    h, w, _ = images[0].shape
    rows = -(-len(images) // columns)
    grid = np.full((rows * (h + 1), columns * (w + 1), 3), 128, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = image
    picture = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    return reporting.write_image(path, picture)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m asyncgen.evaluation.miniature_quality",
        description="Generate one picture per shapes caption with a shapes model's stock pipeline and grade it "
                    "with the pixel checker; writes quality.json, quality.md and quality.png.",
    )
    parser.add_argument("--model", default=None,
                        help=f"a built-in shapes model ({builtin_model_names()}) or the diffusers folder of another "
                             "one, e.g. from train_miniature (default: miniature)")
    parser.add_argument("--prompts", default=None,
                        help="a .txt or .csv file of shapes captions (default: all 180 combinations)")
    parser.add_argument("--out", default="eval_results", help="output folder (default eval_results)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (default 0)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE})")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per pipeline call (default 32)")
    parser.add_argument("--no-clip-score", action="store_true", help="skip CLIP scores with the miniature CLIP")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)

    if args.model is None:
        pipe = load_miniature(args.device)
    else:
        from asyncgen.pipelines.loading import load_pipeline, looks_like_local_path

        model, builtin = resolve_model(args.model)
        if not builtin and not looks_like_local_path(model):
            parser.error(f"--model {model}: not a built-in model ({builtin_model_names()}) nor an existing folder")
        pipe = load_pipeline(model).to(args.device)  # the class model_index.json names (SD or SD3)
        pipe.set_progress_bar_config(disable=True)
    prompts = load_prompts(args.prompts) if args.prompts else None
    scorer = None
    if not args.no_clip_score:
        from .clip_score import ClipScorer

        scorer = ClipScorer.miniature(device=args.device)
    result = evaluate_quality(pipe, prompts, args.seed, args.steps, args.guidance, args.batch_size, scorer)
    columns = ["prompt", "colour", "background", "shape", "size", "found"] + (["clip_score"] if scorer else [])
    json_path, md_path = write_report(args.out, "quality", result.summary, result.rows, columns, {"clip_score": ".2f"})
    save_grid(result.images, Path(args.out) / "quality.png")
    s = result.summary
    print(f"{s['prompts']} prompts: colour {s['colour_accuracy']:.1%}, background {s['background_accuracy']:.1%}, "
          f"shape {s['shape_accuracy']:.1%}, size {s['size_accuracy']:.1%}; quality bar "
          f"{'met' if s['meets_quality_bar'] else 'NOT met'} ({json_path}, {md_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
