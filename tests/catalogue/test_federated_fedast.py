"""FedAST: quota allocation invariants, buffer sizes, the single-task equality with FedBuff, bad inputs."""

import math

import numpy as np
import pytest
import torch

from asyncgen.catalogue.frame import CatalogueError
from asyncgen.catalogue.federated.data import federated_digits
from asyncgen.catalogue.federated.engine import Simulation
from asyncgen.catalogue.federated.fedast import (FedAST, SyncST, allocate_quotas, buffer_sizes,
                                                 normalised_variance)
from asyncgen.catalogue.federated.fedbuff import FedBuff
from asyncgen.catalogue.federated.local import BatchedMLPSGD, flatten, mlp
from asyncgen.catalogue.federated.profiles import SpeedProfile, make_profile

torch.set_num_threads(1)
TASKS = [[64, 32, 10], [64, 16, 10], [64, 10]]


@pytest.fixture(scope="module")
def data():
    return federated_digits(0, 30, 1.0)


def check_quotas(quotas, total, g, finished):
    assert sum(quotas) == (0 if all(finished) else total)  # ΣR_m = R while any task is unfinished
    for quota, done in zip(quotas, finished):
        assert quota % g == 0
        assert quota == 0 if done else quota >= g


def test_allocation_is_proportional_in_units_of_g():
    # 12 units of g=4: one each, 9 spare ∝ [1, 1, 2] = 2.25, 2.25, 4.5 → floors 2, 2, 4, the last unit
    # to the largest remainder (task 2)
    assert allocate_quotas([1.0, 1.0, 2.0], 48, 4) == [12, 12, 24]
    assert buffer_sizes([12, 12, 24], 4) == [3, 3, 6]
    assert buffer_sizes([0, 4, 5], 4) == [1, 1, 2]  # b_m = max(1, ceil(R_m/g))
    assert allocate_quotas([0.0, 0.0, 0.0], 48, 4) == [16, 16, 16]  # no signal: equal split
    assert allocate_quotas([1000.0, 1e-9, 1e-9], 48, 4) == [40, 4, 4]  # every task keeps g
    assert allocate_quotas([1.0, 5.0, 1.0], 48, 4, finished=[False, True, False]) == [24, 0, 24]
    assert allocate_quotas([1.0, 1.0], 8, 4, finished=[True, True]) == [0, 0]
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = int(rng.integers(1, 6))
        g = int(rng.integers(1, 5))
        total = g * int(rng.integers(m, 4 * m + 3))
        finished = list(rng.random(m) < 0.3)
        check_quotas(allocate_quotas(list(rng.exponential(1.0, m)), total, g, finished), total, g, finished)


def test_normalised_variance_by_hand():
    deltas = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])]
    # mean (2, 0); Σ‖Δ−Δ̄‖² = 1 + 1 = 2; n‖Δ̄‖² = 2·4 = 8
    assert normalised_variance(deltas) == 0.25
    assert normalised_variance([torch.ones(3)] * 4) == 0.0


def test_reallocation_keeps_invariants_in_a_run(data):
    weights = [flatten(mlp(sizes, 0)) for sizes in TASKS]
    trainers = [BatchedMLPSGD(sizes, data, lr=0.1, seed=0) for sizes in TASKS]
    strategy = FedAST(weights, 30, in_flight=12, granularity=2, steps=2, server_lr=0.5, seed=0)
    seen = []
    aggregate = strategy.on_update

    def watched(client, delta, base_version, q, now):  # check buffers against quotas at every arrival
        actions = aggregate(client, delta, base_version, q, now)
        check_quotas(strategy.quotas, 12, 2, strategy.finished)
        assert strategy.buffer_sizes == [math.ceil(q / 2) for q in strategy.quotas]
        assert all(c < b for c, b in zip(strategy.counts, strategy.buffer_sizes))  # full buffers were applied
        assert sum(strategy.running) <= 12
        seen.append(list(strategy.quotas))
        return actions

    strategy.on_update = watched
    profile = make_profile("shifted-exp", 30, 0, task_costs=[1.0, 3.0, 1.0])
    Simulation(strategy, trainers, profile, lambda m, w: 0.0).run(until=60.0)
    assert len(strategy.reallocations) >= 3  # P = ⌊0.75·12⌋·3 = 27 arrivals
    assert strategy.reallocations[0] != [4, 4, 4]  # the variances did move the quotas
    assert len(seen) == strategy.uploads
    strategy.finish(1)  # a finished task releases its quota at once
    check_quotas(strategy.quotas, 12, 2, [False, True, False])
    assert strategy.period == 9 * 2


def test_single_task_without_reallocation_is_fedbuff(data):
    w0 = flatten(mlp(TASKS[0], 0))
    step_times = list(np.linspace(0.5, 3.0, 30))
    histories = []
    ast = FedAST([w0], 30, in_flight=12, granularity=4, steps=3, server_lr=0.5, reallocate=False, seed=2)
    assert ast.buffer_sizes == [3]  # ceil(12/4)
    buff = FedBuff(w0, 30, buffer_size=3, concurrency=12, steps=3, staleness_exponent=0.0, server_lr=0.5, seed=2)
    for strategy in (ast, buff):
        trainer = BatchedMLPSGD(TASKS[0], data, lr=0.1, seed=0)
        sim = Simulation(strategy, [trainer], SpeedProfile(step_times, seed=5),
                         lambda m, w: trainer.accuracy(w, data.x_test, data.y_test))
        histories.append(sim.run(40.0))
    assert ast.version == buff.version >= 10
    assert torch.equal(ast.weights, buff.weights)  # the same float operations in the same order
    assert histories[0].times == histories[1].times and histories[0].accuracy == histories[1].accuracy
    assert (ast.downloads, ast.uploads) == (buff.downloads, buff.uploads)


def test_sync_st_splits_clients_and_runs_rounds(data):
    weights = [flatten(mlp(sizes, 0)) for sizes in TASKS]
    trainers = [BatchedMLPSGD(sizes, data, seed=0) for sizes in TASKS]
    strategy = SyncST(weights, 30, cohort=4, steps=2, client_weights=data.weights, max_rounds=3, seed=0)
    assert sorted(c for share in strategy.shares for c in share) == list(range(30))
    history = Simulation(strategy, trainers, SpeedProfile([1.0] * 30, jitter=0.0, task_costs=[1.0, 2.0, 1.0]), lambda m, w: 0.0).run(1e6)
    assert strategy.versions == [3, 3, 3] and strategy.uploads == 3 * 3 * 4
    assert history.times[1] == [0.0, 4.0, 8.0, 12.0]  # κ=2: every round of 2 steps lasts 2·2·1


def test_bad_inputs():
    w = torch.zeros(4)
    with pytest.raises(CatalogueError, match=r"R=8: must be >= g·M = 4·3 = 12"):
        FedAST([w, w, w], 30, in_flight=8, granularity=4)
    with pytest.raises(CatalogueError, match="g=0: the quota granularity must be an integer >= 1"):
        FedAST([w], 30, in_flight=8, granularity=0)
    with pytest.raises(CatalogueError, match="g=-2"):
        allocate_quotas([1.0], 8, -2)
    with pytest.raises(CatalogueError, match="M=0: need"):
        FedAST([], 30, in_flight=8, granularity=4)
    with pytest.raises(CatalogueError, match="R=10: must be a multiple of g=4"):
        FedAST([w], 30, in_flight=10, granularity=4)
    with pytest.raises(CatalogueError, match="R=48: cannot exceed the number of clients N=30"):
        FedAST([w], 30, in_flight=48, granularity=4)
    with pytest.raises(CatalogueError, match="M=0: need"):
        SyncST([], 30, cohort=2, steps=1, client_weights=[1 / 30] * 30)


# smaller than --quick so that the test stays a few seconds on a shared 2-core machine
TINY = ["rounds=1", "N=60", "R=12", "g=2"]


def test_tuning_sees_only_tuning_seeds_and_picks_each_grid_best(monkeypatch, tmp_path):
    """Issue 24 §1 on a --quick grid: every arm searches a 3-value η_g grid on tuning seed 100 only, scored by the mean
    over tasks of the accuracy curve's mean over the budget; the chosen value is the grid's best."""
    import json

    from federated_tuning import assert_each_arm_took_its_grid_best, tune_quick

    report = tune_quick(monkeypatch, tmp_path, "fedast", TINY)
    tuning = report["tuning"]
    # references: a full mean step; async-st's one result weighs what it does in a buffer of ceil((12/3)/2) = 2
    references = {"sync-st": 1.0, "async-st": 0.5, "fedast-static": 1.0, "fedast": 1.0}
    arms = assert_each_arm_took_its_grid_best(tuning, references)
    assert arms == ["sync-st", "async-st", "fedast-static", "fedast"]
    assert report["defaults"] == {"eta_g_" + a.replace("-", "_"): tuning[a]["eta_g"] for a in arms}
    assert tuning["criterion"].startswith("mean over the tasks of each task's mean test accuracy over the budget")
    assert json.loads((tmp_path / "tuning.json").read_text())["defaults"] == report["defaults"]


def test_criterion_is_the_mean_over_tasks_of_each_curve_mean():
    from asyncgen.catalogue.federated.engine import History
    from asyncgen.catalogue.federated.experiments import mean_accuracy

    # task 0 at 0.2 until t=5, then 0.6; task 1 at 0.5 throughout; grid of 201 points on [0, 10]: 100 before t=5
    history = History(times=[[0.0, 5.0], [0.0]], accuracy=[[0.2, 0.6], [0.5]], transfers=[[0, 1], [0]])
    # equal in exact arithmetic; the float sums run in another order, hence a few ulps
    assert mean_accuracy(history, 10.0) == pytest.approx(((100 * 0.2 + 101 * 0.6) / 201 + 0.5) / 2, abs=1e-15)


def test_each_arm_runs_with_its_own_eta(monkeypatch):
    from asyncgen.catalogue import get_experiment
    from asyncgen.catalogue.federated import experiments as fed
    from asyncgen.catalogue.frame import run_experiment

    used, real = [], fed.FedASTSetting.strategy

    def recording(self, arm, eta):
        used.append((arm, eta))
        return real(self, arm, eta)

    monkeypatch.setattr(fed.FedASTSetting, "strategy", recording)
    etas = {"sync-st": 0.7, "async-st": 0.2, "fedast-static": 0.9, "fedast": 1.3}
    report = run_experiment(get_experiment("fedast"), quick=True, progress=False, overrides=[
        *TINY, *(f"eta_g_{a.replace('-', '_')}={e}" for a, e in etas.items())])
    # and the report-only run: fedast at fedast-static's η_g
    assert set(used) == set(etas.items()) | {("fedast", 0.9)}
    assert "time_all_tasks_near_at_static_eta" in report["metrics"]["fedast"]
    assert {a: report["tuning"][a]["eta_g"] for a in etas} == etas
