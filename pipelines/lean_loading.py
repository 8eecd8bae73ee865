"""Loading only part of a model: the tensors of given modules, straight to a device and dtype.

A component is built from its config on the meta device (no memory), and then only the
tensors of the modules a rank runs are read from its checkpoint files; every other
parameter stays on ``meta``. Single-file and sharded (``*.safetensors.index.json``)
checkpoints, variants (``fp16``) and subfolders work as in ``from_pretrained``, and so
does dtype handling (modules a model keeps in float32 stay float32).

Tensors are read with plain file reads at the offsets the safetensors header gives
(the header is checked by ``safetensors.safe_open`` first), one tensor at a time, into
memory this process owns. Reading through safetensors' memory map instead maps the
file into the process: every page a tensor touches counts in its resident memory until
the whole mapping goes, so converting a float32 checkpoint to bfloat16 peaks at the
float32 bytes plus the bfloat16 ones. Here the peak is the kept tensors plus one
tensor being read.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from diffusers.utils import logging
from torch import nn

from asyncgen._compat import (
    from_deprecated_attention_block,
    keep_in_fp32_modules,
    keep_in_fp32_modules_strict,
    non_persistent_buffer_names,
    own_tensors,
    replace_tensor,
)
from asyncgen.models import DENOISER_COMPONENTS, EXPERT_COMPONENTS, PLACEABLE_COMPONENTS, SAFETENSORS_DTYPES

from .from_configs import empty_model
from .loading import PickleRefused, check_pipeline_location, load_pipeline

logger = logging.get_logger(f"diffusers.{__name__}")

# diffusers models save "diffusion_pytorch_model.*", transformers models "model.*" ("pytorch_model.bin" for pickle)
SAFETENSORS_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")

# diffusers renamed the attention layers of old VAE checkpoints (query -> to_q, ...); it renames them on load
_DEPRECATED_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


class MissingTensorError(KeyError):
    """A checkpoint lacks a tensor that the modules being loaded need."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class CorruptCheckpointError(OSError):
    """A checkpoint file cannot be read as safetensors."""


@dataclass
class ReadReport:
    """What :func:`load_component_partially` read: checkpoint keys and their bytes, and from which files."""

    folder: Path
    tensors: dict[str, int] = field(default_factory=dict)  # checkpoint key -> bytes read from the file
    files: list[Path] = field(default_factory=list)
    pickle: bool = False  # read from a pickle checkpoint (allow_pickle=True)

    @property
    def bytes_read(self) -> int:
        return sum(self.tensors.values())


# ----------------------------------------------------------------------------- files


def _add_variant(name: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.safetensors`` -> ``diffusion_pytorch_model.fp16.safetensors`` (diffusers' rule)."""
    if variant is None:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant] + parts[-1:])


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


class TensorFile:
    """One safetensors file: the header (checked by ``safe_open``) and reads of single tensors."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="pt") as checked:
                keys = set(checked.keys())
            with open(self.path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
        except Exception as exc:  # SafetensorError, a truncated header, bad JSON
            raise CorruptCheckpointError(f"{self.path}: not a readable safetensors file ({exc})") from exc
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.entries = {key: header[key] for key in keys}

    def keys(self) -> set[str]:
        return set(self.entries)

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """The stored dtype and shape of ``key``, from the header."""
        entry = self.entries[key]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CorruptCheckpointError(f"{self.path}: tensor {key} has dtype {entry['dtype']}, which this torch "
                                         f"cannot hold")
        return SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])

    def read(self, key: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``key`` on the CPU in its stored dtype: in memory of its own, or a view of ``scratch``
        (a flat uint8 tensor at least that large) when given."""
        dtype, shape = self.info(key)
        nbytes = _nbytes(dtype, shape)
        begin, end = self.entries[key]["data_offsets"]
        if end - begin != nbytes:
            raise CorruptCheckpointError(f"{self.path}: tensor {key} has {end - begin} bytes for shape "
                                         f"{list(shape)} {self.entries[key]['dtype']}")
        raw = torch.empty(nbytes, dtype=torch.uint8) if scratch is None else scratch[:nbytes]
        if nbytes:
            with open(self.path, "rb") as handle:
                handle.seek(self.data_start + begin)
                got = handle.readinto(memoryview(raw.numpy()))
            if got != nbytes:
                raise CorruptCheckpointError(f"{self.path}: file ends inside tensor {key} (read {got} of "
                                             f"{nbytes} bytes)")
        return raw.view(dtype).view(shape)


