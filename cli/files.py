"""Files the command reads and writes: prompt files in, whole files out, and standard streams that
stay out of the way.

Outputs are written whole or not at all (a temporary file with a short name in the same
folder, then a rename) and get the permissions any other tool's output gets (``0666``
less the umask). What is already at an output path is respected: a symbolic link stays a
link (the file it points to is replaced), and an existing device, FIFO or other special
file is written through, never replaced. ``-`` is standard output, and a path ending in
``/`` names a directory. A write that fails after the work raises
:class:`~asyncgen.cli.errors.OutputError`: one line naming the path and the errno.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import os
import stat
import sys
import tempfile
from pathlib import Path

from .errors import OutputError

PROMPT_COLUMNS = ("prompt", "caption", "text")
STDOUT = "-"  # the output path that means standard output
# the temporary file beside an output is ``.asyncgen-XXXXXXXX<suffix>``: short, so any legal output name works
_TEMP_PREFIX = ".asyncgen-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_stdout(path) -> bool:
    return str(path) == STDOUT


def names_directory(path) -> bool:
    """True for a path written with a trailing slash (``out/``): it names a directory, not a file."""
    text = os.fspath(path) if not isinstance(path, str) else path
    return isinstance(text, str) and text.endswith((os.sep, os.altsep or os.sep)) and text.strip(os.sep) != ""


def _existing_kind(path: Path) -> str | None:
    """What is at ``path``, symbolic links followed: ``"file"``, ``"directory"``, ``"special"`` (a device, FIFO,
    socket: written through), or None (nothing; a dangling link)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None  # a parent is a file: check_output_path says so
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return None  # check_output_path names the part that is too long
        raise
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    return "special"


def _replaced_path(path: Path) -> Path:
    """The path a whole-file write renames onto: the file a symbolic link points to (the link stays a link)."""
    try:
        link = stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:  # nothing there, or a name too long: check_output_path says which
        link = False
    return Path(os.path.realpath(path)) if link else path


def _fail(path, exc: OSError) -> OutputError:
    return exc if isinstance(exc, OutputError) else OutputError(path, exc)


