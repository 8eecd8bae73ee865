"""``asyncgen bench --cache``: stock, a step cache alone, AsyncDiff alone and both composed, on tiny pipelines.

Each launch runs 2 gloo ranks for 3 steps, one prompt, one repeat. What is asserted is what the
maths fixes: AsyncDiff with one stage is the stock pipeline; composed with one stage it is the
cache alone (the stage runtime runs diffusers' own cache hooks on the one stage); DeepCache at
interval 2 runs its deep path on steps 0 and 2 of 3; with one stage the cost model's composed
prediction is the cache-alone prediction. Latencies are only checked to exist.
"""

import json

import pytest

from asyncgen.evaluation import bench_asyncdiff, bench_cache

ONE_STAGE = dict(stages=1, stride=1, cfg_parallel=False, warmup=None)
CALL = dict(num_inference_steps=3, guidance_scale=7.5, height=64, width=64, output_type="np", seed=0)


@pytest.mark.distributed
def test_deepcache_side_by_side(family_path):
    result = bench_cache.run_comparison(str(family_path("sd")), "deepcache", {"interval": 2}, ONE_STAGE, CALL,
                                        ["a red circle"], repeats=1)
    stock, cache, ours, composed = result["rows"]
    assert [r["config"] for r in result["rows"]] == ["stock pipeline", "deepcache (interval=2) alone", "one stage",
                                                     "one stage + deepcache (interval=2)"]
    assert ours["psnr_db"] == float("inf")  # one stage is the stock pipeline
    assert cache["max_abs_diff"] > 0 and 0 < cache["ssim"] < 1  # the cached step changed the picture
    assert all(r["latency_s"] > 0 for r in (stock, cache, ours, composed))
    # composed on one stage: the units run through the same hooks with the same decisions, so DeepCache alone exactly
    assert (composed["psnr_db"], composed["max_abs_diff"]) == (cache["psnr_db"], cache["max_abs_diff"])
    assert result["deep_calls"] == {"full": 2, "cached": 1, "composed_full": 2, "composed_cached": 1}
    projection = result["projection"]
    assert projection["composed_cuts"] == projection["bottleneck_cuts"] == [0, len(projection["unit_seconds"])]
    assert projection["predicted_speedup"] == pytest.approx(projection["cache_alone_predicted"])
    assert 1 < projection["predicted_speedup"] < 2  # the deep path skips 1 of 3 steps
    assert sum(projection["deep_units"]) > 0 and 0 < projection["deep_share"] < 1


@pytest.mark.distributed
def test_magcache_calibrated_and_composed_on_one_stage_is_the_cache_alone(family_path):
    call = dict(num_inference_steps=3, height=32, width=32, max_sequence_length=16, output_type="np", seed=0)
    result = bench_cache.run_comparison(str(family_path("flux")), "magcache", {}, ONE_STAGE, call, ["a red circle"],
                                        repeats=1)
    stock, cache, ours, composed = result["rows"]
    assert composed["config"] == "one stage + magcache"
    assert ours["psnr_db"] == float("inf")
    # the composed arm runs diffusers' hooks on its one stage: the cache alone's output exactly
    assert (composed["psnr_db"], composed["max_abs_diff"]) == (cache["psnr_db"], cache["max_abs_diff"])
    assert len(result["mag_ratios"]) == 3 and result["mag_ratios"][0] == 1.0  # diffusers logs 1.0 for step 0
    assert "mag_ratios=" in result["config"]


@pytest.mark.distributed
def test_taylorseer_on_sd3_without_cache_mixin(family_path):
    """SD3's transformer has no enable_cache in diffusers 0.42: the cache alone runs through diffusers' apply function
    with the benchmark's cache context, composed through the stage runtime's; on one stage they are the same run."""
    # 6 steps: TaylorSeer computes the first 3 (disable_cache_before_step) and step 3, then predicts 4 and 5
    call = dict(num_inference_steps=6, height=32, width=32, guidance_scale=4.0, output_type="np", seed=0)
    result = bench_cache.run_comparison(str(family_path("sd3")), "taylorseer", {}, ONE_STAGE, call, ["a red circle"],
                                        repeats=1)
    stock, cache, ours, composed = result["rows"]
    assert ours["psnr_db"] == float("inf") and cache["max_abs_diff"] > 0  # the cache predicted some steps
    assert (composed["psnr_db"], composed["max_abs_diff"]) == (cache["psnr_db"], cache["max_abs_diff"])


def test_bad_cache_requests_are_refused_before_any_work(family_path, tmp_path, capsys):
    sd = str(family_path("sd"))
    out = ["--out", str(tmp_path / "out"), "--model", sd, "--quick"]
    with pytest.raises(SystemExit):
        bench_asyncdiff.main(["--cache", "teacache", *out])
    assert "--cache teacache: unknown cache 'teacache'; accepted: deepcache, fbcache, taylorseer, magcache" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_asyncdiff.main(["--cache", "fbcache", *out])
    assert "--cache fbcache: not for a UNet2DConditionModel; for this model: deepcache" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_asyncdiff.main(["--cache", "deepcache:interval=0", *out])
    assert "interval=0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_asyncdiff.main(["--cache", "deepcache:depth=2", *out])
    assert "'depth=2' is not KEY=VALUE with KEY one of branch, interval" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_asyncdiff.main(["--cache", "deepcache", "--configs", "n1s1,n2s1", *out])
    assert "with --cache give one configuration" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_asyncdiff.main(["--cache", "fbcache", "--out", str(tmp_path / "out"), "--model", str(family_path("sd3")),
                              "--quick"])
    assert "--cache fbcache: diffusers' First Block Cache fails on SD3Transformer2DModel" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.distributed
def test_the_command_writes_json_and_markdown(family_path, tmp_path):
    out = tmp_path / "out"
    code = bench_asyncdiff.main(["--cache", "deepcache", "--model", str(family_path("sd")), "--configs", "n1s1",
                                 "--steps", "3", "--repeats", "1", "--prompt", "a red circle", "--clip", "none",
                                 "--height", "64", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "results.json").read_text())
    assert record["benchmark"] == "cache" and record["cache"] == "deepcache"
    assert [r["config"] for r in record["rows"]][:3] == ["stock pipeline", "deepcache alone", "one stage"]
    assert record["load_average"]["end"] is not None
    assert record["deep_cache_calls"] == {"full": 1, "cached": 2, "composed_full": 1, "composed_cached": 2}
    assert "| deepcache alone | 1 |" in (out / "results.md").read_text()


@pytest.mark.distributed
def test_deepcache_composed_with_two_stages(family_path):
    call = dict(CALL, num_inference_steps=4)
    two = dict(ONE_STAGE, stages=2, warmup=1)
    result = bench_cache.run_comparison(str(family_path("sd")), "deepcache", {"interval": 2}, two, call,
                                        ["a red circle"], repeats=1)
    stock, cache, ours, composed = result["rows"]
    assert composed["config"] == "AsyncDiff N=2 S=1 W=1 + deepcache (interval=2)" and composed["ranks"] == 2
    assert result["deep_calls"]["composed_full"] == 2  # steps 0 and 2
    # stale stages and a stale deep feature: not stock, but close (same bound as DeepCache alone's test: 20 dB
    # above two unrelated seeds' 13.4 dB on this tiny model)
    assert composed["max_abs_diff"] > 0 and composed["psnr_db"] > 33.4
