"""Federated strategies on the simpy engine: the equalities the maths promises, and bad inputs."""

import math

import numpy as np
import pytest
import torch

from asyncgen.catalogue.frame import CatalogueError
from asyncgen.catalogue.federated.baselines import FedAsync, FedAvg
from asyncgen.catalogue.federated.data import dirichlet_split, federated_digits
from asyncgen.catalogue.federated.engine import Simulation
from asyncgen.catalogue.federated.favano import FAVANO
from asyncgen.catalogue.federated.fedbuff import FedBuff
from asyncgen.catalogue.federated.fedcompass import FedCompass
from asyncgen.catalogue.federated.fedfix import FedFix, WeightedAsync, fedfix_weights
from asyncgen.catalogue.federated.local import BatchedMLPSGD, Job, LocalSGD, flatten, mlp
from asyncgen.catalogue.federated.profiles import SpeedProfile, make_profile
from asyncgen.catalogue.federated.strategy import staleness_weight

torch.set_num_threads(1)
SIZES = [64, 32, 10]


@pytest.fixture(scope="module")
def data():
    return federated_digits(0, 6, 1.0)


def simulate(strategy, data, step_times, until, seed=0):
    trainer = BatchedMLPSGD(SIZES, data, seed=seed)
    sim = Simulation(strategy, [trainer], SpeedProfile(step_times, jitter=0.0),
                     lambda m, w: trainer.accuracy(w, data.x_test, data.y_test))
    return sim.run(until)


def reference(data, seed=0):
    return LocalSGD(lambda: mlp(SIZES, 0), data, seed=seed)


def logged(strategy):
    """Record the order in which the strategy hands out tasks."""
    order, dispatch = [], strategy.dispatch

    def wrapped(client, now):
        order.append(client)
        return dispatch(client, now)

    strategy.dispatch = wrapped
    return order


def test_batched_trainer_equals_autograd_reference(data):
    w0 = flatten(mlp(SIZES, 0))
    jobs = [Job(i, w0 + 0.01 * i, 1 + 2 * i) for i in range(5)]
    batched = BatchedMLPSGD(SIZES, data, seed=3).train(jobs)
    serial = reference(data, seed=3).train(jobs)
    for a, b in zip(batched, serial):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # float32 rounding of bmm vs mm only
    assert float(batched[-1].abs().max()) > 1e-3  # the steps did move the weights


def test_fedbuff_k1_c1_is_sequential_local_sgd(data):
    w0 = flatten(mlp(SIZES, 0))
    strategy = FedBuff(w0, 6, buffer_size=1, concurrency=1, steps=3, server_lr=1.0, seed=1)
    order = logged(strategy)
    simulate(strategy, data, [1.0, 2.0, 0.5, 1.5, 1.0, 3.0], until=40.0)
    arrived = strategy.uploads
    assert arrived == strategy.version >= 8
    ref, w = reference(data), w0.clone()
    for client in order[:arrived]:
        w = w + ref.train([Job(client, w, 3)])[0]
    torch.testing.assert_close(strategy.weights, w, rtol=0, atol=1e-6)  # float32 rounding only


def test_fedavg_without_overselection_is_weighted_mean_of_client_models(data):
    w0 = flatten(mlp(SIZES, 0))
    strategy = FedAvg(w0, 6, cohort=6, steps=4, client_weights=data.weights, max_rounds=1)
    history = simulate(strategy, data, [1.0, 3.0, 2.0, 1.0, 5.0, 1.0], until=100.0)
    ys = [w0 + d for d in reference(data).train([Job(i, w0, 4) for i in range(6)])]
    by_hand = sum(float(p) * y for p, y in zip(data.weights, ys))
    torch.testing.assert_close(strategy.weights, by_hand, rtol=0, atol=1e-6)
    assert history.times[0][-1] == 20.0  # the round waits for the slowest client: 4 steps × 5
    assert strategy.downloads == 6 and strategy.uploads == 6


def test_fedavg_overselection_aborts_the_slowest(data):
    w0 = flatten(mlp(SIZES, 0))
    strategy = FedAvg(w0, 6, cohort=2, over_selection=1.3, steps=1, client_weights=data.weights, max_rounds=3)
    simulate(strategy, data, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], until=100.0)
    assert strategy.dispatched_per_round == 3
    assert strategy.downloads == 9 and strategy.uploads == 6  # aborted downloads count, no upload


