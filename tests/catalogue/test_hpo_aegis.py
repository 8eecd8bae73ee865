"""AEGiS as an optuna sampler: exploit step, move frequencies, determinism, a journal-storage run with two
processes, the baselines' acquisition pieces, bad inputs, the quick experiment."""

import json
import multiprocessing
import warnings

import numpy as np
import optuna
import pytest
import torch

from asyncgen.catalogue import get_experiment
from asyncgen.catalogue.frame import run_experiment
from asyncgen.catalogue.hpo import aegis as aegis_module
from asyncgen.catalogue.hpo.aegis import AEGiSSampler, choose_strategy, resolve_epsilon, strategy_probabilities
from asyncgen.catalogue.hpo.baselines import _PenalisedLogEI
from asyncgen.catalogue.hpo.benchmarks import branin
from asyncgen.catalogue.hpo.gp import DTYPE, fit_gp

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", module="botorch")
warnings.filterwarnings("ignore", module="linear_operator")
torch.set_num_threads(1)
SPACE2 = {"x0": optuna.distributions.FloatDistribution(0.0, 1.0), "x1": optuna.distributions.FloatDistribution(0.0, 1.0)}


def bowl(x):
    return (x[0] - 0.3) ** 2 + 2.0 * (x[1] - 0.65) ** 2 + 0.1 * np.sin(5 * x[0])


def fill(study, points):
    for p in points:
        study.add_trial(optuna.trial.create_trial(params={"x0": p[0], "x1": p[1]}, distributions=SPACE2,
                                                  value=bowl(p)))


def test_epsilon_zero_proposes_the_posterior_mean_argmin():
    points = np.random.default_rng(100).random((8, 2))
    study = optuna.create_study(sampler=AEGiSSampler(epsilon=0.0, n_startup_trials=8, seed=0))
    fill(study, points)
    trial = study.ask(SPACE2)
    proposed = np.array([trial.params["x0"], trial.params["x1"]])
    # the same GP, minimised on a dense grid refined once around its best cell
    fitted = fit_gp(points, [bowl(p) for p in points])

    def grid_argmin(lo, hi, n):
        axes = [np.linspace(lo[i], hi[i], n) for i in range(2)]
        grid = torch.tensor(np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2), dtype=DTYPE)
        with torch.no_grad():
            mean = fitted.model.posterior(grid[:, None, :]).mean.reshape(-1)  # negated loss: maximise
        return grid[int(torch.argmax(mean))].numpy()

    coarse = grid_argmin([0, 0], [1, 1], 201)
    fine = grid_argmin(np.clip(coarse - 0.01, 0, 1), np.clip(coarse + 0.01, 0, 1), 201)  # spacing 1e-4
    assert np.max(np.abs(proposed - fine)) < 1e-3


def test_move_frequencies_for_d6():
    epsilon = resolve_epsilon("sqrtd", 6)
    assert epsilon == pytest.approx(0.408248, abs=1e-6) and resolve_epsilon("sqrtd", 2) == 0.5
    probabilities = strategy_probabilities(epsilon)
    rng = np.random.default_rng(0)
    draws = [choose_strategy(10, probabilities, 4, rng) for _ in range(2000)]
    freq = [draws.count(s) / 2000 for s in ("exploit", "thompson", "pareto")]
    # binomial sd at n = 2000 is <= 0.011, so 0.03 is ~3 sd
    assert np.allclose(freq, (0.184, 0.408, 0.408), atol=0.03)
    # the first proposal exploits, the next n_workers do not
    assert choose_strategy(0, probabilities, 4, rng) == "exploit"
    assert all(choose_strategy(k, probabilities, 4, rng) != "exploit" for k in range(1, 5) for _ in range(50))
    assert choose_strategy(0, strategy_probabilities(0.5), 4, rng) != "exploit"


