"""asyncgen._compat, function by function: each does what its docstring says on the installed releases,
and a guarded one fails with a clear error (naming the library's version) where its API is faked away."""

import functools
import sys

import pytest
import torch
from torch import nn

from asyncgen import _compat


def _missing_message(excinfo, library: str) -> None:
    message = str(excinfo.value)
    assert library in message and str(_compat.library_version(library)) in message, message


# ---------------------------------------------------------------------------- versions

def test_library_version():
    from packaging.version import Version

    assert _compat.library_version("torch").release == Version(torch.__version__).release
    assert _compat.library_version("no-such-distribution-asyncgen") is None


# ---------------------------------------------------------------------------- torch: dispatch and fake tensors

def test_tree_leaves():
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    leaves = _compat.tree_leaves(((a, [b]), {"c": c, "n": None}))
    assert [t for t in leaves if isinstance(t, torch.Tensor)] == [a, b, c]


def test_torch_dispatch_mode_sees_every_aten_op():
    seen = []

    class Recorder(_compat.torch_dispatch_mode()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Recorder():
        torch.ones(2) + 1
    assert torch.ops.aten.add.Tensor in seen


def test_op_returns_alias():
    aten = torch.ops.aten
    assert _compat.op_returns_alias(aten.view.default)
    assert _compat.op_returns_alias(aten.add_.Tensor)  # in place: returns its input
    assert not _compat.op_returns_alias(aten.add.Tensor)
    with pytest.raises(_compat.PrivateAPIMissing) as excinfo:
        _compat.op_returns_alias(object())
    _missing_message(excinfo, "torch")


def test_fake_tensor_mode_and_value_read_errors():
    with _compat.fake_tensor_mode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.zeros(4, 3))
        y = x @ torch.zeros(3, 2)
        assert y.shape == (4, 2)
        with pytest.raises(_compat.value_read_errors()):
            torch.nonzero(x)
        with pytest.raises(_compat.value_read_errors()):
            x.sum().item()


def test_fake_from_meta_pretends_to_be_on_the_device():
    meta = torch.empty(3, 5, dtype=torch.float16, device="meta")
    with _compat.fake_tensor_mode(allow_non_fake_inputs=True) as mode:
        fake = _compat.fake_from_meta(mode, meta, torch.device("cpu"))
        assert (fake.shape, fake.dtype, fake.device) == ((3, 5), torch.float16, torch.device("cpu"))
        assert type(fake) is type(mode.from_tensor(torch.zeros(1)))
    with pytest.raises(_compat.PrivateAPIMissing) as excinfo:
        _compat.fake_from_meta(object(), meta, torch.device("cpu"))
    _missing_message(excinfo, "torch")


def test_fake_tensor_logger_is_the_fake_tensor_module():
    assert type(_compat.fake_tensor_mode()).__module__ == _compat.FAKE_TENSOR_LOGGER


# ---------------------------------------------------------------------------- torch: modules

class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.register_buffer("stats", torch.zeros(2))
        self.register_buffer("table", torch.arange(3.0), persistent=False)
        self.child = nn.Linear(2, 2)


def test_own_tensors_lists_the_module_own_slots_only():
    m = _Holder()
    m.alias = m.weight  # one tensor under two names
    assert [(n, p) for n, _, p in _compat.own_tensors(m)] == [
        ("weight", True), ("alias", True), ("stats", False), ("table", False)]
    assert _compat.own_tensors(m)[0][1] is m.weight


def test_non_persistent_buffer_names():
    m = _Holder()
    assert _compat.non_persistent_buffer_names(m) == {"table"}
    assert _compat.non_persistent_buffer_names(m.child) == set()
    assert set(m.state_dict()) == {"weight", "stats", "child.weight", "child.bias"}


def test_replace_tensor():
    m = _Holder()
    meta = nn.Parameter(torch.empty(2, device="meta"))
    _compat.replace_tensor(m, "weight", meta)
    assert m.weight is meta and dict(m.named_parameters())["weight"] is meta
    _compat.replace_tensor(m, "table", torch.ones(3))
    assert torch.equal(m.table, torch.ones(3)) and "table" not in m.state_dict()  # still non-persistent
    with _compat.fake_tensor_mode(allow_non_fake_inputs=True) as mode:  # a plain tensor in a parameter slot
        fake = _compat.fake_from_meta(mode, meta, torch.device("cpu"))
        _compat.replace_tensor(m, "weight", fake)
        assert dict(m.named_parameters())["weight"] is fake
    _compat.replace_tensor(m, "weight", meta)
    assert m.weight is meta
    with pytest.raises(KeyError):
        _compat.replace_tensor(m, "nothing", torch.ones(1))


