"""Files the command reads and writes: prompt files in, whole files out.

Outputs are written whole or not at all (a temporary file in the same folder, then a
rename) and get the permissions any other tool's output gets (``0666`` less the umask).
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from pathlib import Path

PROMPT_COLUMNS = ("prompt", "caption", "text")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _replacing(path: Path, suffix: str):
    """A hidden temporary file beside ``path`` (``(fd, name)``), renamed onto ``path`` when the block succeeds
    and removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem if suffix == path.suffix else path.name}.",
                               suffix=suffix)
    try:
        yield fd, tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` whole or not at all (temporary file in the same folder, then rename)."""
    path = Path(path)
    with _replacing(path, ".tmp") as (fd, _):
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    return path


def image_format(path: str | os.PathLike) -> str:
    """The PIL format an image path's suffix names (PNG without a suffix), or a ValueError listing the known ones."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    if not suffix:
        return "PNG"
    known = {ext: fmt for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if suffix not in known:
        common = [e for e in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif") if e in known]
        raise ValueError(f"{path}: unknown image extension {suffix!r}; use one of {', '.join(common)}")
    return known[suffix]


VIDEO_EXTENSIONS = (".mp4", ".gif")


def video_format(path: str | os.PathLike) -> str:
    """``"mp4"`` or ``"gif"`` from a video path's suffix, or a ValueError listing the valid ones."""
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_EXTENSIONS:
        given = repr(suffix) if suffix else "no extension"
        raise ValueError(f"{path}: unknown video extension {given}; use one of {', '.join(VIDEO_EXTENSIONS)}")
    return suffix[1:]


def check_output_path(path: str | os.PathLike, video: bool = False) -> Path:
    """Fail before any work if ``path`` cannot receive an image (a video with ``video=True``): a folder, an
    unknown extension, no write access."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file name such as {path / ('video.mp4' if video else 'image.png')}")
    video_format(path) if video else image_format(path)
    parent = path.parent if str(path.parent) else Path(".")
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise ValueError(f"{path}: {existing} is a file, not a directory")
    try:  # a real probe: permission bits say nothing for root, read-only mounts or special file systems
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".asyncgen-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{path}: directory {existing} is not writable ({exc.strerror})") from None
    return path


def write_image(path: str | os.PathLike, image) -> Path:
    """Save a PIL image whole or not at all, in the format its suffix names (PNG without one)."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=image_format(path))
    return write_atomic(path, buffer.getvalue())


def write_video(path: str | os.PathLike, frames, fps: int) -> Path:
    """Save video frames (PIL images, or float arrays in [0, 1]) whole or not at all: ``.mp4`` through diffusers'
    ``export_to_video`` (imageio-ffmpeg), ``.gif`` through PIL."""
    import numpy as np
    from PIL import Image

    kind = video_format(path)
    frames = list(frames)
    if kind == "mp4":
        try:
            import imageio  # noqa: F401
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ImportError(f"{path}: writing .mp4 needs imageio and imageio-ffmpeg: pip install 'asyncgen[video]' "
                              "(or write a .gif)") from None
    if frames and isinstance(frames[0], np.ndarray):
        frames = [Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in frames]
    path = Path(path)
    # the writers want a file name with the right suffix: a hidden one beside the target, then a rename
    with _replacing(path, path.suffix) as (fd, tmp):
        os.close(fd)
        if kind == "mp4":
            from diffusers.utils import export_to_video

            export_to_video(frames, tmp, fps=fps)
        else:
            frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)),
                           loop=0, optimize=False)
    return path


def load_prompts(path: str | os.PathLike, column: str | None = None) -> list[str]:
    """The prompts in a ``.txt`` file (one per line; blank lines skipped) or a ``.csv`` file.

    For CSV, ``column`` names the column of prompts; by default the first header among
    ``prompt``, ``caption`` and ``text`` (in any case). Empty cells are skipped.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"prompt file {path} is a directory; give a .txt file (one prompt per line) or a .csv file")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            headers = reader.fieldnames or []
            if column is None:
                lower = {h.strip().lower(): h for h in headers}
                column = next((lower[c] for c in PROMPT_COLUMNS if c in lower), None)
                if column is None:
                    raise ValueError(f"{path} has no column named one of {list(PROMPT_COLUMNS)} "
                                     f"(headers: {headers}); pass column= to choose one")
            elif column not in headers:
                raise ValueError(f"column={column!r} is not a header of {path}; headers: {headers}")
            prompts = [(row.get(column) or "").strip() for row in reader]
    else:
        raise ValueError(f"{path} has suffix {path.suffix!r}; prompt files must be .txt (one prompt per line) or .csv")
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts
