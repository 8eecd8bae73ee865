"""Adaptive Braking, the braking() wrapper, the delayed-gradient simulator and the experiment."""

import copy
import json
import math

import pytest
import torch

from asyncgen.catalogue.optim.adaptive_braking import AdaptiveBraking, braking, braking_cosine
from asyncgen.catalogue.optim.delayed import DelayedGradientTrainer


def small_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def batches(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype))
            for _ in range(n)]


def mse(model, x, y):
    return torch.mean((model(x) - y) ** 2)


@pytest.mark.parametrize("kwargs", [
    dict(momentum=0.9),
    dict(momentum=0.9, weight_decay=1e-2),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(momentum=0.5, dampening=0.3),
    dict(momentum=0.0, weight_decay=1e-2),
])
@pytest.mark.parametrize("foreach", [False, None])
def test_rho_zero_is_sgd_bit_for_bit(kwargs, foreach):
    a, b = small_model(), small_model()
    sgd = torch.optim.SGD(a.parameters(), lr=0.05, foreach=foreach, **kwargs)
    ab = AdaptiveBraking(b.parameters(), lr=0.05, rho=0.0, **kwargs)
    for x, y in batches(50):
        for model, opt in ((a, sgd), (b, ab)):
            opt.zero_grad()
            mse(model, x, y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        if kwargs["momentum"]:
            assert torch.equal(sgd.state[p]["momentum_buffer"], ab.state[q]["momentum_buffer"])
    if kwargs["momentum"]:
        assert set(sgd.state_dict()["state"][0]) == set(ab.state_dict()["state"][0]) == {"momentum_buffer"}


def test_cosine_and_update_on_a_hand_built_2d_example():
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = AdaptiveBraking([w], lr=0.1, momentum=0.9, rho=2.0)
    w.grad = torch.tensor([1.0, 0.0], dtype=torch.float64)
    opt.step()  # no velocity yet: c = 0, v = g
    assert torch.equal(opt.state[w]["momentum_buffer"], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert torch.equal(w.detach(), torch.tensor([-0.1, 0.0], dtype=torch.float64))
    # g = (1, 1) against v = (1, 0): c = 1/sqrt(2), g~ = (1 - sqrt(2)) g (active braking)
    w.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    c = braking_cosine([w.grad], [opt.state[w]["momentum_buffer"]], 1e-12)
    assert c.item() == pytest.approx(1 / math.sqrt(2), rel=1e-12)  # eps=1e-12 against a norm product of sqrt(2)
    opt.step()
    scale = 1 - 2 / (math.sqrt(2) + 1e-12)  # eps enters the denominator as specified
    v = torch.tensor([0.9 + scale, scale], dtype=torch.float64)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], v, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(w.detach(), torch.tensor([-0.1, 0.0], dtype=torch.float64) - 0.1 * v,
                               rtol=1e-12, atol=1e-15)
    # a gradient opposed to the velocity is amplified: c = -1 => scale 1 + rho = 3
    before = opt.state[w]["momentum_buffer"].clone()
    w.grad = -before.clone()
    opt.step()
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], 0.9 * before - 3 * before, rtol=1e-9, atol=1e-12)
    # zero velocity: c = 0, not a division by zero
    assert braking_cosine([torch.ones(3)], [torch.zeros(3)], 1e-12).item() == 0.0


def test_global_granularity_uses_one_cosine_over_all_tensors():
    a = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = AdaptiveBraking([a, b], lr=1.0, momentum=0.5, rho=1.0, granularity="global")
    a.grad, b.grad = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    opt.step()
    a.grad, b.grad = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    opt.step()
    # joint g = (0, 1, 1), joint v = (1, 0, 2): c = 2 / (sqrt(2) sqrt(5))
    scale = 1 - 2 / (math.sqrt(2) * math.sqrt(5) + 1e-12)
    torch.testing.assert_close(opt.state[a]["momentum_buffer"], torch.tensor([0.5, scale], dtype=torch.float64))
    torch.testing.assert_close(opt.state[b]["momentum_buffer"], torch.tensor([1.0 + scale], dtype=torch.float64))


