"""Grade a folder of generated images: CLIP score against their prompts, fidelity to a reference folder.

Images pair with prompts in file-name order (``asyncgen generate --prompts`` numbers
its outputs ``out-0000.png``, ``out-0001.png``, ... in prompt order). A reference image
pairs with the image of the same file name.

    asyncgen eval images/ --prompts prompts.txt
    asyncgen eval images/ --prompts prompts.txt --reference stock_images/ --clip openai/clip-vit-base-patch32
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

# the command's line in ``asyncgen --help``
SUMMARY = "CLIP score of a folder of images against a prompt file, and fidelity to a reference folder"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def clip_scorer(spec: str, device: str = "cpu"):
    """``miniature``, ``open_clip:ARCH:PRETRAINED`` (tag or local file) or a transformers CLIP hub id / folder."""
    from .clip_score import ClipScorer

    if spec == "miniature":
        return ClipScorer.miniature(device=device)
    if spec.startswith("open_clip:"):
        parts = spec.split(":", 2)
        if len(parts) != 3:
            raise ValueError(f"--clip {spec}: write open_clip:ARCHITECTURE:PRETRAINED, e.g. open_clip:ViT-B-32:laion2b_s34b_b79k")
        return ClipScorer.from_open_clip(parts[1], parts[2], device=device)
    return ClipScorer.from_transformers(spec, device=device)


def evaluate_folder(images: str | Path, prompts: list[str], scorer=None, reference: str | Path | None = None) -> dict:
    """Per-image CLIP scores (when ``scorer``) and fidelity to same-named reference images; means in ``summary``."""
    from .fidelity import fidelity

    files = image_files(images)
    if len(files) != len(prompts):
        raise ValueError(f"{images} holds {len(files)} images but the prompt file has {len(prompts)} prompts; "
                         "they pair one to one in file-name order")
    arrays = [read_image(f) for f in files]
    rows = [{"image": f.name, "prompt": p} for f, p in zip(files, prompts)]
    if scorer is not None:
        for row, score in zip(rows, scorer.scores(arrays, prompts)):
            row["clip_score"] = float(score)
    if reference is not None:
        reference = Path(reference)
        missing = [f.name for f in files if not (reference / f.name).is_file()]
        if missing:
            raise ValueError(f"reference folder {reference} lacks {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                             "(reference images pair with images of the same file name)")
        for row, f, array in zip(rows, files, arrays):
            expected = read_image(reference / f.name)
            if expected.shape != array.shape:
                raise ValueError(f"{f.name}: {array.shape[1]}x{array.shape[0]} against a "
                                 f"{expected.shape[1]}x{expected.shape[0]} reference")
            result = fidelity(array, expected)
            row.update(psnr_db=result["psnr"], ssim=result["ssim"], lpips=result["lpips"])
    summary = {"images": len(rows)}
    for key in ("clip_score", "psnr_db", "ssim", "lpips"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            # identical images have infinite PSNR, which would make a mean infinite; the median is robust to it
            summary[key] = statistics.median(values) if key == "psnr_db" else statistics.fmean(values)
    return {"summary": summary, "rows": rows}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", help="folder of images, paired with the prompts in file-name order")
    parser.add_argument("--prompts", required=True, metavar="FILE",
                        help="the prompts, one per line (.txt) or a 'prompt' column (.csv)")
    parser.add_argument("--reference", default=None, metavar="DIR", help="folder of reference images with the same "
                        "file names (e.g. the stock pipeline's): adds PSNR, SSIM and LPIPS (when its weights are local)")
    parser.add_argument("--clip", default="miniature", help="CLIP for the score: 'miniature' (built in), a "
                        "transformers CLIP hub id or folder, or open_clip:ARCH:PRETRAINED; 'none' skips it "
                        "(default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="device for the CLIP model (default: %(default)s)")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the results as JSON here, and a "
                        "Markdown table next to it (.md): r.json or r.md gives r.json and r.md; a folder (existing, or "
                        "ending in /) gets results.json and results.md. Checked before any scoring")


def output_files(out: str) -> tuple[Path, Path]:
    """The JSON and Markdown files ``--out`` names. ``r.md`` and ``r.json`` both give ``r.json`` and ``r.md`` (the
    table never overwrites the JSON); a folder (one that exists, or a name ending in /) holds ``results.json``
    and ``results.md``; any other name is the JSON, with the table beside it (``.md``)."""
    from asyncgen.cli.files import names_directory

    path = Path(out)
    if names_directory(out) or path.is_dir():
        return path / "results.json", path / "results.md"
    if path.suffix.lower() == ".md":
        return path.with_suffix(".json"), path
    return path, path.with_suffix(".md")


def run(args: argparse.Namespace) -> int:
    from asyncgen.cli.errors import UsageError

    from asyncgen.cli.files import check_output_paths, is_stdout, load_prompts, write_all
    from .reporting import json_text, markdown_table

    if args.out is not None:  # before any scoring: an unwritable --out must not cost the run
        if is_stdout(args.out):
            raise UsageError("--out -: give a file or folder name (the table is printed on standard output anyway)")
        json_path, md_path = output_files(args.out)
        try:
            check_output_paths([json_path, md_path], kind="file")
        except ValueError as exc:
            raise UsageError(f"--out {exc}") from None
    try:
        prompts = load_prompts(args.prompts)
        scorer = None if args.clip == "none" else clip_scorer(args.clip, args.device)
        results = evaluate_folder(args.images, prompts, scorer, args.reference)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    columns = ["image", "prompt"] + [c for c in ("clip_score", "psnr_db", "ssim", "lpips") if c in results["summary"]]
    formats = {"clip_score": ".2f", "psnr_db": ".2f", "ssim": ".4f", "lpips": ".4f"}
    table = markdown_table(results["rows"], columns, formats)
    print(table)
    print("\n" + ", ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in results["summary"].items()))
    if args.out:
        results.update(images_folder=str(args.images), prompts_file=str(args.prompts), clip=args.clip,
                       reference=args.reference)
        write_all({json_path: json_text(results), md_path: table + "\n"})  # both whole, or neither
        print(f"results written to {json_path} and {md_path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncgen.evaluation.evaluate_folder", description=__doc__.split("\n")[0])
    add_arguments(parser)
    from asyncgen.cli.errors import run_module_command

    return run_module_command(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
