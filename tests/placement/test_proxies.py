"""Component proxies (asyncgen/placement/proxies.py): a VAE placed on another rank keeps its signatures and the
buffers pipelines read on every rank."""

import pytest
import torch

import tiny_models
from asyncgen.placement.planner import Placement


@pytest.fixture
def one_process_group():
    """A gloo group of this process alone: a proxy's wire needs a group, and world size 1 sends nothing."""
    import torch.distributed as dist

    from asyncgen.comm.group import resolve_context

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield resolve_context()
    finally:
        dist.destroy_process_group()


def test_vae_proxy_keeps_signatures_and_own_buffers(one_process_group):
    """Pipelines inspect the VAE's signatures (SVD/Latte pass num_frames only when forward has it) and read its own
    buffers on every rank (LTX's latents_mean/latents_std): the proxy shows both, also where the VAE runs elsewhere."""
    import inspect

    from asyncgen.placement.proxies import make_proxy
    from asyncgen.placement.residency import release_weights

    torch.manual_seed(0)
    svd_vae = tiny_models.svd_vae()
    proxy = make_proxy("vae", svd_vae, [Placement("vae", 0)], one_process_group)
    for method in ("forward", "decode", "encode"):
        assert inspect.signature(getattr(proxy, method)) == inspect.signature(getattr(svd_vae, method)), method
    assert "num_frames" in inspect.signature(proxy.forward).parameters
    latents = torch.randn(2, 4, 4, 4)
    with torch.no_grad():  # the owner's output, passed through unchanged
        assert torch.equal(proxy.decode(latents, num_frames=2).sample, svd_vae.decode(latents, num_frames=2).sample)

    ltx_vae = tiny_models.ltx_vae()
    mean = ltx_vae.latents_mean.clone()
    # placed on a rank other than this one: nothing of it runs here
    elsewhere = make_proxy("vae", ltx_vae, [Placement("vae", 1)], one_process_group)
    assert release_weights(ltx_vae, list(elsewhere.resident)) > 0
    assert all(p.is_meta for p in ltx_vae.parameters())
    assert torch.equal(elsewhere.latents_mean, mean) and not elsewhere.latents_std.is_meta
    elsewhere.to(torch.float64)
    assert elsewhere.latents_mean.dtype == torch.float64 and torch.equal(elsewhere.latents_mean, mean.double())
    assert elsewhere.dtype == torch.float64


def test_vae_proxy_keeps_submodule_statistics(one_process_group):
    """Flux2KleinPipeline reads ``vae.bn.running_mean``/``running_var`` (a submodule's persistent buffers) on every
    rank: they stay allocated where the VAE runs elsewhere, and the lean-loading holder reads them."""
    from diffusers import AutoencoderKLFlux2

    from asyncgen.placement.proxies import make_proxy
    from asyncgen.placement.residency import own_buffers, release_weights

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                             latent_channels=4).eval()
    vae.bn.running_mean.normal_()
    mean = vae.bn.running_mean.clone()
    assert {id(t) for t in own_buffers(vae)[0].buffers()} == {id(t) for t in vae.buffers()}  # bn's three
    elsewhere = make_proxy("vae", vae, [Placement("vae", 1)], one_process_group)
    assert release_weights(vae, list(elsewhere.resident)) > 0
    assert all(p.is_meta for p in vae.parameters())
    assert torch.equal(elsewhere.bn.running_mean, mean) and not elsewhere.bn.running_var.is_meta
    elsewhere.to(torch.float64)
    assert elsewhere.bn.running_mean.dtype == torch.float64 and torch.equal(elsewhere.bn.running_mean, mean.double())