def test_state_dict_round_trip_continues_identically():
    a = small_model()
    opt_a = AdaptiveBraking(a.parameters(), lr=0.05, rho=2.0, weight_decay=1e-3)
    data = batches(10)
    for x, y in data[:5]:
        opt_a.zero_grad()
        mse(a, x, y).backward()
        opt_a.step()
    b = copy.deepcopy(a)
    opt_b = AdaptiveBraking(b.parameters(), lr=1.0, rho=0.0)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.param_groups[0]["rho"] == 2.0 and opt_b.param_groups[0]["lr"] == 0.05
    for x, y in data[5:]:
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            mse(model, x, y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_braking_wrapper_matches_adaptive_braking_on_sgd():
    a, b = small_model(dtype=torch.float64), small_model(dtype=torch.float64)
    ab = AdaptiveBraking(a.parameters(), lr=0.05, momentum=0.9, rho=2.0)
    braked = braking(torch.optim.SGD)(b.parameters(), lr=0.05, momentum=0.9, rho=2.0)
    for x, y in batches(30, dtype=torch.float64):
        for model, opt in ((a, ab), (b, braked)):
            opt.zero_grad()
            mse(model, x, y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        # the wrapper sees the velocity as -(w_t - w_{t-1}) / lr, a float64 difference: its cosine differs in
        # the last bits, and braking (a factor up to 1 + rho = 3) carries that over 30 steps to ~1e-11
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    # it wraps optimizers whose state starts empty (Adam) and its state round-trips
    model = small_model()
    adam = braking(torch.optim.Adam)(model.parameters(), lr=1e-2, rho=1.0)
    for x, y in batches(3):
        adam.zero_grad()
        mse(model, x, y).backward()
        adam.step()
    state = adam.state_dict()["state"][0]
    assert {"exp_avg", "exp_avg_sq", "braking_displacement"} <= set(state)
    with pytest.raises(ValueError, match="rho=-1"):
        braking(torch.optim.SGD)(model.parameters(), lr=0.1, rho=-1)
    with pytest.raises(ValueError, match="expected a torch.optim.Optimizer subclass"):
        braking(int)


def test_delay_zero_is_ordinary_training():
    a, b = small_model(), small_model()
    opt_a = AdaptiveBraking(a.parameters(), lr=0.05, rho=2.0)
    opt_b = AdaptiveBraking(b.parameters(), lr=0.05, rho=2.0)
    trainer = DelayedGradientTrainer(b, opt_b, delay=0)
    for x, y in batches(20):
        opt_a.zero_grad()
        loss_a = mse(a, x, y)
        loss_a.backward()
        opt_a.step()
        loss_b = trainer.step(lambda m: mse(m, x, y))
        assert torch.equal(loss_a.detach(), loss_b)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("delay", [1, 3])
def test_delayed_gradient_is_taken_on_the_weights_of_step_t_minus_d(delay):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = DelayedGradientTrainer(model, opt, delay=delay)
    history, seen = [], []

    def loss(m):
        seen.append([p.detach().clone() for p in m.parameters()])
        return mse(m, x, y)

    for x, y in batches(8):
        history.append([p.detach().clone() for p in model.parameters()])
        trainer.step(loss)
    for t, weights in enumerate(seen):
        expected = history[max(t - delay, 0)]  # the first D steps use w_0
        assert all(torch.equal(a, b) for a, b in zip(weights, expected))
    assert not all(torch.equal(a, b) for a, b in zip(seen[-1], history[-1]))  # really stale


def test_linear_weight_prediction_extrapolates_along_the_velocity():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = DelayedGradientTrainer(model, opt, delay=2, weight_prediction=True)
    predicted, seen = [], []

    def loss(m):
        seen.append([p.detach().clone() for p in m.parameters()])
        return mse(m, x, y)

    for x, y in batches(6):
        # w_hat = w - lr * D * v, with lr * D = 0.2
        predicted.append([p.detach().add(opt.state[p]["momentum_buffer"], alpha=-0.2) if p in opt.state else
                          p.detach().clone() for p in model.parameters()])
        trainer.step(loss)
    for t, weights in enumerate(seen):
        expected = predicted[max(t - 2, 0)]
        assert all(torch.equal(a, b) for a, b in zip(weights, expected))


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-0.1), "lr=-0.1"),
    (dict(lr=0.1, momentum=1.0), "momentum=1.0"),
    (dict(lr=0.1, momentum=-0.5), "momentum=-0.5"),
    (dict(lr=0.1, rho=-1.0), "rho=-1.0"),
    (dict(lr=0.1, granularity="layer"), "granularity='layer'"),
    (dict(lr=0.1, momentum=0.0, nesterov=True), "Nesterov needs momentum > 0"),
    (dict(lr=0.1, weight_decay=-1.0), "weight_decay=-1.0"),
])
def test_bad_optimizer_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        AdaptiveBraking(small_model().parameters(), **kwargs)


@pytest.mark.parametrize("delay", [-1, 1.5, "2", True])
def test_bad_delay(delay):
    model = small_model()
    with pytest.raises(ValueError, match=r"delay=.*expected an integer >= 0"):
        DelayedGradientTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), delay=delay)