@contextlib.contextmanager
def _replacing(path: Path, suffix: str):
    """A hidden temporary file beside ``path`` (``(fd, name)``), renamed onto ``path`` when the block succeeds
    and removed when it fails. Its name is short, so a legal ``path`` never gives an illegal temporary name."""
    target = _replaced_path(path)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_TEMP_PREFIX, suffix=suffix[-16:])
        yield fd, tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise _fail(path, exc) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _open_special(path: Path) -> int:
    """A write descriptor on an existing device or FIFO. A FIFO without a reader is waited for, saying so once."""
    flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    if stat.S_ISFIFO(os.stat(path).st_mode):
        try:
            fd = os.open(path, flags | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            say(f"asyncgen: waiting for a reader of FIFO {path} (Ctrl-C to stop)")
            return os.open(path, flags)
        os.set_blocking(fd, True)
        return fd
    return os.open(path, flags)


def write_stdout(data: bytes) -> None:
    """``data`` to standard output, whole (a closed pipe raises BrokenPipeError; other failures OutputError)."""
    out = sys.stdout
    while isinstance(out, TolerantStream):
        out = out.stream
    try:
        out.flush()
        if getattr(out, "buffer", None) is not None:
            out.buffer.write(data)
            out.buffer.flush()
        else:
            _write_fd(out.fileno(), data)
    except BrokenPipeError:
        _silence(out)
        raise
    except OSError as exc:
        _silence(out)
        raise _fail("standard output", exc) from exc


def _silence(stream) -> None:
    """Point a standard stream that failed at /dev/null, so that what is still buffered in it cannot fail
    again when the interpreter exits (``Exception ignored ... BrokenPipeError``)."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except OSError:
        pass


class TolerantStream:
    """A standard stream whose failed writes (a closed pipe, a full device) are noted in ``error``, not
    raised: progress bars and messages never decide whether the work succeeds."""

    def __init__(self, stream):
        self.stream = stream
        self.error: BaseException | None = None

    def _guard(self, action, default):
        if self.stream is None:  # started with the stream closed (``2>&-``): Python gives None, nothing to write to
            return default
        if self.error is None:
            try:
                return action()
            except (OSError, ValueError) as exc:  # ValueError: a closed stream
                self.error = exc
                _silence(self.stream)
        return default

    def write(self, text):
        return self._guard(lambda: self.stream.write(text), len(text))

    def flush(self):
        return self._guard(lambda: self.stream.flush(), None)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def say(message: str) -> None:
    """One line to standard error, if it can be written (never an error of its own)."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class StandardStreams:
    """``with StandardStreams() as streams:`` runs a command with :class:`TolerantStream` standard output and
    error (restored afterwards); ``streams.stdout_error`` is what went wrong with standard output, if anything."""

    def __enter__(self):
        self.saved = sys.stdout, sys.stderr
        self.out = sys.stdout if isinstance(sys.stdout, TolerantStream) else TolerantStream(sys.stdout)
        self.err = sys.stderr if isinstance(sys.stderr, TolerantStream) else TolerantStream(sys.stderr)
        sys.stdout, sys.stderr = self.out, self.err
        return self

    def __exit__(self, *exc) -> None:
        self.out.flush()
        self.err.flush()
        sys.stdout, sys.stderr = self.saved

    @property
    def stdout_error(self) -> BaseException | None:
        self.out.flush()
        return self.out.error


@contextlib.contextmanager
def file_size_limit_lifted():
    """The soft file-size limit (``ulimit -f``) raised to the hard one while the libraries load, then put back.

    For importing libraries only, never around an output: torch 2.6 writes a generated module (3.4 kB, in a
    temporary directory of its own) the first time ``torch._dynamo`` is imported, which diffusers does, and under
    a smaller limit that import ends in a bare ``OSError: [Errno 27] File too large``. The limit is there for
    the files the command writes, and it is back before any of them is written (a hard limit stays as it is)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    except (ImportError, OSError, ValueError):  # no resource limits here
        soft = hard = None
    if soft == hard:
        yield
        return
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` whole or not at all (temporary file in the same folder, then rename).

    ``-`` writes to standard output; an existing device or FIFO (or a link to one) is written through; a
    symbolic link to a file keeps the link and replaces the file. Failures raise OutputError (one line)."""
    data = data.encode() if isinstance(data, str) else data
    if is_stdout(path):
        write_stdout(data)
        return Path(STDOUT)
    path = Path(path)
    if _existing_kind(path) == "special":
        try:
            fd = _open_special(path)
            try:
                _write_fd(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _fail(path, exc) from exc
        return path
    with _replacing(path, ".tmp") as (fd, _):
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def write_all(files: dict) -> list[Path]:
    """Several outputs (``{path: bytes or str}``) whole or not at all, together: every temporary file is written
    before any is renamed, so a full disk or a file-size limit leaves none of them half-written or changed."""
    special = [p for p in files if is_stdout(p) or _existing_kind(Path(p)) == "special"]
    pending = []  # (path, tmp, target)
    try:
        for path, data in files.items():
            if path in special:
                continue
            path = Path(path)
            target = _replaced_path(path)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_TEMP_PREFIX, suffix=".tmp")
                pending.append((path, tmp, target))
                with os.fdopen(fd, "wb") as f:
                    f.write(data.encode() if isinstance(data, str) else data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o666 & ~_umask())
            except OSError as exc:
                raise _fail(path, exc) from exc
        for path, _, target in pending:  # what a rename could still refuse, before the first rename
            if target.is_dir():
                raise OutputError(path, OSError(errno.EISDIR, os.strerror(errno.EISDIR)))
        for path, tmp, target in pending:
            try:
                os.replace(tmp, target)
            except OSError as exc:
                raise _fail(path, exc) from exc
        pending = []
    finally:
        for _, tmp, _ in pending:
            if os.path.exists(tmp):
                os.unlink(tmp)
    for path in special:
        write_atomic(path, files[path])
    return [Path(p) for p in files]


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


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _probe(directory: Path, cache: dict | None = None) -> None:
    """Create, write and remove a small file in ``directory``: permission bits say nothing for root, read-only
    mounts or special file systems, and a full disk shows only when something is written."""
    if cache is not None and directory in cache:
        if cache[directory] is not None:
            raise cache[directory]
        return
    error = None
    probe = None
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=_TEMP_PREFIX)
        try:
            _write_fd(fd, b"\0" * 512)
        finally:
            os.close(fd)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
        reason = f"({exc.strerror or exc}" + (f", {code})" if code else ")")
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        error = ValueError(f"directory {directory} {'has no room for a file' if full else 'is not writable'} {reason}")
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                os.unlink(probe)
    if cache is not None:
        cache[directory] = error
    if error is not None:
        raise error