class _PickleFile:
    """A pickle checkpoint (``allow_pickle=True`` only), memory-mapped where torch's format allows."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be mapped
            self.state = torch.load(self.path, map_location="cpu", weights_only=True)

    def keys(self) -> set[str]:
        return set(self.state)

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.state[key].dtype, tuple(self.state[key].shape)

    def read(self, key: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        return self.state[key]


def _find_checkpoint(where: Path, name: str, variant: str | None) -> dict | None:
    """``{key: file}`` from a sharded index, ``{None: file}`` for a single file, None when neither exists."""
    index = where / _add_variant(f"{name}.index.json", variant)
    if index.is_file():
        try:
            return {key: where / file for key, file in json.loads(index.read_text())["weight_map"].items()}
        except (ValueError, KeyError, AttributeError) as exc:
            raise CorruptCheckpointError(f"{index}: not a checkpoint index ({exc})") from exc
    single = where / _add_variant(name, variant)
    return {None: single} if single.is_file() else None


def checkpoint_files(folder: str | Path, subfolder: str = "", variant: str | None = None,
                     allow_pickle: bool = False) -> tuple[dict[str, Path], bool]:
    """Where each tensor of a component's checkpoint lives: ``({key: file}, is_pickle)``.

    Looks for, in order: a sharded safetensors index, a single safetensors file, and with
    ``allow_pickle`` their pickle (``.bin``) counterparts, named as diffusers and
    transformers save them (with ``variant`` inserted as they insert it).
    """
    where = Path(folder) / subfolder
    for name in SAFETENSORS_NAMES:
        files = _find_checkpoint(where, name, variant)
        if files is not None:
            return files, False
    pickles = [files for name in PICKLE_NAMES if (files := _find_checkpoint(where, name, variant)) is not None]
    if pickles:
        if not allow_pickle:
            raise PickleRefused(f"{where}: only pickle (.bin) weights were found, which can run code when loaded. "
                                "Pass allow_pickle=True (--allow-pickle) if you trust its source")
        return pickles[0], True
    present = sorted(p.name for p in where.iterdir()) if where.is_dir() else []
    wanted = ", ".join(_add_variant(n, variant) for n in SAFETENSORS_NAMES)
    raise FileNotFoundError(f"{where}: no checkpoint ({wanted}, or a sharded .index.json of them"
                            f"{f' for variant {variant!r}' if variant else ''}); the folder holds: "
                            f"{', '.join(present) or 'nothing'}")


# ---------------------------------------------------------------------------- models


def _model_class(class_name: str):
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        cls = getattr(library, class_name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    raise ValueError(f"{class_name} is neither a diffusers nor a transformers model class (diffusers "
                     f"{diffusers.__version__}, transformers {transformers.__version__})")


def empty_component(folder: str | Path, subfolder: str, class_name: str, dtype: torch.dtype | None = None) -> nn.Module:
    """The component ``class_name`` built from its config in ``folder/subfolder``, parameters on ``meta``.

    Non-persistent buffers (CLIP's ``position_ids``, rotary tables) are real: they are
    computed at construction and appear in no checkpoint. ``dtype`` is the dtype the
    model is created in, as ``from_pretrained(..., dtype=dtype)`` creates it
    (:func:`~asyncgen.pipelines.from_configs.empty_model` builds it).
    """
    return empty_model(folder, subfolder, _model_class(class_name), dtype)


def _fp32_module_names(model: nn.Module, dtype: torch.dtype | None) -> set[str]:
    """Module names whose weights ``from_pretrained`` keeps in float32 when loading in ``dtype``."""
    from diffusers import ModelMixin

    if dtype is None:
        return set()
    if isinstance(model, ModelMixin):
        return set(keep_in_fp32_modules(model))
    names = set()
    if dtype == torch.float16:  # transformers: the plain list guards fp16 only, the strict one bf16 too
        names |= set(keep_in_fp32_modules(model))
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(keep_in_fp32_modules_strict(model))
    return names


@dataclass
class _Slot:
    """One tensor of the model: every (module, attribute) holding it and every name it has (tied weights)."""

    tensor: torch.Tensor
    is_parameter: bool
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def _slots(model: nn.Module, keep: Iterable[nn.Module] | None) -> list[_Slot]:
    """The persistent tensors of ``keep``'s modules (all of ``model``'s for ``None``), ties merged."""
    kept = None
    if keep is not None:
        kept = {id(t) for module in keep for t in [*module.parameters(), *module.buffers()]}
    slots: dict[int, _Slot] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        transient = non_persistent_buffer_names(module)
        local = [(n, t, p) for n, t, p in own_tensors(module) if p or n not in transient]
        for name, tensor, is_parameter in local:
            if kept is not None and id(tensor) not in kept:
                continue
            slot = slots.setdefault(id(tensor), _Slot(tensor, is_parameter))
            if all(owner is not module or attr != name for owner, attr in slot.owners):
                slot.owners.append((module, name))
            full = f"{prefix}.{name}" if prefix else name
            if full not in slot.names:
                slot.names.append(full)
    return list(slots.values())


def _deprecated_names(model: nn.Module, name: str) -> list[str]:
    """Old checkpoint names of ``name`` in attention blocks diffusers renames on load."""
    for new, old in _DEPRECATED_ATTENTION_NAMES.items():
        marker = f".{new}."
        if marker in name:
            path = name.split(marker)[0]
            try:
                block = model.get_submodule(path)
            except AttributeError:
                return []
            if from_deprecated_attention_block(block):
                return [name.replace(marker, f".{old}.")]
    return []


def load_component_partially(model_on_meta: nn.Module, folder: str | Path, subfolder: str,
                             keep: Iterable[nn.Module] | None, *, device: str | torch.device | None = None,
                             dtype: torch.dtype | None = None, variant: str | None = None,
                             allow_pickle: bool = False) -> ReadReport:
    """Read from ``folder/subfolder``'s checkpoint only the tensors of ``keep`` (``None``: all) into ``model_on_meta``.

    Each tensor goes to ``device`` (default CPU) in ``dtype`` (default: the dtype the model
    was built in; modules the model keeps in float32 stay float32), replacing the meta
    tensor in place, so tied weights stay tied; everything else stays on ``meta``. Raises
    :class:`MissingTensorError` naming a needed tensor the checkpoint lacks,
    :class:`CorruptCheckpointError` naming an unreadable file, and ``PickleRefused``
    for a pickle-only checkpoint without ``allow_pickle``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    where = Path(folder) / subfolder
    key_files, pickled = checkpoint_files(folder, subfolder, variant, allow_pickle)
    opener: Callable[[Path], TensorFile | _PickleFile] = _PickleFile if pickled else TensorFile
    opened: dict[Path, TensorFile | _PickleFile] = {}

    def open_file(path: Path):
        if path not in opened:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the checkpoint index of {where} names this file, which is missing")
            opened[path] = opener(path)
        return opened[path]

    if None in key_files:  # a single file: its own keys
        single = open_file(key_files.pop(None))
        key_files = {key: single.path for key in single.keys()}
    report = ReadReport(folder=where, pickle=pickled)
    fp32_modules = _fp32_module_names(model_on_meta, dtype)
    plan = []  # every needed tensor found (or the error raised) before anything is read
    for slot in _slots(model_on_meta, keep):
        candidates = slot.names + [old for n in slot.names for old in _deprecated_names(model_on_meta, n)]
        key = next((k for k in candidates if k in key_files), None)
        if key is None:
            raise MissingTensorError(f"{where}: the checkpoint has no tensor {slot.names[0]}"
                                     f"{' (nor ' + ', '.join(candidates[1:]) + ')' if len(candidates) > 1 else ''}, "
                                     f"which the modules being loaded need")
        source = open_file(key_files[key])
        stored_dtype, shape = source.info(key)
        if shape != tuple(slot.tensor.shape):
            raise MissingTensorError(f"{source.path}: tensor {key} has shape {shape}, the model expects "
                                     f"{tuple(slot.tensor.shape)}")
        # diffusers' rule (load_model_dict_into_meta): a given dtype converts floating tensors, except
        # modules kept in float32; without one every tensor takes the dtype the model was built in
        target = slot.tensor.dtype
        if dtype is not None:
            target = stored_dtype
            if stored_dtype.is_floating_point:
                keep32 = any(m in name.split(".") for name in slot.names for m in fp32_modules)
                target = torch.float32 if keep32 else dtype
        plan.append((slot, key, source, target, target != stored_dtype or device.type != "cpu"))
    # a tensor converted or sent elsewhere is read into one reused buffer: fresh buffers freed one by one
    # would stay in the allocator's heap, between the kept tensors, as resident memory
    scratch_bytes = max((_nbytes(*source.info(key)) for _, key, source, _, staged in plan if staged and not pickled),
                        default=0)
    scratch = torch.empty(scratch_bytes, dtype=torch.uint8) if scratch_bytes else None
    for slot, key, source, target, staged in plan:
        stored = source.read(key, scratch if staged else None)
        if staged:
            value = torch.empty(stored.shape, dtype=target, device=device)
            value.copy_(stored)
        else:
            value = stored
        if slot.is_parameter:
            value = nn.Parameter(value, requires_grad=slot.tensor.requires_grad)
        for module, attr in slot.owners:
            replace_tensor(module, attr, value)
        report.tensors[key] = stored.numel() * stored.element_size()
        del stored, value
    del scratch
    report.files = sorted(opened)
    return report


