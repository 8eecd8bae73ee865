"""Memory-enhanced MDI-QKD: key-rate formulas, limits, Monte Carlo, qutip cross-check, the experiment."""

import json

import numpy as np
import pytest

from asyncgen.catalogue import get_experiment
from asyncgen.catalogue.frame import run_experiment
from asyncgen.catalogue.quantum.key_rates import (MemoryLink, bb84_rate, binary_entropy, dephasing_error, plob_rate,
                                                  secret_fraction, transmittance)
from asyncgen.catalogue.quantum.monte_carlo import simulate_cycles

LOSSES = np.linspace(0.0, 120.0, 241)


def test_basic_rates():
    assert transmittance(0.0) == 1.0 and transmittance(10.0) == pytest.approx(0.1, rel=1e-15)
    assert binary_entropy(0.5) == 1.0 and binary_entropy(0.0) == 0.0 and binary_entropy(1.0) == 0.0
    assert plob_rate(3.0103) == pytest.approx(1.0, rel=1e-4)  # eta = 1/2 -> -log2(1/2)
    assert bb84_rate(20.0, 0.01) == pytest.approx(0.01 * (1 - 2 * binary_entropy(0.01)), rel=1e-12)
    # the secret fraction vanishes at e ~ 0.110
    assert secret_fraction(0.1100) > 0 and secret_fraction(0.1101) == 0.0


@pytest.mark.parametrize("link", [MemoryLink(), MemoryLink(cycle_bins=1), MemoryLink(cycle_bins=16),
                                  MemoryLink(t2_seconds=1e-2, base_error=0.0), MemoryLink(memory_efficiency=0.5)])
def test_memory_rate_bounded_and_decreasing_in_loss(link):
    rates = link.key_rate(LOSSES)
    assert np.all(rates <= 1.0) and np.all(rates >= 0.0)
    positive = rates > 0
    assert np.all(np.diff(rates[positive]) < 0)


def test_high_loss_ratio_limit():
    link = MemoryLink()
    ratio = float(link.key_rate(100.0) / plob_rate(100.0))
    # analytic limit N ln2 (1-2h(e)); at 100 dB N p = 1.2e-3, so finite-p corrections are ~0.1%: 1% is the bound
    assert ratio == pytest.approx(link.cycle_bins * np.log(2) * float(secret_fraction(link.mean_error(100.0))), rel=0.01)
    assert ratio == pytest.approx(link.high_loss_ratio(), rel=0.01)


def test_high_error_gives_zero_rate():
    # 1 - 2h(e) crosses zero at e = 0.1100279 (not 0.11: 1 - 2h(0.11) = 1.6e-4), so start just above the root
    assert secret_fraction(0.1100279) == pytest.approx(0.0, abs=1e-6) and secret_fraction(0.11) > 0
    for e0 in (0.11003, 0.2, 0.5):
        assert np.all(MemoryLink(base_error=e0).key_rate(LOSSES) == 0.0)


def test_gap_distribution_is_a_distribution():
    link = MemoryLink(cycle_bins=7)
    for p in (0.0, 0.01, 0.5, 1.0):
        gaps = link.gap_distribution(p)
        assert gaps.sum() == pytest.approx(1.0, abs=1e-12) and np.all(gaps >= 0)
    # p = 1: both photons in bin 0, no storage
    assert link.gap_distribution(1.0)[0] == 1.0


def test_monte_carlo_matches_formula():
    link = MemoryLink()
    estimate = simulate_cycles(link, 45.0, 300_000, np.random.default_rng(5))
    # P_s ~ 0.30 -> ~90k successes: binomial relative sd 0.3%; 2% is > 5 sd
    assert estimate.success_probability == pytest.approx(float(link.success_probability(45.0)), rel=0.02)
    assert estimate.mean_error_probability == pytest.approx(float(link.mean_error(45.0)), abs=5e-4)
    assert estimate.key_rate(link.cycle_bins) == pytest.approx(float(link.key_rate(45.0)), rel=0.05)
    again = simulate_cycles(link, 45.0, 300_000, np.random.default_rng(5))
    assert again == estimate


def test_dephasing_matches_qutip_mesolve():
    import qutip

    t2 = 1e-3
    times = np.linspace(0.0, 5e-3, 51)
    plus = (qutip.basis(2, 0) + qutip.basis(2, 1)).unit()
    # L = sqrt(gamma) sigma_z decays the coherence as exp(-2 gamma t): gamma = 1 / (2 T2)
    result = qutip.mesolve(qutip.qzero(2), qutip.ket2dm(plus), times, c_ops=[np.sqrt(1 / (2 * t2)) * qutip.sigmaz()],
                           e_ops=[qutip.sigmax()])
    qutip_error = (1.0 - np.asarray(result.expect[0])) / 2.0  # P(measure - in the X basis)
    assert np.max(np.abs(qutip_error - dephasing_error(times, t2))) < 1e-3


@pytest.mark.parametrize("kwargs, name", [
    ({"cycle_bins": 0}, "cycle_bins"), ({"t2_seconds": 0.0}, "t2_seconds"), ({"bin_seconds": -1e-6}, "bin_seconds"),
    ({"base_error": 0.6}, "base_error"), ({"base_error": -0.1}, "base_error"),
    ({"memory_efficiency": 0.0}, "memory_efficiency"), ({"memory_efficiency": 1.2}, "memory_efficiency")])
def test_bad_inputs(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MemoryLink(**kwargs)


def test_negative_loss_rejected():
    with pytest.raises(ValueError, match="loss_db"):
        MemoryLink().key_rate(-1.0)
    with pytest.raises(ValueError, match="loss_db"):
        plob_rate([10.0, -3.0])


def test_quick_experiment_writes_files(tmp_path):
    info = get_experiment("mdi-qkd-memory")
    report = run_experiment(info, quick=True, out=tmp_path, progress=False)
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["metrics"]) == {"plob", "bb84", "memory"}
    assert saved["metrics"]["memory"]["ratio_88db"] >= 3.0
    assert all(goal["passed"] for goal in report["goals"].values())
    again = run_experiment(info, quick=True, progress=False)
    assert again["metrics"] == report["metrics"]