def test_sampler_uses_the_chosen_move(monkeypatch):
    """A stub GP step: the sampler returns whatever the chosen move returns, in the documented order."""
    calls = []
    monkeypatch.setattr(aegis_module, "exploit", lambda *a, **k: calls.append("exploit") or torch.tensor([0.1, 0.1], dtype=DTYPE))
    monkeypatch.setattr(aegis_module, "thompson", lambda *a, **k: calls.append("thompson") or torch.tensor([0.2, 0.2], dtype=DTYPE))
    monkeypatch.setattr(aegis_module, "pareto", lambda *a, **k: calls.append("pareto") or torch.tensor([0.3, 0.3], dtype=DTYPE))
    # d = 2 gives eps = 0.5 (never exploit) by default, so set eps explicitly
    study = optuna.create_study(sampler=AEGiSSampler(epsilon=0.3, n_workers=2, n_startup_trials=4, seed=1,
                                                     refit_every=100))
    fill(study, np.random.default_rng(101).random((4, 2)))
    proposals = [study.ask(SPACE2).params["x0"] for _ in range(3)]  # three running trials, no new results
    assert calls[0] == "exploit" and "exploit" not in calls[1:3]
    assert proposals == [{"exploit": 0.1, "thompson": 0.2, "pareto": 0.3}[c] for c in calls]


def run_branin(seed, n=9):
    sampler = AEGiSSampler(n_startup_trials=4, seed=seed, num_restarts=2, raw_samples=32, refit_every=3)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: branin([t.suggest_float("x0", 0, 1), t.suggest_float("x1", 0, 1)]), n_trials=n)
    return [tuple(t.params.values()) for t in study.trials]


def test_same_seed_same_proposals():
    first = run_branin(3)
    assert first == run_branin(3)
    assert first != run_branin(4)
    assert len(set(first)) == len(first)


def _journal_worker(path, seed, n_trials):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore")
    storage = JournalStorage(JournalFileBackend(path))
    sampler = AEGiSSampler(n_workers=2, n_startup_trials=4, seed=seed, num_restarts=2, raw_samples=32, refit_every=4)
    study = optuna.load_study(study_name="aegis", storage=storage, sampler=sampler)
    study.optimize(lambda t: branin([t.suggest_float("x0", 0, 1), t.suggest_float("x1", 0, 1)]), n_trials=n_trials)


def test_two_processes_share_a_journal_storage(tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = str(tmp_path / "journal.log")
    optuna.create_study(study_name="aegis", storage=JournalStorage(JournalFileBackend(path)))
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_journal_worker, args=(path, seed, 10)) for seed in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    for w in workers:
        if w.is_alive():
            w.terminate()
    assert [w.exitcode for w in workers] == [0, 0]
    study = optuna.load_study(study_name="aegis", storage=JournalStorage(JournalFileBackend(path)))
    numbers = [t.number for t in study.trials]
    assert len(numbers) == 20 and len(set(numbers)) == 20
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_local_penalisation_discourages_running_points():
    points = np.random.default_rng(102).random((10, 2))
    fitted = fit_gp(points, [bowl(p) for p in points])
    busy = torch.tensor([[0.3, 0.65]], dtype=DTYPE)
    best = float(fitted.model.train_targets.max())
    penalised = _PenalisedLogEI(fitted.model, best, busy, lipschitz=5.0, loss_min=-best)
    plain = penalised.log_ei
    at_busy, far = busy[:, None, :], torch.tensor([[[0.9, 0.1]]], dtype=DTYPE)
    with torch.no_grad():
        # at the running point (near the minimum) the penaliser is Phi((0 - (mu - M))/sigma) < 1; far away ~1
        assert float(penalised(at_busy) - plain(at_busy)) < -0.01
        assert float(penalised(far) - plain(far)) == pytest.approx(0.0, abs=1e-3)


