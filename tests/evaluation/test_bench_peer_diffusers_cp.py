"""``asyncgen bench --peer diffusers-cp``: stock, diffusers' own context parallelism and asyncgen, side by side.

The tiny Wan pipeline (two heads, 3 latent frames of 8x8: 48 video tokens) runs every arm on
2 gloo ranks for 2 steps. What is asserted is what the maths fixes: Ulysses computes each
head's attention over the whole sequence on one rank, so its output is the stock output bit
for bit; asyncgen with one stage is the stock pipeline; and the bytes diffusers' all-to-alls
carry follow from the model's shapes.
"""

import json

import pytest
import torch

from asyncgen.evaluation import bench_asyncdiff, bench_peer_diffusers_cp
from asyncgen.evaluation.collective_traffic import CollectiveTraffic, combine

diffusers = pytest.importorskip("diffusers")
needs_parallelism = pytest.mark.skipif(
    not (hasattr(diffusers.ModelMixin, "enable_parallelism") and hasattr(diffusers, "ContextParallelConfig")),
    reason=f"diffusers {diffusers.__version__} has no enable_parallelism / ContextParallelConfig")

WAN_CALL = dict(negative_prompt="blurry", num_frames=9, height=64, width=64, num_inference_steps=2,
                guidance_scale=5.0, max_sequence_length=16, output_type="np", seed=0)


@needs_parallelism
@pytest.mark.distributed
def test_three_arms_side_by_side_on_two_ranks(family_path):
    path = family_path("wan")
    one_stage = dict(stages=1, stride=1, cfg_parallel=False, warmup=None)
    stock, peer, ours = bench_peer_diffusers_cp.run_comparison(str(path), "ulysses", one_stage, WAN_CALL,
                                                               ["a red ball bouncing"], repeats=1)
    assert [r["config"] for r in (stock, peer, ours)] == ["stock pipeline", "diffusers Ulysses, degree 2",
                                                         "asyncgen one stage"]
    assert (stock["ranks"], peer["ranks"], ours["ranks"]) == (1, 2, 1)
    # exact: Ulysses gathers every token of a head onto one rank and runs the same attention on it
    assert peer["max_abs_diff"] == 0.0 and peer["psnr_db"] == float("inf")
    assert ours["max_abs_diff"] == 0.0  # one stage is the stock pipeline
    assert all(r["latency_s"] > 0 and len(r["latencies"]) == 1 for r in (stock, peer, ours))
    # context parallelism keeps the whole model on every rank
    assert peer["resident_bytes"] == stock["resident_bytes"] * 2

    config = json.loads((path / "transformer" / "config.json").read_text())
    heads, head_dim, layers = config["num_attention_heads"], config["attention_head_dim"], config["num_layers"]
    latent_tokens = 3 * (64 // 8 // 2) ** 2  # 3 latent frames of 8x8 latents in 2x2 patches
    passes = 2  # CFG: the conditional and the unconditional pass, one transformer call each
    all_to_all = peer["traffic"]["all_to_all"]
    # query, key, value and output of every self-attention: one all-to-all each per call
    assert all_to_all["calls_per_step"] == 4 * layers * passes
    # each rank hands over its half of the tokens, all heads, float32
    assert all_to_all["payload_bytes_per_call"] == latent_tokens // 2 * heads * head_dim * 4
    # of which the half addressed to the other rank leaves it; both ranks send
    assert all_to_all["sent_bytes_per_step_all_ranks"] == 4 * layers * passes * latent_tokens // 2 * heads * head_dim * 4
    assert peer["traffic"]["all_gather"]["calls_per_step"] == passes  # the output gathered once per call
    assert peer["sent_kib_per_step"] > 0 and peer["backend_ms_per_step"] > 0
    assert ours["sent_kib_per_step"] == 0  # one rank sends nothing


def _known_traffic(rank, world_size):
    import torch.distributed as dist

    from asyncgen.comm.group import default_backend

    dist.init_process_group(backend=default_backend())
    with CollectiveTraffic() as traffic:
        if rank == 0:
            dist.send(torch.ones(10), 1)  # 40 bytes
        else:
            dist.recv(torch.empty(10), 0)
        dist.all_gather([torch.empty(6) for _ in range(world_size)], torch.ones(6))  # a 24-byte shard each
        output = torch.empty(8, dtype=torch.float16)
        dist.all_to_all_single(output, torch.ones(8, dtype=torch.float16))  # 16 bytes, half of them to the other
    return traffic.summary(world_size, steps=2)


@pytest.mark.distributed
def test_the_counter_counts_bytes_of_each_operation():
    from asyncgen.cli.launcher import launch

    per_rank = launch(_known_traffic, 2, timeout=120)
    sender, receiver = per_rank
    assert sender["send"]["payload_bytes_per_call"] == 40 and sender["send"]["sent_bytes_per_step"] == 20
    assert receiver["recv"]["payload_bytes_per_call"] == 40 and receiver["recv"]["sent_bytes_per_step"] == 0
    for summary in per_rank:
        assert summary["all_gather"]["payload_bytes_per_call"] == 24
        assert summary["all_gather"]["sent_bytes_per_step"] == 12  # 24 bytes to one other rank, over 2 steps
        assert summary["all_to_all"]["payload_bytes_per_call"] == 16
        assert summary["all_to_all"]["sent_bytes_per_step"] == 4
        assert all(entry["ms_per_call"] >= 0 and entry["calls_per_step"] == 0.5 for entry in summary.values())
    both = combine(per_rank)
    assert both["send"]["sent_bytes_per_step_all_ranks"] == 20
    assert both["send"]["calls_per_step"] == 0.25  # one call on one of two ranks, over 2 steps


def test_an_unknown_peer_is_refused_naming_the_accepted_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_asyncdiff.main(["--peer", "diffusers-xp", "--family", "wan", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert ("--peer diffusers-xp: unknown peer; accepted: diffusers-cp, diffusers-cp:ulysses, diffusers-cp:ring, "
            "diffusers-cp:tp") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@needs_parallelism
def test_ring_on_cpu_is_refused_with_the_reason(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_asyncdiff.main(["--peer", "diffusers-cp:ring", "--family", "wan", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "--peer diffusers-cp:ring: not available on CPU" in err and "log-sum-exp" in err


def test_with_a_peer_one_configuration_is_asked_for(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_asyncdiff.main(["--peer", "diffusers-cp", "--family", "wan", "--configs", "n2s1,n2s2",
                              "--out", str(tmp_path / "out")])
    assert "with --peer give one configuration and one warm-up" in capsys.readouterr().err


def test_the_cpu_patch_answers_one_only_inside_and_only_without_an_accelerator():
    before = torch.accelerator.device_count()
    with bench_peer_diffusers_cp.cpu_accelerator_count():
        inside = torch.accelerator.device_count()
    assert inside == (before if before > 0 else 1)
    assert torch.accelerator.device_count() == before