# ---------------------------------------------------------------------------- pipelines

_DOWNLOAD_ARGUMENTS = ("cache_dir", "revision", "variant", "use_safetensors", "local_files_only", "token",
                       "proxies", "force_download")


def local_pipeline_folder(model: str | os.PathLike, allow_pickle: bool = False, **load_kwargs) -> Path:
    """``model``'s folder on this machine: itself, or a hub id's snapshot through diffusers' own download.

    The download honours ``local_files_only`` and ``HF_HUB_OFFLINE`` exactly as
    ``DiffusionPipeline.from_pretrained`` does (it is the same call).
    """
    from diffusers import DiffusionPipeline

    check_pipeline_location(str(model))
    if Path(model).is_dir():
        return Path(model)
    kwargs = {k: load_kwargs[k] for k in _DOWNLOAD_ARGUMENTS if k in load_kwargs}
    if not allow_pickle:
        kwargs.setdefault("use_safetensors", True)
    return Path(DiffusionPipeline.download(str(model), **kwargs))


def load_pipeline_partially(model: str | os.PathLike,
                            choose_reads: Callable[[str, dict[str, nn.Module]], dict[str, Sequence[nn.Module]]], *,
                            device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                            allow_pickle: bool = False, **load_kwargs):
    """A pipeline of which this process reads only the modules it runs; ``(pipeline, reports)``.

    The denoiser (and a second expert, ``transformer_2``, where the pipeline has one) and the
    text encoders and VAE are built on ``meta`` from their configs
    and handed to ``choose_reads(denoiser_attribute, empty)`` (``empty``: name → module),
    which may look at their structure (cut points and placements come from the configs)
    and returns, for each component this process reads only in part, the modules it
    reads: their tensors are read to ``device`` in ``dtype``, the rest stays on ``meta``
    (an empty list: nothing is read). The components it does not name load as
    ``DiffusionPipeline.from_pretrained`` loads them, and the pipeline is assembled by it,
    so its class and config are the ones a full load gives. ``reports`` maps each
    partly read component to its :class:`ReadReport`.
    """
    from diffusers import DiffusionPipeline


    folder = local_pipeline_folder(model, allow_pickle=allow_pickle, **load_kwargs)
    index = DiffusionPipeline.load_config(str(folder))
    attribute = next((c for c in DENOISER_COMPONENTS if isinstance(index.get(c), list) and index[c][1]), None)
    if attribute is None:
        raise ValueError(f"{model}: the pipeline has no unet or transformer component to load partially")
    names = [attribute] + [n for n in EXPERT_COMPONENTS + PLACEABLE_COMPONENTS
                           if isinstance(index.get(n), list) and index[n][1] and n not in load_kwargs]
    empty = {name: empty_component(folder, name, index[name][1], dtype) for name in names}
    reads = choose_reads(attribute, empty)
    components: dict[str, nn.Module] = {}
    reports: dict[str, ReadReport] = {}
    for name, keep in reads.items():
        if name not in empty:
            raise ValueError(f"{model}: no component {name!r} to read in part (have: {', '.join(empty)})")
        if keep:
            reports[name] = load_component_partially(empty[name], folder, name, keep, device=device, dtype=dtype,
                                                     variant=load_kwargs.get("variant"), allow_pickle=allow_pickle)
            logger.info("read %d tensors (%.1f MB) of %s from %s", len(reports[name].tensors),
                        reports[name].bytes_read / 1e6, name, ", ".join(f.name for f in reports[name].files))
        components[name] = empty[name]
    pipeline = load_pipeline(str(model), dtype=dtype, allow_pickle=allow_pickle, **load_kwargs, **components)
    return pipeline, reports
