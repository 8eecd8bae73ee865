"""Loading a diffusers pipeline from a hub id or a local folder."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path



def looks_like_local_path(name: str) -> bool:
    """A name that can only be a local path (a hub id is ``name`` or ``org/name``)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or Path(name).exists())


def check_pipeline_location(model: str, weights: bool | str = "present", allow_pickle: bool = True,
                            given: Iterable[str] = ()) -> None:
    """Refuse, with a message naming it, a ``model`` that is neither a pipeline folder nor possibly a hub id.

    A local folder is also checked component by component (:func:`check_pipeline_folder`): its
    configs, and its weight files as ``weights`` says (``"present"``, the default: the headers of
    those there; a rank reading a component in no part needs no file for it).
    """
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{model}: the folder has no model_index.json, so it is not a diffusers pipeline "
                             "folder (save one with pipe.save_pretrained(folder), or give a hub id)")
        check_pipeline_folder(model, weights=weights, allow_pickle=allow_pickle, given=given)
    elif looks_like_local_path(model):
        raise FileNotFoundError(f"{model}: no such folder (expected a local pipeline folder or a hub id like "
                                "'owner/name')")


class BrokenModelError(ValueError):
    """A pipeline folder on disk is incomplete or damaged; one line naming the component, the file and the fault."""


# weight file names: diffusers models save "diffusion_pytorch_model.*", transformers models "model.*" (safetensors)
# and "pytorch_model.*" (pickle), each possibly with a variant ("….fp16.safetensors") or in shards with an index
_WEIGHT_STEMS = {"diffusers": ("diffusion_pytorch_model",), "transformers": ("model", "pytorch_model")}
# config keys that hold sizes and counts: a negative one (or a channel count of 0) cannot build a model
_SIZE_KEY = re.compile(r"channels|_dims?$|^dim$|heads$|layers|hidden_size$|intermediate_size$|sample_size$|"
                       r"patch_size$|num_groups$")


def _component_class(library: str, class_name: str):
    """The class ``model_index.json`` names, as diffusers resolves it (a pipeline module name means diffusers')."""
    import importlib

    for module in (library, f"diffusers.pipelines.{library}"):
        try:
            found = getattr(importlib.import_module(module), class_name, None)
        except ImportError:
            continue
        if isinstance(found, type):
            return found
    return None