def test_compiled_original():
    linear = nn.Linear(2, 2)
    assert _compat.compiled_original(linear) is linear
    assert _compat.compiled_original(torch.compile(linear)) is linear


def test_parse_to_arguments():
    assert _compat.parse_to_arguments("cpu", torch.float16) == (torch.device("cpu"), torch.float16)
    assert _compat.parse_to_arguments(dtype=torch.bfloat16) == (None, torch.bfloat16)
    assert _compat.parse_to_arguments(torch.zeros(1, dtype=torch.float64)) == (torch.device("cpu"), torch.float64)


def test_renamed_function_has_its_own_code_object():
    def add(a, b=1):
        return a + b

    renamed = _compat.renamed_function(add, "asyncgen_stage_3")
    assert renamed.__code__ is not add.__code__ and renamed.__code__.co_name == "asyncgen_stage_3"
    assert renamed.__name__ == "asyncgen_stage_3" and renamed(2) == add(2) == 3


# ---------------------------------------------------------------------------- torch.distributed

def test_default_store_and_abort(tmp_path):
    import torch.distributed as dist

    assert _compat.default_store() is None  # no group
    _compat.abort_process_group(None)  # nothing to abort: no error
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        store = _compat.default_store()
        store.set("asyncgen/test", "here")
        assert store.get("asyncgen/test") == b"here"
    finally:
        _compat.abort_process_group(None)
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------- diffusers

def test_clear_method_caches_reaches_caches_in_closures():
    calls = []

    def cached_unless_export(fn):  # diffusers' lru_cache_unless_export: the cache hides in a closure
        cached = functools.lru_cache(maxsize=8)(fn)

        def inner(*args):
            return cached(*args)
        return inner

    class Rope(nn.Module):
        @cached_unless_export
        def freqs(self, n):
            calls.append(n)
            return n

        @functools.lru_cache(maxsize=8)  # noqa: B019 - the class-level cache is what is being cleared
        def plain(self, n):
            calls.append(-n)
            return n

    model = nn.Sequential(Rope())
    rope = model[0]
    rope.freqs(2), rope.freqs(2), rope.plain(3), rope.plain(3)
    assert calls == [2, -3]
    _compat.clear_method_caches(model)
    rope.freqs(2), rope.plain(3)
    assert calls == [2, -3, 2, -3]


def test_hook_original_forward():
    from diffusers.hooks import HookRegistry, ModelHook

    class Double(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            return 2 * _compat.hook_original_forward(self)(*args, **kwargs)

    linear = nn.Linear(2, 2)
    x = torch.ones(1, 2)
    expected = linear(x)
    HookRegistry.check_if_exists_or_initialize(linear).register_hook(Double(), "double")
    assert torch.equal(linear(x), 2 * expected)
    with pytest.raises(_compat.PrivateAPIMissing) as excinfo:
        _compat.hook_original_forward(Double())  # not registered
    _missing_message(excinfo, "diffusers")


def _tiny_pipeline():
    from diffusers import DiffusionPipeline

    class Tiny(DiffusionPipeline):
        def __init__(self, unet):
            super().__init__()
            self.register_modules(unet=unet)

    return Tiny(unet=_tiny_model())


def _tiny_model():
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class TinyModel(ModelMixin, ConfigMixin):
        config_name = "config.json"

        @register_to_config
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

    return TinyModel()


def test_set_pipeline_component_leaves_the_config_alone():
    pipe = _tiny_pipeline()
    recorded = tuple(pipe.config.unet)
    stand_in = nn.Linear(1, 1)
    _compat.set_pipeline_component(pipe, "unet", stand_in)
    assert pipe.unet is stand_in and tuple(pipe.config.unet) == recorded
    pipe.unet = nn.Linear(1, 1)  # what the stock __setattr__ does instead
    assert tuple(pipe.config.unet) != recorded


def test_from_deprecated_attention_block():
    from diffusers.models.attention_processor import Attention

    assert _compat.from_deprecated_attention_block(Attention(8, heads=1, dim_head=8, _from_deprecated_attn_block=True))
    assert not _compat.from_deprecated_attention_block(Attention(8, heads=1, dim_head=8))
    assert not _compat.from_deprecated_attention_block(nn.Linear(2, 2))


def test_record_name_or_path():
    model = _tiny_model()
    _compat.record_name_or_path(model, "/somewhere/unet")
    assert model.config["_name_or_path"] == "/somewhere/unet"
    pipe = _tiny_pipeline()
    _compat.record_name_or_path(pipe, "/somewhere")
    assert pipe.name_or_path == "/somewhere"


def test_keep_in_fp32_modules():
    from transformers import T5EncoderModel

    assert _compat.keep_in_fp32_modules(T5EncoderModel) == ["wo"]
    assert _compat.keep_in_fp32_modules(nn.Linear(2, 2)) == []
    strict = type("Strict", (nn.Module,), {"_keep_in_fp32_modules_strict": ["norm"]})
    assert _compat.keep_in_fp32_modules_strict(strict()) == ["norm"]
    assert _compat.keep_in_fp32_modules_strict(nn.Linear(2, 2)) == []


def test_unet_mask_bias():
    bias = _compat.unet_mask_bias(torch.tensor([[1, 1, 0]]), torch.float16)
    assert bias.shape == (1, 1, 3) and bias.dtype == torch.float16
    assert bias.tolist() == [[[0.0, 0.0, -10000.0]]]


# ---------------------------------------------------------------------------- transformers

def _clip_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=12)