def test_local_penalisation_excludes_the_ball_around_a_bad_busy_point():
    # González et al. (2016) for losses (minimise, M = min y): a busy point x_j predicted at mu(x_j) > M excludes
    # the ball of radius (mu(x_j) - M)/L, penaliser Phi((L d - (mu(x_j) - M))/sigma(x_j)). The busy point sits
    # in a high corner of the bowl, far from the minimum, so mu(x_j) - M is several sigma: the wrong sign
    # Phi((L d + (mu - M))/sigma) would give ~1 (no penalty) at and near it, and fails every check below.
    rng = np.random.default_rng(103)
    corner = np.array([0.95, 0.05])
    points = np.vstack([rng.random((11, 2)), corner])  # the corner observed: mu(x_j) known to within the noise
    fitted = fit_gp(points, [bowl(p) for p in points])
    best = float(fitted.model.train_targets.max())
    busy = torch.tensor(corner[None, :], dtype=DTYPE)
    lipschitz = 4.0
    penalised = _PenalisedLogEI(fitted.model, best, busy, lipschitz=lipschitz, loss_min=-best)
    with torch.no_grad():
        posterior = fitted.model.posterior(busy)
    mu = -float(posterior.mean)  # loss scale (the model predicts negated, standardised losses)
    sigma = float(posterior.variance) ** 0.5
    gap = mu - (-best)  # mu(x_j) - M
    assert gap > 10 * sigma  # the setting the test needs: the busy point is clearly worse than the best
    radius = gap / lipschitz
    toward = torch.tensor([-1.0, 1.0], dtype=DTYPE) / 2**0.5
    from scipy.stats import norm

    with torch.no_grad():
        for t in (0.0, 0.25 * radius, 0.5 * radius, radius, radius + 3 * sigma / lipschitz, 2 * radius):
            x = (busy[0] + t * toward)[None, None, :]
            expected = norm.logcdf((lipschitz * t - gap) / sigma)  # the formula, computed independently
            got = float(penalised.log_penalty(x))
            # float64 throughout; the only difference is cdist's and scipy's rounding
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
            assert float(penalised(x) - penalised.log_ei(x)) == pytest.approx(got, rel=1e-9, abs=1e-12)
        inside = lambda t: float(penalised.log_penalty((busy[0] + t * toward)[None, None, :]))  # noqa: E731
        # inside the ball the penaliser is Phi(z) with z <= -gap/(2 sigma) < -5: below 3e-7 (log < -15)
        assert inside(0.0) < -15 and inside(0.5 * radius) < -15
        assert inside(radius) == pytest.approx(np.log(0.5), abs=1e-9)  # on the sphere: z = 0 exactly
        # three sigma/L beyond the sphere: Phi(3) = 0.99865
        assert inside(radius + 3 * sigma / lipschitz) == pytest.approx(np.log(norm.cdf(3.0)), abs=1e-9)
        assert inside(0.0) < inside(0.5 * radius) < inside(radius) < inside(2 * radius) <= 0.0


def test_bad_inputs():
    for bad in (0.6, -0.1, "sqrt"):
        with pytest.raises(ValueError, match="epsilon"):
            AEGiSSampler(epsilon=bad)
    with pytest.raises(ValueError, match="at least 2 completed points"):
        fit_gp(np.zeros((1, 2)), [1.0])
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=AEGiSSampler(n_startup_trials=0))
    with pytest.raises(ValueError, match="single-objective"):
        study.ask(SPACE2)
    # past start-up but only one completed trial: the start-up sampler answers, no GP fit
    study = optuna.create_study(sampler=AEGiSSampler(n_startup_trials=1, seed=0))
    fill(study, [[0.5, 0.5]])
    trial = study.ask(SPACE2)
    assert set(trial.params) == {"x0", "x1"}


def test_quick_experiment(tmp_path):
    report = run_experiment(get_experiment("aegis"), quick=True, out=tmp_path, progress=False,
                            overrides=["processes=1", "evaluations_branin=6", "evaluations_hartmann6=13"])
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).stat().st_size > 0
    metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]
    assert set(metrics) == {"aegis", "random", "kb-ei"}
    assert set(metrics["aegis"]) >= {"log10_regret_branin", "log10_regret_hartmann6"}
    assert len(report["goals"]) == 4
