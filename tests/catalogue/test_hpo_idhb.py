"""ID-Hyperband: Hyperband's schedule, extension without repeats, variant semantics, ask/tell, optuna storage."""

import json
import logging
import math
import random

import numpy as np
import optuna
import pytest

from asyncgen.catalogue import get_experiment
from asyncgen.catalogue.frame import run_experiment
from asyncgen.catalogue.hpo.hyperband import Hyperband, IDHyperband, hyperband_schedule, run_sequential
from asyncgen.catalogue.hpo.learning_curves import LearningCurves, sample_unit_cube
from asyncgen.catalogue.hpo.optuna_adapter import OptunaJobRecorder, cached_results

optuna.logging.set_verbosity(optuna.logging.WARNING)
OBJECTIVE = LearningCurves(seed=3)


def rung_counts(scheduler):
    counts = {}
    for _, budget in scheduler.evaluated:
        counts[budget] = counts.get(budget, 0) + 1
    return counts


def test_schedule_matches_hyperband_formulas():
    assert hyperband_schedule(3, 1, 27) == [[(27, 1), (9, 3), (3, 9), (1, 27)], [(12, 3), (4, 9), (1, 27)],
                                            [(6, 9), (2, 27)], [(4, 27)]]
    assert hyperband_schedule(3, 1, 81) == [[(81, 1), (27, 3), (9, 9), (3, 27), (1, 81)],
                                            [(34, 3), (11, 9), (3, 27), (1, 81)], [(15, 9), (5, 27), (1, 81)],
                                            [(8, 27), (2, 81)], [(5, 81)]]
    for max_budget, cost in ((27, 423), (81, 1902)):
        scheduler = Hyperband(sample_unit_cube, max_budget=max_budget, seed=0)
        run_sequential(scheduler, OBJECTIVE)
        assert scheduler.cost == cost
        expected = {}
        for bracket in hyperband_schedule(3, 1, max_budget):
            for n, r in bracket:
                expected[r] = expected.get(r, 0) + n
        assert rung_counts(scheduler) == expected


@pytest.mark.parametrize("variant", ["eid", "cid", "dcid"])
def test_extend_never_reevaluates(variant):
    scheduler = IDHyperband(sample_unit_cube, max_budget=27, variant=variant, seed=1)
    run_sequential(scheduler, OBJECTIVE)
    first = list(scheduler.evaluated)
    scheduler.extend()
    run_sequential(scheduler, OBJECTIVE)
    assert len(scheduler.evaluated) == len(set(scheduler.evaluated))
    assert scheduler.evaluated[:len(first)] == first
    assert scheduler.max_budget == 81 and scheduler.incumbent()[2] == min(
        v for (c, b), v in scheduler.results.items() if b == 81)
    # every bracket now has HB(81)'s size
    assert [len(b.configs) for b in scheduler.brackets] == [81, 34, 15, 8, 5]


def test_eid_cost_equals_hb81():
    for seed in range(3):
        scheduler = IDHyperband(sample_unit_cube, max_budget=27, variant="eid", seed=seed)
        run_sequential(scheduler, OBJECTIVE)
        scheduler.extend()
        run_sequential(scheduler, OBJECTIVE)
        assert scheduler.cost == 1902.0


def extended_and_reference(variant, seed):
    scheduler = IDHyperband(sample_unit_cube, max_budget=27, variant=variant, seed=seed)
    run_sequential(scheduler, OBJECTIVE)
    scheduler.extend()
    run_sequential(scheduler, OBJECTIVE)
    # replay the extended brackets' configurations, bracket by bracket, into a fresh HB(81)
    replay = iter([scheduler.params[c] for b in scheduler.brackets for c in b.configs])
    reference = Hyperband(lambda rng: next(replay), max_budget=81)
    run_sequential(reference, OBJECTIVE)
    assert [b.base_budget for b in scheduler.brackets] == [b.base_budget for b in reference.brackets]
    return scheduler, reference


def picks_by_params(run):
    # configuration ids differ between the two runs (sampling order), so compare the picks by their params
    return {(tuple(run.params[c].values()), budget) for c, budget in run.picks()}


@pytest.mark.parametrize("seed", [1, 5])
def test_dcid_picks_equal_hb81_on_the_same_configs(seed):
    scheduler, reference = extended_and_reference("dcid", seed)
    assert picks_by_params(scheduler) == picks_by_params(reference)
    assert scheduler.incumbent()[1:] == reference.incumbent()[1:]
    # on these seeds eID keeps an earlier promotion that HB(81) would drop: the comparison discriminates
    eid, eid_reference = extended_and_reference("eid", seed)
    assert picks_by_params(eid) != picks_by_params(eid_reference)


