"""Bring your own objective (issue 24, §5): AEGiS and ID-Hyperband tune a scikit-learn model on the digits data, as
docs/catalogue/hpo.md shows. The examples are the documented ones, shrunk: a few trials, a few epochs."""

import math

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("optuna")


def digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    return train_test_split(x / 16.0, y, test_size=0.3, random_state=0)


def test_id_hyperband_tunes_a_scikit_learn_classifier_with_epochs_as_budget():
    from sklearn.linear_model import SGDClassifier

    from asyncgen.catalogue.hpo.hyperband import IDHyperband, run_sequential

    x_train, x_valid, y_train, y_valid = digits_split()

    def sample(rng):
        return {"alpha": float(10 ** rng.uniform(-6, -1)), "eta0": float(10 ** rng.uniform(-3, 0))}

    def validation_error(params, budget):  # budget: epochs of SGD
        model = SGDClassifier(loss="log_loss", learning_rate="constant", random_state=0, **params)
        for _ in range(int(round(budget))):
            model.partial_fit(x_train, y_train, classes=np.arange(10))
        return 1.0 - model.score(x_valid, y_valid)

    scheduler = IDHyperband(sample, eta=3, r_min=1, max_budget=3, seed=0)
    run_sequential(scheduler, validation_error)
    first_cost = scheduler.cost
    scheduler.extend()  # 3 -> 9 epochs, every result reused
    run_sequential(scheduler, validation_error)
    config_id, params, loss = scheduler.incumbent()
    assert set(params) == {"alpha", "eta0"} and 0.0 <= loss < 0.2  # a tuned linear model on digits: < 20 % error
    assert scheduler.cost > first_cost
    assert len(set(scheduler.evaluated)) == len(scheduler.evaluated)  # no (configuration, budget) pair twice


def test_aegis_tunes_a_scikit_learn_classifier_through_optuna():
    pytest.importorskip("botorch")
    import optuna
    from sklearn.svm import SVC

    from asyncgen.catalogue.hpo.aegis import AEGiSSampler

    x_train, x_valid, y_train, y_valid = digits_split()

    def objective(trial):
        c = trial.suggest_float("C", 1e-2, 1e2, log=True)
        gamma = trial.suggest_float("gamma", 1e-4, 1e0, log=True)
        return 1.0 - SVC(C=c, gamma=gamma).fit(x_train, y_train).score(x_valid, y_valid)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = AEGiSSampler(n_workers=2, seed=0, num_restarts=2, raw_samples=64)
    study = optuna.create_study(sampler=sampler, direction="minimize")
    study.optimize(objective, n_trials=8)
    assert len(study.trials) == 8 and sampler.last_strategy in ("exploit", "thompson", "pareto")
    assert math.isfinite(study.best_value) and study.best_value < 0.1  # an RBF SVM on digits: < 10 % error
