"""``asyncgen plan --parallel auto`` with context parallelism: Ulysses degrees priced at their sharded shape, listed
with the ``generate --sp`` that runs them, and the reasons a class gets none (or none inside stages)."""

import json

import pytest

from asyncgen._compat import context_parallel_refusal_for_hybrid
from asyncgen.cli.main import main

from .test_plan import _probe_cache

pytestmark = pytest.mark.skipif(context_parallel_refusal_for_hybrid() is not None,
                                reason=f"{context_parallel_refusal_for_hybrid()}")


def _plan(capsys, *argv) -> tuple[int, str]:
    code = main(["plan", *map(str, argv)])
    return code, capsys.readouterr().out


def test_wan_lists_ulysses_and_the_hybrid_with_their_sp(family_path, tmp_path, capsys):
    from asyncgen.cost.device_rate import DeviceRate
    from asyncgen.cost.layout import Link, choose
    from asyncgen.pipelines.layout_costs import costs_from_configs

    path = family_path("wan")
    cache = _probe_cache(tmp_path, 4)
    argv = ["--model", path, "--devices", 4, "--height", 64, "--width", 64, "--parallel", "auto", "--steps", 20,
            "--device", "cpu", "--probe-cache", cache]
    code, out = _plan(capsys, *argv, "--json")
    assert code == 0
    record = json.loads(out)
    assert record["context_parallel"] == "available" and record["stages_context_parallel"] == "available"
    # 2 heads: Ulysses 2 only; 3 and 4 refused with the reason
    assert record["ulysses_degrees"] == [2] and set(record["ulysses_refusals"]) == {"3", "4"}
    with_ulysses = {(c["stages"], c["stride"], c["ulysses"]) for c in record["candidates"] if c["ulysses"] > 1}
    assert with_ulysses == {(1, 1, 2), (2, 1, 2)}  # alone, and inside 2 stages (the hybrid): both allowed
    assert all(c["allowed"] for c in record["candidates"])
    # the engine's own answer on the same numbers (each degree counted at its sharded shape)
    costs = costs_from_configs(str(path), 64, 64, compute="flops", rate=DeviceRate(5e10, 5e9, "cpu", "float32", 1),
                               devices=4)
    expected = choose(costs, Link(2e-4, 1e9, 1.2, 3e-4, 5e8, 4), 4, 20)
    assert [c["predicted_step_ms"] for c in record["candidates"]] == [1e3 * p.step_s for p in expected.candidates]
    code, out = _plan(capsys, *argv)
    assert code == 0
    assert "Ulysses degrees priced at their sharded shape: [2]" in out and "inside stages: available" in out
    assert "--stages 2 --stride 1 --warmup 1 --sp 2" in out and "--stages 1 --stride 1 --sp 2" in out


def test_a_class_without_a_plan_or_whose_plan_cannot_go_into_stages_says_why(family_path, sd_path, tmp_path, capsys):
    code, out = _plan(capsys, "--model", sd_path, "--devices", 2, "--parallel", "auto", "--steps", 20, "--device",
                      "cpu", "--probe-cache", _probe_cache(tmp_path, 2))
    assert code == 0
    assert "context parallel: diffusers gives UNet2DConditionModel no context-parallel plan" in out
    assert "--sp" not in out
    code, out = _plan(capsys, "--model", family_path("flux"), "--devices", 2, "--parallel", "auto", "--steps", 20,
                      "--device", "cpu", "--probe-cache", _probe_cache(tmp_path, 2), "--json")
    assert code == 0
    record = json.loads(out)
    # Flux's plan splits the model's inputs: Ulysses alone, never inside stages
    assert "splits the sequence at the model's inputs" in record["stages_context_parallel"]
    assert {(c["stages"], c["ulysses"]) for c in record["candidates"] if c["ulysses"] > 1} == {(1, 2)}