def is_standard_output(path) -> bool:
    """True for ``-`` and for a path that leads to this process's standard output (``/dev/stdout``, a link to
    ``/proc/self/fd/1``, the FIFO or file it is redirected to): what else the command prints must go elsewhere."""
    if is_stdout(path):
        return True
    try:
        target, out = os.stat(path), os.fstat(1)
    except OSError:
        return False
    return (target.st_dev, target.st_ino) == (out.st_dev, out.st_ino)


def _is_terminal(path: Path) -> bool:
    """A terminal device (``/dev/stdout`` on a terminal, ``/dev/pts/N``, ``/dev/tty``), found without opening it:
    one of this process's own terminals, or a Linux terminal major number (4, 5, 136-143)."""
    mode = os.stat(path)
    if not stat.S_ISCHR(mode.st_mode):
        return False
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.fstat(fd).st_rdev == mode.st_rdev:
                return True
        except OSError:
            pass
    return sys.platform.startswith("linux") and os.major(mode.st_rdev) in (4, 5, *range(136, 144))


def check_output_path(path: str | os.PathLike, video: bool = False, kind: str | None = None,
                      _probed: dict | None = None) -> Path:
    """Fail before any work if ``path`` cannot receive an image (a video with ``video=True``; any file with
    ``kind="file"``): a folder, an unknown extension, a name too long, a parent that is a file, no write access,
    a full disk. ``-`` (standard output) must not be a terminal; an existing device or FIFO is written through.
    ``_probed`` shares the directory probes between the paths of one command."""
    if is_stdout(path):
        if video:
            raise ValueError("-: a video needs a file name (.mp4 or .gif), not standard output")
        if kind is None:
            out = sys.stdout
            while isinstance(out, TolerantStream):
                out = out.stream
            try:
                terminal = out is not None and os.isatty(out.fileno())
            except (OSError, ValueError, AttributeError):
                terminal = False
            if terminal:
                raise ValueError("-: standard output is a terminal; send the image to a file or a pipe "
                                 "(asyncgen generate ... -o - > image.png)")
        return Path(STDOUT)
    if names_directory(path):
        raise ValueError(f"{path} names a directory (trailing /); give a file name such as "
                         f"{Path(path) / ('video.mp4' if video else 'image.png')}")
    path = Path(path)
    try:
        found = _existing_kind(path)
    except OSError as exc:  # a loop of symbolic links, a parent without search permission
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    if found == "directory":
        raise ValueError(f"{path} is a directory; give a file name such as {path / ('video.mp4' if video else 'image.png')}")
    if kind is None:
        video_format(path) if video else image_format(path)
    if found == "special":
        if stat.S_ISSOCK(os.stat(path).st_mode):
            raise ValueError(f"{path} is a socket; give a file, a device or a FIFO")
        if not os.access(path, os.W_OK):
            raise ValueError(f"{path} exists and is not writable")
        if _is_terminal(path) and kind is None:
            raise ValueError(f"{path} is a terminal; send the image to a file or a pipe")
        return path  # written through, never replaced
    target = _replaced_path(path)
    parent = target.parent if str(target.parent) else Path(".")
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise ValueError(f"{path}: {existing} is a file, not a directory")
    limit = _name_max(existing)
    for part in target.parts:
        if len(os.fsencode(part)) > limit:
            raise ValueError(f"{path}: the name {part[:24]}... is {len(os.fsencode(part))} bytes long; this file "
                             f"system allows at most {limit}")
    try:
        _probe(existing, _probed)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return path