def test_staleness_weight_and_buffer():
    assert staleness_weight(0) == 1.0 and staleness_weight(3) == 0.5
    assert all(staleness_weight(t) > staleness_weight(t + 1) for t in range(20))
    strategy = FedBuff(torch.zeros(4), 4, buffer_size=10, concurrency=2, steps=1)
    strategy.dispatch(0, 0.0)
    strategy.versions[0] = 3  # three server updates since client 0 downloaded
    delta = torch.tensor([1.0, 2.0, -4.0, 8.0])
    strategy.on_update(0, delta, 0, 1, 1.0)
    assert torch.equal(strategy.buffer, 0.5 * delta)


def test_fedbuff_with_client_weights_applies_eta_s_p_per_client():
    p = [0.1, 0.2, 0.3, 0.4]
    strategy = FedBuff(torch.zeros(4), 4, buffer_size=2, concurrency=2, steps=1, server_lr=3.0, client_weights=p)
    for client in (1, 3):
        strategy.dispatch(client, 0.0)
    delta = torch.tensor([1.0, 2.0, -4.0, 8.0])
    strategy.on_update(1, delta, 0, 1, 1.0)  # fresh: s(0) = 1
    assert torch.equal(strategy.buffer, 0.2 * delta)
    strategy.on_update(3, 2 * delta, 0, 1, 2.0)  # full buffer: w <- w + eta_g * buf, no division by K
    torch.testing.assert_close(strategy.weights, 3.0 * (0.2 * delta + 0.4 * 2 * delta), rtol=1e-6, atol=0)
    assert strategy.version == 1


def test_fedasync_with_client_weights_mixes_eta_s_p_capped_at_one():
    strategy = FedAsync(torch.zeros(3), 4, concurrency=2, steps=1, mixing=8.0, client_weights=[0.25] * 4)
    task = strategy.dispatch(0, 0.0)
    strategy.versions[0] = 3  # s(3) = 0.5: alpha = 8 * 0.5 * 0.25 = 1, the cap
    strategy.models[0] = torch.ones(3)
    strategy.on_update(0, torch.full((3,), 2.0), task.base_version, 1, 1.0)
    torch.testing.assert_close(strategy.weights, torch.full((3,), 2.0))  # the client's model replaces the server's
    task = strategy.dispatch(1, 0.0)
    strategy.versions[0] = task.base_version + 3  # s(3) again, now mixing = 2: alpha = 2 * 0.5 * 0.25 = 0.25
    strategy.mixing = 2.0
    base = strategy.weights.clone()
    strategy.on_update(1, torch.full((3,), 4.0), task.base_version, 1, 2.0)
    torch.testing.assert_close(strategy.weights, 0.75 * base + 0.25 * (base + 4.0))


def test_one_weighting_fedbuff_buffer_of_all_clients_is_a_fedavg_round(data):
    # equal speeds, no staleness discount, K = C = N: one FedBuff flush applies eta_g * sum p_i delta_i, exactly the
    # FedAvg round's eta_g * sum p_i delta_i / sum p_i (sum p = 1) -- the per-client weighting every arm shares
    w0 = flatten(mlp(SIZES, 0))
    p = [float(v) for v in data.weights]
    buff = FedBuff(w0, 6, buffer_size=6, concurrency=6, steps=3, staleness_exponent=0.0, server_lr=0.7,
                   client_weights=p)
    avg = FedAvg(w0, 6, cohort=6, steps=3, client_weights=p, server_lr=0.7, max_rounds=1)
    simulate(buff, data, [1.0] * 6, until=3.5)
    simulate(avg, data, [1.0] * 6, until=100.0)
    assert buff.version == avg.version == 1
    torch.testing.assert_close(buff.weights, avg.weights, rtol=0, atol=1e-6)  # float32 summation order only


def test_weighted_async_normalised_to_fedfix_total_weight_per_unit_time():
    taus = list(np.linspace(0.2, 1.0, 20))
    p = [1 / 20] * 20
    strategy = WeightedAsync(torch.zeros(3), 20, task_times=taus, steps=1, client_weights=p, period=0.5)
    assert strategy.d == pytest.approx([t / 0.5 / 20 for t in taus], rel=1e-15)
    # client i applies d_i every tau_i: the total per unit time is 1/dt, FedFix's sum ceil(tau/dt) p / (ceil * dt)
    assert sum(d / t for d, t in zip(strategy.d, taus)) == pytest.approx(1 / 0.5, rel=1e-12)
    fedfix_rate = sum(w / (math.ceil(t / 0.5 - 1e-9) * 0.5) for w, t in zip(fedfix_weights(taus, 0.5, p), taus))
    assert fedfix_rate == pytest.approx(1 / 0.5, rel=1e-12)
    original = WeightedAsync(torch.zeros(3), 20, task_times=taus, steps=1, client_weights=p)  # no period
    assert sum(d / t for d, t in zip(original.d, taus)) == pytest.approx(sum(1 / t for t in taus), rel=1e-12)


def test_fedfix_weights_and_equivalence_with_fedavg(data):
    assert fedfix_weights([0.2, 0.6, 1.0], 0.5, [1 / 3] * 3) == pytest.approx([1 / 3, 2 / 3, 2 / 3], abs=1e-15)
    w0 = flatten(mlp(SIZES, 0))
    taus = [0.2, 0.5, 0.8, 1.0, 0.4, 0.3]
    p = [1 / 6] * 6
    fix = FedFix(w0, 6, period=1.0, task_times=taus, steps=2, client_weights=p)
    avg = FedAvg(w0, 6, cohort=6, steps=2, client_weights=p, max_rounds=4)
    times = [t / 2 for t in taus]
    h_fix = simulate(fix, data, times, until=4.5)
    h_avg = simulate(avg, data, times, until=100.0)
    assert fix.version == avg.version == 4
    assert h_fix.times[0] == [0.0, 1.0, 2.0, 3.0, 4.0]  # one update per tick
    # step for step: Σ d_iΔ_i vs Σ p_iΔ_i / Σ p_i differ only by float32 rounding
    assert h_fix.accuracy[0] == pytest.approx(h_avg.accuracy[0], abs=1 / len(data.y_test) + 1e-12)
    torch.testing.assert_close(fix.weights, avg.weights, rtol=0, atol=1e-6)


def test_favano_equal_speeds_full_sample_is_fedavg(data):
    w0 = flatten(mlp(SIZES, 0))
    p = [1 / 6] * 6
    fav = FAVANO(w0, 6, sample_size=6, steps=3, period=3.0)
    avg = FedAvg(w0, 6, cohort=6, steps=3, client_weights=p, max_rounds=3)
    simulate(fav, data, [1.0] * 6, until=9.5)
    simulate(avg, data, [1.0] * 6, until=100.0)
    assert fav.version == avg.version == 3
    torch.testing.assert_close(fav.weights, avg.weights, rtol=0, atol=1e-6)  # mean vs p-weighted sum rounding


def test_favano_weight_is_clipped_inverse_expected_progress():
    fav = FAVANO(torch.zeros(2), 4, sample_size=2, steps=10, period=1.0)
    assert fav.weight(0, 2) == 1.0  # first contact
    assert fav.weight(0, 2) == 5.0  # K / q̂ = 10 / 2
    assert fav.weight(1, 0) == 1.0 and fav.weight(1, 0) == 10.0  # q̂ = 0: clipped to K
    assert fav.weight(2, 10) == 1.0 and fav.weight(2, 20) == 1.0  # q̂ ≥ K: clipped to 1
    plain = FAVANO(torch.zeros(2), 4, sample_size=2, steps=10, period=1.0, reweight=False)
    assert plain.weight(0, 1) == 1.0 and plain.weight(0, 1) == 1.0


def test_fedcompass_groups_by_speed(data):
    w0 = flatten(mlp(SIZES, 0))
    three = federated_digits(0, 3, 1.0)
    compass = FedCompass(w0, 3, client_weights=three.weights, max_steps=40, min_steps=8)
    simulate(compass, three, [1.0, 2.0, 4.0], until=700.0)
    assert all(8 <= q <= 40 for _, _, _, q in compass.assignments)
    # by hand: client 0 arrives at 40, so the initial group's deadline is 60; client 0 alone is
    # aggregated at 60 and opens group 1 (Q=40, T=100); client 1 arrives late at 80 and joins it
    # with Q = floor((100 - 80) / 2) = 10; client 2 arrives late at 160 and opens its own group
    assert compass.assignments[:3] == [(60.0, 0, 1, 40), (80.0, 1, 1, 10), (100.0, 0, 2, 40)]
    assert compass.groups[1].expected == 100.0 and compass.groups[1].latest == 120.0
    speeds = {0: 1.0, 1: 2.0, 2: 4.0}
    for g, group in enumerate(compass.groups[1:], start=1):
        members = [(c, q) for (t, c, gg, q) in compass.assignments if gg == g]
        starts = [t for (t, c, gg, q) in compass.assignments if gg == g]
        arrivals = [t + q * speeds[c] for (c, q), t in zip(members, starts)]
        slowest = max(speeds[c] for c, _ in members)
        assert max(arrivals) - min(arrivals) < slowest + 1e-9  # a group arrives within one slowest step
        assert max(arrivals) <= group.expected + 1e-9