def test_cid_ranks_earlier_promotions_too():
    scheduler = IDHyperband(sample_unit_cube, max_budget=27, variant="cid", seed=4)
    run_sequential(scheduler, OBJECTIVE)
    scheduler.extend()
    run_sequential(scheduler, OBJECTIVE)
    bracket = scheduler.brackets[0]  # r = 1: rungs at 1, 3, 9, 27, 81
    for here, there in ((1.0, 3.0), (3.0, 9.0), (9.0, 27.0)):
        holders = [c for c in bracket.configs if (c, here) in scheduler.results]
        promoted = {c for c in bracket.configs if (c, there) in scheduler.results}
        best = sorted(holders, key=lambda c: (scheduler.results[(c, here)], c))[:len([
            c for c in scheduler.picks() if c[1] == there and c[0] in bracket.configs])]
        assert set(best) <= promoted


def test_asynchronous_workers_give_the_same_result_as_one_worker():
    sequential = IDHyperband(sample_unit_cube, max_budget=27, variant="eid", seed=5)
    run_sequential(sequential, OBJECTIVE)
    parallel = IDHyperband(sample_unit_cube, max_budget=27, variant="eid", seed=5)
    order = random.Random(0)
    running = []
    while not parallel.finished:
        while len(running) < 4 and (job := parallel.ask()) is not None:
            running.append(job)
        job = running.pop(order.randrange(len(running)))  # a random worker finishes first
        parallel.tell(job, OBJECTIVE(job.params, job.budget))
    assert parallel.results == sequential.results and parallel.picks() == sequential.picks()


def test_bad_inputs(caplog):
    with pytest.raises(ValueError, match="eta"):
        IDHyperband(sample_unit_cube, eta=1)
    with pytest.raises(ValueError, match="r_min"):
        IDHyperband(sample_unit_cube, r_min=0)
    with pytest.raises(ValueError, match="max_budget"):
        IDHyperband(sample_unit_cube, eta=3, r_min=1, max_budget=2)
    with pytest.raises(ValueError, match="variant"):
        IDHyperband(sample_unit_cube, variant="xid")
    scheduler = IDHyperband(sample_unit_cube, seed=0)
    job = scheduler.ask()
    other = IDHyperband(sample_unit_cube, seed=9).ask()
    with pytest.raises(ValueError, match="unknown or was already told"):
        scheduler.tell(other, 0.1)
    with pytest.raises(ValueError, match="still running"):
        scheduler.extend()
    with caplog.at_level(logging.WARNING):
        scheduler.tell(job, float("nan"))
    assert scheduler.results[(job.config_id, job.budget)] == math.inf and "NaN" in caplog.text
    with pytest.raises(ValueError, match="unknown or was already told"):
        scheduler.tell(job, 0.1)


def test_optuna_storage_records_and_resumes(tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    study = optuna.create_study(storage=storage, study_name="idhb")
    space = {f"x{i}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(4)}
    recorder = OptunaJobRecorder(IDHyperband(sample_unit_cube, max_budget=9, seed=7), study, space)
    while (asked := recorder.ask()) is not None:
        job, trial = asked
        assert trial.params == job.params and trial.user_attrs == {"config_id": job.config_id, "budget": job.budget}
        recorder.tell(job, OBJECTIVE(job.params, job.budget))
    assert len(study.trials) == len(recorder.scheduler.evaluated)
    # a new process: same sampler seed, results from the storage -> nothing left to evaluate
    loaded = optuna.load_study(study_name="idhb", storage=storage)
    resumed = IDHyperband(sample_unit_cube, max_budget=9, seed=7)
    assert resumed.load_results(cached_results(loaded)) == len(study.trials)
    assert resumed.finished and resumed.ask() is None
    assert resumed.incumbent() == recorder.scheduler.incumbent()


def test_quick_experiment(tmp_path):
    report = run_experiment(get_experiment("idhb"), quick=True, out=tmp_path, progress=False)
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).stat().st_size > 0
    metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]
    assert set(metrics) == {"hb-27", "hb-81", "rerun", "eid-hb", "cid-hb", "dcid-hb"}
    assert metrics["eid-hb"]["cost"] == 1902.0 and metrics["rerun"]["cost"] == 423.0 + 1902.0
    assert report["goals"]["first_run_fully_reused"]["passed"]
    assert np.isfinite(metrics["eid-hb"]["incumbent_g"])
    # the incumbent goal is one-sided: the signed gap of the medians, so a better ID-HB passes however large the gap
    for variant in ("eid", "cid", "dcid"):
        goal = report["goals"][f"{variant}_incumbent_vs_hb81"]
        gap = float(np.median(metrics[f"{variant}-hb"]["per_seed"]["incumbent_g"])
                    - np.median(metrics["hb-81"]["per_seed"]["incumbent_g"]))
        assert goal["value"] == gap and goal["direction"] == "<=" and goal["threshold"] == 0.01
        assert goal["passed"] == (gap <= 0.01)
    again = run_experiment(get_experiment("idhb"), quick=True, progress=False)
    assert again["metrics"] == report["metrics"]