def _read_json(path: Path, what: str):
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise BrokenModelError(f"{what}: {path} is not a text file") from None
    except ValueError as exc:
        raise BrokenModelError(f"{what}: {path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BrokenModelError(f"{what}: {path} holds a JSON {type(value).__name__}, not an object of settings")
    return value


def _check_sizes(config: dict, path: Path, what: str) -> None:
    for key, value in config.items():
        if not isinstance(key, str) or not _SIZE_KEY.search(key):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        numbers = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        if any(v < 0 for v in numbers) or ("channels" in key and any(v == 0 for v in numbers)):
            raise BrokenModelError(f"{what}: {path} has {key}={json.dumps(value)}; channel counts and sizes must be "
                                   "positive")


def check_safetensors_file(path: Path, what: str) -> None:
    """Refuse a ``.safetensors`` file that is truncated or not safetensors at all, before anything reads it."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        start = handle.read(1)
    if length is None:
        raise BrokenModelError(f"{what}: {path} is truncated ({size} bytes: not even the 8-byte header length of a "
                               "safetensors file)")
    if start != b"{" or length > 100_000_000:
        raise BrokenModelError(f"{what}: {path} is not a safetensors file (it does not start with a safetensors "
                               "header; damaged, or another format under this name)")
    if 8 + length > size:
        raise BrokenModelError(f"{what}: {path} is truncated: {size} bytes, shorter than its own {length}-byte header")
    with open(path, "rb") as handle:
        handle.seek(8)
        try:
            header = json.loads(handle.read(length))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise BrokenModelError(f"{what}: {path} is not a safetensors file (its header is not a valid "
                                   "safetensors header)") from None
    if 8 + length + end > size:
        raise BrokenModelError(f"{what}: {path} is truncated: {size} bytes, its header describes "
                               f"{8 + length + end} (copy or download it again)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:  # SafetensorError: overlapping or misaligned tensors, an unknown dtype
        raise BrokenModelError(f"{what}: {path} is not a valid safetensors file ({exc})") from None


def _check_weights(where: Path, library: str, what: str, allow_pickle: bool, required: bool) -> None:
    stems = _WEIGHT_STEMS[library]
    files = sorted(p for p in where.iterdir() if p.is_file() and p.name.startswith(stems))
    safetensors = [p for p in files if p.name.endswith(".safetensors")]
    pickles = [p for p in files if p.name.endswith(".bin")]
    for index in (p for p in files if p.name.endswith(".index.json")):
        weight_map = _read_json(index, what).get("weight_map")
        if not isinstance(weight_map, dict):
            raise BrokenModelError(f"{what}: {index} has no weight_map, so it is not a checkpoint index")
        for shard in sorted(set(map(str, weight_map.values()))):
            if not (where / shard).is_file():
                raise BrokenModelError(f"{what}: {index} names the shard {shard}, which is missing from {where}")
    for path in safetensors:
        check_safetensors_file(path, what)
    if safetensors or not required:
        return
    if pickles and not allow_pickle:
        raise PickleRefused(f"{what}: no safetensors weights found in {where}, only pickle (.bin) checkpoints "
                            f"({', '.join(p.name for p in pickles)}), which can run code when loaded. Pass "
                            "allow_pickle=True (--allow-pickle) if you trust its source")
    if not pickles:
        present = ", ".join(sorted(p.name for p in where.iterdir())) or "nothing"
        raise BrokenModelError(f"{what}: no weights file in {where} (expected {stems[0]}.safetensors or a sharded "
                               f".index.json of it); the folder holds: {present}")


def check_pipeline_folder(model: str, weights: bool | str = True, allow_pickle: bool = True,
                          given: Iterable[str] = ()) -> None:
    """Check a local pipeline folder component by component, before diffusers reads it.

    For every component ``model_index.json`` lists (except those in ``given``, handed to
    ``from_pretrained`` by the caller): its folder is there, its class exists in this
    environment, its config is readable JSON without negative sizes, and with ``weights``,
    a model component has a weight file whose safetensors header is intact and complete
    (a pickle-only component is refused unless ``allow_pickle``); ``weights="present"`` checks
    the headers of the files there but needs none. Also that the pipeline class
    exists. Raises :class:`BrokenModelError` (or ``PickleRefused``) with one line naming
    the component, the file and what is wrong, where diffusers would say "no file named
    config.json" without the component, or fail mid-load with a traceback.
    """
    import diffusers
    import torch
    import transformers

    folder = Path(model).expanduser()
    index = _read_json(folder / "model_index.json", str(model))
    versions = f"diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    given = set(given)
    pipeline_class = index.get("_class_name")
    if not given & {"_class_name", "custom_pipeline"} and (
            not isinstance(pipeline_class, str) or not isinstance(getattr(diffusers, pipeline_class, None), type)):
        raise BrokenModelError(f"{model}: {folder / 'model_index.json'} names the pipeline class {pipeline_class!r}, "
                               f"which this environment ({versions}) does not have")
    components = {name: value for name, value in index.items()
                  if not name.startswith("_") and name not in given and isinstance(value, list) and len(value) == 2
                  and all(isinstance(v, str) for v in value)}
    classes = {}
    for name, (library, class_name) in components.items():
        cls = _component_class(library, class_name)
        if cls is None:
            raise BrokenModelError(f"{model}: component {name}: {folder / 'model_index.json'} names the class "
                                   f"{library}.{class_name}, which this environment ({versions}) does not have")
        # configs only (a plan): the models' configs, not the tokenizers' and schedulers' files
        if weights or issubclass(cls, torch.nn.Module):
            classes[name] = cls
    missing = [name for name in classes if not (folder / name).is_dir()]
    if missing and len(missing) == len(classes) > 1:
        raise BrokenModelError(f"{model}: model_index.json lists the components {', '.join(missing)}, but none of "
                               "their folders is there (copy the whole pipeline folder)")
    for name, cls in classes.items():
        library, class_name = components[name]
        what = f"{model}: component {name}"
        where = folder / name
        if not where.is_dir():
            raise BrokenModelError(f"{what}: the folder {where} is missing (model_index.json lists {name} as "
                                   f"{library}.{class_name})")
        is_model = issubclass(cls, torch.nn.Module)
        config_name = getattr(cls, "config_name", None) if issubclass(cls, diffusers.ConfigMixin) else (
            "config.json" if is_model else None)
        if config_name is None:  # a tokenizer or an image processor: files of its own kinds
            if not any(where.iterdir()):
                raise BrokenModelError(f"{what}: the folder {where} is empty")
            continue
        config_path = where / config_name
        if not config_path.is_file():
            raise BrokenModelError(f"{what}: {config_path} is missing")
        config = _read_json(config_path, what)
        if not is_model:
            continue
        _check_sizes(config, config_path, what)
        library_kind = "diffusers" if issubclass(cls, diffusers.ModelMixin) else (
            "transformers" if issubclass(cls, transformers.PreTrainedModel) else None)
        if weights and library_kind is not None:
            _check_weights(where, library_kind, what, allow_pickle, required=weights is True)


def built_from_config(build, model: str, component: str, class_name: str):
    """``build()``, a model made from a component's config; a config no model can be made from is one line naming it."""
    try:
        return build()
    except (RuntimeError, ValueError, TypeError, AttributeError, KeyError, IndexError, ZeroDivisionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BrokenModelError(f"{model}: component {component}: cannot build a {class_name} from "
                               f"{Path(model) / component / 'config.json'} ({type(exc).__name__}: {first})") from None


def load_pipeline(model: str, pipeline_class=None, dtype=None, allow_pickle: bool = False, **kwargs):
    """``DiffusionPipeline.from_pretrained`` that also loads folders saved with optional components left out.

    A pipeline saved with, say, ``text_encoder_3=None`` (SD3 without T5) records that
    component as ``[null, null]``, and ``from_pretrained`` then insists on being handed
    it; this passes ``None`` for such components unless the caller gives them.
    ``pipeline_class`` (default ``DiffusionPipeline``, which picks the saved class) loads
    the same folder as another pipeline, e.g. ``StableDiffusionImg2ImgPipeline``.
    ``dtype`` (a ``torch.dtype``) is passed as ``dtype=`` (every diffusers from 0.40 takes it;
    ``torch_dtype`` is its deprecated name).
    Weights load from safetensors only: a pickle checkpoint (``.bin``) can run code
    when it is read, so it loads only with ``allow_pickle=True``.
    """
    from diffusers import DiffusionPipeline

    given = set(kwargs)
    if pipeline_class is not None:  # another class than the saved one: the saved one need not exist
        check_pipeline_location(str(model), True, allow_pickle=allow_pickle, given=given | {"_class_name"})
    else:
        check_pipeline_location(str(model), True, allow_pickle=allow_pickle, given=given)
    index = Path(model) / "model_index.json"
    if index.is_file():
        for name, value in json.loads(index.read_text()).items():
            if not name.startswith("_") and isinstance(value, list) and value == [None, None]:
                kwargs.setdefault(name, None)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if not allow_pickle:
        kwargs.setdefault("use_safetensors", True)
    import torch

    try:
        return (pipeline_class or DiffusionPipeline).from_pretrained(model, **kwargs)
    except (OSError, ValueError) as exc:
        if not allow_pickle and "safetensors" in str(exc).lower():
            raise PickleRefused(
                f"{model}: no safetensors weights found; it may hold only pickle (.bin) checkpoints, which can run "
                "code when loaded. Pass allow_pickle=True (--allow-pickle) if you trust its source") from exc
        raise
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:  # a config the checks above let through that no model can be built from
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BrokenModelError(f"{model}: could not build the pipeline from its configs and weights "
                               f"({type(exc).__name__}: {first})") from exc


class PickleRefused(OSError):
    """The weights exist only as pickle checkpoints and the caller did not allow pickle."""