def _t5_config():
    from transformers import T5Config

    return T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)


def test_transformers_model_from_config():
    from transformers import CLIPTextModel

    model = _compat.transformers_model_from_config(CLIPTextModel, _clip_config(), torch.float16)
    assert isinstance(model, CLIPTextModel) and {p.dtype for p in model.parameters()} == {torch.float16}
    assert {p.dtype for p in _compat.transformers_model_from_config(CLIPTextModel, _clip_config()).parameters()} \
        == {torch.float32}
    with pytest.raises(_compat.PrivateAPIMissing) as excinfo:
        _compat.transformers_model_from_config(nn.Linear, _clip_config())
    _missing_message(excinfo, "transformers")


def test_t5_attention_mask_and_block(monkeypatch):
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(_t5_config()).eval()
    ids = torch.tensor([[3, 4, 5, 1], [3, 4, 1, 0]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        embeds = model.encoder.embed_tokens(ids)
        mask = _compat.t5_attention_mask(model.config, embeds, attention)
        hidden, bias = embeds, None
        for block in model.encoder.block:
            hidden, bias = _compat.t5_block_forward(block, hidden, mask, bias)
        hidden = model.encoder.final_layer_norm(hidden)
        stock = model(input_ids=ids, attention_mask=attention).last_hidden_state
    assert torch.equal(hidden, stock)  # the stock forward, rebuilt on these functions
    monkeypatch.setitem(sys.modules, "transformers.masking_utils", None)  # a transformers without masking_utils
    with pytest.raises(_compat.PrivateAPIMissing) as excinfo:
        _compat.t5_attention_mask(model.config, embeds, attention)
    _missing_message(excinfo, "transformers")

    class OldBlock(nn.Module):  # transformers 4.x's T5Block named the cache past_key_value
        def forward(self, hidden_states, attention_mask=None, position_bias=None, past_key_value=None):
            return hidden_states, position_bias

    with pytest.raises(_compat.PrivateAPIMissing):
        _compat.t5_block_forward(OldBlock(), hidden, mask, bias)


def test_clip_causal_mask_and_layer(monkeypatch):
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    model = CLIPTextModel(_clip_config()).eval()
    text = model.text_model if hasattr(model, "text_model") else model
    ids = torch.tensor([[3, 4, 5, 49], [3, 4, 49, 0]])
    with torch.no_grad():
        hidden = text.embeddings(input_ids=ids)
        mask = _compat.clip_causal_mask(text.config, hidden, None)
        for layer in text.encoder.layers:
            hidden = _compat.clip_layer_forward(layer, hidden, mask)
        stock = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(hidden, stock)
    monkeypatch.setitem(sys.modules, "transformers.masking_utils", None)
    with pytest.raises(_compat.PrivateAPIMissing) as excinfo:
        _compat.clip_causal_mask(text.config, hidden, None)
    _missing_message(excinfo, "transformers")


# ---------------------------------------------------------------------------- multiprocessing

def test_resource_tracker_helpers():
    from multiprocessing import resource_tracker

    assert _compat.resource_tracker_running() == (getattr(resource_tracker._resource_tracker, "_fd", None) is not None)
    if not _compat.resource_tracker_running():
        _compat.stop_resource_tracker()  # nothing started: a no-op
        assert not _compat.resource_tracker_running()