def check_output_paths(paths, video: bool = False, kind: str | None = None) -> list[Path]:
    """:func:`check_output_path` on every path a command will write (one probe per directory), and no two
    the same."""
    probed, seen, checked = {}, {}, []
    for path in paths:
        checked.append(check_output_path(path, video=video, kind=kind, _probed=probed))
        key = STDOUT if is_stdout(path) else os.path.realpath(path)
        if key in seen and not (key == STDOUT or _existing_kind(Path(path)) == "special"):
            raise ValueError(f"{path} and {seen[key]} are the same file")
        seen.setdefault(key, path)
    return checked


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

    def save(tmp):
        if kind == "mp4":
            from diffusers.utils import export_to_video

            export_to_video(frames, tmp, fps=fps)
        else:
            frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)),
                           loop=0, optimize=False)

    if _existing_kind(path) == "special":  # a FIFO or device: encoded in a scratch folder, then written through
        with tempfile.TemporaryDirectory(prefix=_TEMP_PREFIX) as scratch:
            tmp = os.path.join(scratch, f"video.{kind}")
            save(tmp)
            return write_atomic(path, Path(tmp).read_bytes())
    # the writers want a file name with the right suffix: a hidden one beside the target, then a rename
    with _replacing(path, path.suffix) as (fd, tmp):
        os.close(fd)
        save(tmp)
    return path


def load_prompts(path: str | os.PathLike, column: str | None = None) -> list[str]:
    """The prompts in a ``.txt`` file (one per line; blank lines skipped) or a ``.csv`` file, UTF-8 (a leading
    byte-order mark is dropped). ``-``, a FIFO or a device (``/dev/stdin``) is read as a ``.txt`` file.

    For CSV, ``column`` names the column of prompts; by default the first header among
    ``prompt``, ``caption`` and ``text`` (in any case). Empty cells are skipped.
    """
    if is_stdout(path):  # ``--prompts -``: standard input
        text, suffix, path = sys.stdin.buffer.read(), ".txt", Path("(standard input)")
    else:
        path = Path(path)
        found = _existing_kind(path)
        if found == "directory":
            raise ValueError(f"prompt file {path} is a directory; give a .txt file (one prompt per line) or a .csv file")
        if found is None:
            raise FileNotFoundError(f"prompt file {path} does not exist")
        suffix = path.suffix.lower()
        if found == "special" and suffix != ".csv":
            suffix = ".txt"
        if suffix not in (".txt", ".csv"):
            raise ValueError(f"{path} has suffix {path.suffix!r}; prompt files must be .txt (one prompt per line) "
                             "or .csv")
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"prompt file {path} cannot be read ({exc.strerror or exc})") from None
    try:
        text = text.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not part of a prompt
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompt file {path} is not UTF-8 text (byte 0x{text[exc.start]:02x} at offset "
                         f"{exc.start}); save it as UTF-8") from None
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines()]
    else:
        import io

        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            headers = reader.fieldnames or []
            if column is None:
                lower = {h.strip().lower(): h for h in headers}
                column = next((lower[c] for c in PROMPT_COLUMNS if c in lower), None)
                if column is None:
                    raise ValueError(f"{path} has no column named {', '.join(PROMPT_COLUMNS[:-1])} or "
                                     f"{PROMPT_COLUMNS[-1]} (headers: {', '.join(headers) or 'none'}); name the column "
                                     "of prompts 'prompt'")
            elif column not in headers:
                raise ValueError(f"column={column!r} is not a header of {path}; headers: {headers}")
            prompts = [(row.get(column) or "").strip() for row in reader]
        except csv.Error as exc:
            raise ValueError(f"{path} is not a readable CSV file (line {reader.line_num}: {exc})") from None
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts
