"""Every transformer class of the support matrix through the generic block split.

Each tiny model is built from its class's config, saved and loaded back with
``from_pretrained``; the split is verified at split time, its stage composition must
equal the full forward bit for bit, and on 2 gloo ranks the asynchronous schedule must
reproduce the serial simulator. Passing checks are recorded for the support matrix
(``asyncgen.evaluation.support_matrix``).
"""

from pathlib import Path

import pytest
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

import tiny_models
from asyncgen.split.transformer.trace import NeedsRealWeights, SplitRefused
from asyncgen.cli.launcher import launch
from asyncgen.split.registry import split_denoiser
from asyncgen.evaluation import support_matrix
from asyncgen.cost.cuts import balanced_cuts
from asyncgen.cost.estimate import estimate_unit_costs

CLASSES = list(tiny_models.TRANSFORMER_CONFIGS)
# forwards that read tensor values (Lumina2: sequence lengths from its integer text mask's .tolist(); Mochi:
# nonzero on the mask), which a FakeTensorMode trace cannot follow: traced on real tensors when loaded
DATA_DEPENDENT = ("Lumina2Transformer2DModel", "MochiTransformer3DModel")
_SPLITS: dict = {}


def _kind(name: str) -> str:
    return "video" if "3D" in name else "images"


@pytest.fixture(scope="module")
def transformer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("transformers")
    for name in CLASSES:
        tiny_models.transformer(name).save_pretrained(folder / name)
    return folder


def _load(folder: Path, name: str):
    import diffusers

    return getattr(diffusers, name).from_pretrained(folder / name).eval()


def _split(folder: Path, name: str):
    if name not in _SPLITS:
        model = _load(folder, name)
        # verified against the full forward here, on a pipeline-like call where the config gives no example
        _SPLITS[name] = (model, split_denoiser(model, call=tiny_models.transformer_call(name, model)))
    return _SPLITS[name]


@pytest.mark.parametrize("name", CLASSES)
def test_stages_compose_to_the_full_forward(transformer_dir, name):
    model, split = _split(transformer_dir, name)
    inputs = split.random_inputs(batch=2, seed=1)
    n = len(split.units)
    with torch.no_grad():
        reference = split.sample_tensor(model(**split.model_arguments(inputs), return_dict=False)[0])
        every_block = tiny_models.compose_stages(split, inputs, list(range(n + 1)))
        balanced = tiny_models.compose_stages(split, inputs, balanced_cuts(estimate_unit_costs(split), 2))
    # the same ops on the same values in the same order: bit for bit
    assert torch.equal(every_block, reference) and torch.equal(balanced, reference)
    assert split.output_like(inputs[split.sample_argument]).shape == reference.shape
    support_matrix.record(name, kind=_kind(name), split="generic",
                          composition=f"exact ({n} blocks, every cut)")


def _distributed(rank, world_size, folder, names):
    from asyncgen.comm.group import resolve_context

    torch.set_num_threads(1)
    ctx = resolve_context()
    out = {}
    for name in names:
        model = _load(Path(folder), name)
        split = split_denoiser(model, verify_split=False,  # verified in the parent already
                               call=tiny_models.transformer_call(name, model))
        inputs = split.random_inputs(batch=1, seed=2)
        out[name] = support_matrix.denoise_steps(model, split, 2, inputs, ctx=ctx)
    return out


def test_two_ranks_equal_the_serial_simulator(transformer_dir, one_thread):
    # one launch for every class: each spawned worker pays seconds importing torch and diffusers
    per_rank = launch(_distributed, 2, str(transformer_dir), CLASSES, timeout=900)
    for name in CLASSES:
        model, split = _split(transformer_dir, name)
        serial = support_matrix.denoise_steps(model, split, 2, split.random_inputs(batch=1, seed=2))
        stock = support_matrix.denoise_steps(model, split, 1, split.random_inputs(batch=1, seed=2))
        assert not torch.equal(serial, stock)  # the asynchronous step really used a stale state
        for rank, result in enumerate(per_rank):
            # received states sit at aligned offsets of one flat buffer (comm/wire.py): see assert_equals_simulator
            tiny_models.assert_equals_simulator(result[name].numpy(), serial.numpy(), err_msg=f"{name} rank {rank}")
        support_matrix.record(name, distributed="yes (exact)")


# ------------------------------------------------------------------ refusals


class _LongSkipTransformer(ModelMixin, ConfigMixin):
    """U-ViT style: the second half's blocks add the first half's outputs, held in a Python list.

    The state entering a block does not carry those skips, so a cut in the middle cannot
    be exact: the split must be refused, not made.
    """

    @register_to_config
    def __init__(self, in_channels: int = 8, layers: int = 4):
        width = in_channels
        super().__init__()
        self.proj_in = nn.Linear(width, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.proj_out = nn.Linear(width, width)

    def forward(self, hidden_states, timestep, return_dict=True):
        hidden_states = self.proj_in(hidden_states) + timestep[:, None, None]
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= len(self.blocks) // 2:
                hidden_states = hidden_states + skips.pop()
            hidden_states = block(hidden_states)
            if i < len(self.blocks) // 2:
                skips.append(hidden_states)
        return (self.proj_out(hidden_states),)


class _NoBlocks(ModelMixin, ConfigMixin):
    """Two layers side by side, each on the input: called in order, but neither takes what the other made.

    (A list of one layer is one block: a one-layer model is one unit, and splits into one stage.)
    """

    @register_to_config
    def __init__(self, in_channels: int = 8):
        width = in_channels
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width), nn.Linear(width, width)])

    def forward(self, hidden_states, timestep, return_dict=True):
        return (self.layers[0](hidden_states) + self.layers[1](hidden_states),)


def test_a_split_that_is_not_exact_is_refused():
    torch.manual_seed(0)
    model = _LongSkipTransformer().eval()
    with pytest.raises(SplitRefused, match=r"^_LongSkipTransformer: the generic block split is not exact: a stage of "
                                           r"blocks blocks\.[0-9.blocks]+ differs from the full forward by max abs [0-9.e-]+ \(state \([0-9, ]+\)\); "
                                           r"use verify_split=False"):
        split_denoiser(model)
    assert len(split_denoiser(model, verify_split=False).units) == 4  # opting out splits it anyway


def test_a_model_without_a_block_list_is_refused():
    with pytest.raises(TypeError, match="_NoBlocks: found no block list"):
        split_denoiser(_NoBlocks().eval())


@pytest.mark.parametrize("name", DATA_DEPENDENT)
def test_data_dependent_forwards_without_weights_are_refused_with_the_reason(name):
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():  # a config-only description: nothing to run for real
        model = getattr(diffusers, name)(**tiny_models.TRANSFORMER_CONFIGS[name])
    # NeedsRealWeights: AsyncDiffPipeline.from_pretrained then loads whole instead of stage-only
    with pytest.raises(NeedsRealWeights, match=f"(^cannot build an example call of {name}.forward|^{name}: its forward cannot be traced on fake tensors)"):
        split_denoiser(model)


def test_tracing_a_meta_model_leaves_no_fake_tensor_in_its_caches():
    """QwenImage caches its rotary tables per (module, shape, device): splitting a config-only model (what each
    rank does before reading its stage) runs it on fake tensors, and the first real forward at the traced shapes
    used to get those fakes back."""
    import diffusers
    from accelerate import init_empty_weights
    from torch._subclasses.fake_tensor import FakeTensor

    with init_empty_weights():
        model = diffusers.QwenImageTransformer2DModel(**tiny_models.TRANSFORMER_CONFIGS["QwenImageTransformer2DModel"])
    split = split_denoiser(model)
    (frames, height, width), = split.example_inputs()["img_shapes"][0]
    rope = model.pos_embed._compute_video_freqs(frames, height, width, 0, torch.device("cpu"))
    assert not isinstance(rope, FakeTensor) and torch.isfinite(torch.view_as_real(rope)).all()