def test_experiment_quick_runs_are_identical_and_named_as_the_issue(tmp_path):
    from asyncgen.catalogue import get_experiment
    from asyncgen.catalogue.frame import run_experiment

    info = get_experiment("adaptive-braking")
    small = ["quad_steps=200", "digits_epochs=1"]  # --quick, shortened further: determinism needs no long run
    first = run_experiment(info, quick=True, overrides=small, out=tmp_path, progress=False)
    second = run_experiment(info, quick=True, overrides=small, progress=False)
    assert first["metrics"] == second["metrics"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["metrics"]) == {"sgdm", "sgdm-lwp", "sgdm-ab"}
    assert {"accuracy_d0", "accuracy_d32", "quad_f_ratio_d32"} <= set(saved["metrics"]["sgdm-ab"])
    assert "accuracy_d32" in saved["metrics"]["sgdm-lwp"] and "accuracy_d0" not in saved["metrics"]["sgdm-lwp"]
    assert all(0.0 <= v <= 1.0 for v in saved["metrics"]["sgdm"]["per_seed"]["accuracy_d0"])
    assert set(saved["goals"]) == {"sgdm_accuracy_d0", "ab_retention_d32", "sgdm_retention_d32", "ab_minus_lwp_d32",
                                   "quad_sgdm_over_ab_d32", "quad_ab_f_ratio_d32"}
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.png").exists()


def test_experiment_rejects_bad_config():
    from asyncgen.catalogue import get_experiment
    from asyncgen.catalogue.frame import CatalogueError, run_experiment

    info = get_experiment("adaptive-braking")
    with pytest.raises(CatalogueError, match=r"digits_delays=\[4, 32\]: expected integers >= 0 including 0"):
        run_experiment(info, quick=True, overrides=["digits_delays=4,32"], progress=False)
    with pytest.raises(CatalogueError, match="unknown key for adaptive-braking"):
        run_experiment(info, quick=True, overrides=["delay=3"], progress=False)


def test_tuning_sees_only_tuning_seeds_and_picks_each_arms_grid_best(monkeypatch, tmp_path):
    """Issue 24 §1 on a --quick grid: every arm searches the same lr (x momentum) grid on the same seeds (>= 100,
    never an evaluation seed), and the chosen point is the one with the best mean score."""
    from asyncgen.catalogue import get_experiment
    from asyncgen.catalogue.frame import run_experiment, run_tuning
    from asyncgen.catalogue.optim import experiments as ab

    seen, real = [], ab.run_digits

    def recording(arm, delay, rho, lr, momentum, config, seed, data):
        seen.append((arm, seed, lr, momentum))
        return real(arm, delay, rho, lr, momentum, config, seed, data)

    monkeypatch.setattr(ab, "run_digits", recording)
    info = get_experiment("adaptive-braking")
    report = run_tuning(info, quick=True, overrides=["digits_epochs=1"], out=tmp_path, progress=False)
    tuning = report["tuning"]
    assert {seed for _, seed, _, _ in seen} == {100} == set(tuning["seeds"])
    grid = {"lr": [0.02, 0.1], "momentum": [0.9]}  # the quick grid; momentum stays the paper's 0.9 for every arm
    for arm in ("sgdm", "sgdm-lwp", "sgdm-ab"):
        assert tuning["grid"][arm] == grid  # the same budget for every arm
        # every grid point ran at every delay of the comparison (quick: 0 and 32)
        assert sorted((lr, m) for a, _, lr, m in seen if a == arm) == sorted(
            (lr, m) for lr in grid["lr"] for m in grid["momentum"] for _ in (0, 32))
        scores = tuning["scores"][arm]
        best = max(scores.values())
        first_best = next(label for label, v in scores.items() if v == best)  # ties: the earlier grid point
        assert f"lr={tuning[arm]['lr']:g},momentum={tuning[arm]['momentum']:g}" == first_best
        key = arm.replace("-", "_")
        assert report["defaults"][f"lr_{key}"] == tuning[arm]["lr"]
        assert report["defaults"][f"momentum_{key}"] == tuning[arm]["momentum"]
    assert json.loads((tmp_path / "tuning.json").read_text())["defaults"] == report["defaults"]

    # an evaluation run uses each arm's own values, records them under tuning, and sees only evaluation seeds
    seen.clear()
    values = ["lr_sgdm=0.02", "momentum_sgdm=0.5", "lr_sgdm_lwp=0.05", "momentum_sgdm_lwp=0.9", "lr_sgdm_ab=0.1",
              "momentum_sgdm_ab=0.9"]
    run = run_experiment(info, quick=True, overrides=["digits_epochs=1", "quad_steps=100", *values], progress=False)
    assert {seed for _, seed, _, _ in seen} == {0}
    assert {(a, lr, m) for a, _, lr, m in seen} == {("sgdm", 0.02, 0.5), ("sgdm-lwp", 0.05, 0.9),
                                                     ("sgdm-ab", 0.1, 0.9)}
    assert run["tuning"]["sgdm"] == {"lr": 0.02, "momentum": 0.5} and run["tuning"]["seeds"] == [100]
    with pytest.raises(Exception, match=r"tune_seeds"):
        run_tuning(info, quick=True, overrides=["tune_seeds=7"], progress=False)