def test_fedcompass_equal_speeds_is_fedavg(data):
    w0 = flatten(mlp(SIZES, 0))
    p = [float(v) for v in data.weights]
    compass = FedCompass(w0, 6, client_weights=p, max_steps=5, min_steps=1, staleness_exponent=0.5)
    avg = FedAvg(w0, 6, cohort=6, steps=5, client_weights=p, max_rounds=3)
    simulate(compass, data, [1.0] * 6, until=15.5)
    simulate(avg, data, [1.0] * 6, until=100.0)
    assert compass.version == 3 and {q for *_, q in compass.assignments} == {5}
    assert len({g for _, _, g, _ in compass.assignments[:6]}) == 1  # one group
    torch.testing.assert_close(compass.weights, avg.weights, rtol=0, atol=1e-6)


def test_fedasync_mixes_with_staleness():
    strategy = FedAsync(torch.zeros(3), 3, concurrency=2, steps=1, mixing=0.6)
    task = strategy.dispatch(0, 0.0)
    strategy.versions[0] = 3
    strategy.models[0] = torch.ones(3)
    strategy.on_update(0, torch.full((3,), 2.0), task.base_version, 1, 1.0)
    torch.testing.assert_close(strategy.weights, torch.full((3,), 0.7 * 1 + 0.3 * 2.0))  # α s(3) = 0.3


@pytest.mark.parametrize("make, message", [
    (lambda w: FedBuff(w, 4, buffer_size=0, concurrency=2), "K=0"),
    (lambda w: FedBuff(w, 4, buffer_size=2, concurrency=0), "C=0"),
    (lambda w: FedBuff(w, 4, buffer_size=2, concurrency=5), "C=5: cannot exceed the number of clients N=4"),
    (lambda w: FedBuff(w, 0, buffer_size=2, concurrency=1), "N=0"),
    (lambda w: FedBuff(w, 4, buffer_size=2, concurrency=2, server_lr=0.0), "server_lr=0.0"),
    (lambda w: FedBuff(w, 4, buffer_size=2, concurrency=2, staleness_exponent=-1), "a=-1"),
    (lambda w: FedAvg(w, 4, cohort=2, steps=1, client_weights=[0.25] * 4, over_selection=0.9), "o=0.9"),
    (lambda w: FAVANO(w, 4, sample_size=5), "s=5"),
    (lambda w: FAVANO(w, 4, sample_size=2, period=0.0), "period=0.0"),
    (lambda w: FedFix(w, 2, period=-1.0, task_times=[1, 1], steps=1, client_weights=[.5, .5]), "period=-1.0"),
    (lambda w: FedCompass(w, 2, client_weights=[.5, .5], max_steps=10, min_steps=20), "Qmin=20"),
    (lambda w: FedCompass(w, 2, client_weights=[.5, .5], max_steps=10, min_steps=0), "Qmin=0"),
    (lambda w: FedCompass(w, 2, client_weights=[.5, .5], max_steps=10, latest_factor=0.5), "lambda=0.5"),
    (lambda w: FedBuff(w, 4, buffer_size=2, concurrency=2, client_weights=[.5, .5]), "client_weights has 2 entries"),
    (lambda w: FedAsync(w, 2, concurrency=1, steps=1, mixing=1.5), "alpha=1.5"),
    (lambda w: FedAsync(w, 2, concurrency=1, steps=1, mixing=0.0, client_weights=[.5, .5]), "alpha=0.0"),
])
def test_bad_inputs_are_one_line_errors(make, message):
    with pytest.raises(CatalogueError, match=message) as info:
        make(torch.zeros(3))
    assert "\n" not in str(info.value)


def test_bad_data_profile_and_lr(data):
    with pytest.raises(CatalogueError, match="cannot give every client 2 samples"):
        dirichlet_split(np.arange(10) % 2, 6, 1.0, np.random.default_rng(0))
    with pytest.raises(CatalogueError, match="profile='bogus'.*lognormal, two-class"):
        make_profile("bogus", 4, 0)
    with pytest.raises(ValueError, match="lr=0"):
        BatchedMLPSGD(SIZES, data, lr=0)
    split = dirichlet_split(np.arange(400) % 10, 50, 0.1, np.random.default_rng(0))
    assert min(len(c) for c in split) >= 2 and sum(len(c) for c in split) == 400


def test_nan_delta_names_client_and_time(data):
    w0 = flatten(mlp(SIZES, 0))
    w0[0] = math.nan
    strategy = FedBuff(w0, 6, buffer_size=1, concurrency=1, steps=1)
    with pytest.raises(CatalogueError, match=r"client \d sent a non-finite delta \(NaN/inf\) at simulated time"):
        simulate(strategy, data, [1.0] * 6, until=5.0)
