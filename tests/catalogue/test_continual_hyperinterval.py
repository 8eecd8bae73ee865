"""HyperInterval and its baselines: interval soundness, the HNET special case, the universal-embedding
guarantee, the regulariser at a task switch, bad inputs and determinism of the experiment."""

import pytest
import torch

from asyncgen.catalogue import get_experiment
from asyncgen.catalogue.continual import intervals
from asyncgen.catalogue.continual.baselines import FineTune, mlp
from asyncgen.catalogue.continual.ewc import EWC
from asyncgen.catalogue.continual.hnet import HNet
from asyncgen.catalogue.continual.hypernetwork import HyperNetwork
from asyncgen.catalogue.continual.hyperinterval import HyperInterval
from asyncgen.catalogue.continual.target import TargetMLP
from asyncgen.catalogue.frame import run_experiment

torch.set_num_threads(1)
SMALL = dict(embedding_dim=6, hidden=(16, 16))


def toy_task(seed, n=48, features=8, classes=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, features, generator=g)
    y = (x[:, seed % features] > 0.5).long() % classes
    return x, y


def test_gamma_zero_kappa_one_is_exactly_hnet():
    target = TargetMLP(8, (12,), 2)
    hnet = HNet(target, beta_reg=0.05, seed=3, **SMALL)
    hint = HyperInterval(target, beta_reg=0.05, seed=3, gamma=0.0, kappa_min=1.0, **SMALL)
    for task in range(3):
        x, y = toy_task(task)
        hnet.learn_task(x, y, epochs=2, batch_size=16)
        hint.learn_task(x, y, epochs=2, batch_size=16)
    for a, b in zip(hnet.hypernetwork.parameters(), hint.hypernetwork.parameters()):
        assert torch.equal(a, b)
    for task in range(3):
        assert torch.equal(hnet.embedding(task), hint.embedding(task))
        assert hint.anchor_outputs([task]).shape[0] == 1  # a point box: its bounds are H(e) itself


def test_gamma_zero_interval_path_matches_hnet_loss():
    # kappa < 1 adds the worst-case term, computed by the interval path with radius 0: the same
    # numbers by other float operations, hence a tolerance of float32 rounding only
    target = TargetMLP(8, (12,), 2)
    hnet = HNet(target, seed=5, **SMALL)
    hint = HyperInterval(target, seed=5, gamma=0.0, kappa_min=0.5, **SMALL)
    hnet.begin_task(), hint.begin_task()
    x, y = toy_task(0)
    assert torch.allclose(hnet.task_loss(x, y, 0, 0.7), hint.task_loss(x, y, 0, 0.7), atol=1e-6, rtol=0)


def test_interval_bounds_contain_1000_sampled_points():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    target = TargetMLP(8, (12, 10), 3)
    model = HyperInterval(target, gamma=0.3, seed=1, **SMALL)
    model.begin_task()
    centre = model.embedding(0).detach()
    theta_c, theta_r = (t.detach() for t in model.weight_bounds(0))
    points = centre + (2 * torch.rand(1000, centre.numel(), generator=g) - 1) * 0.3
    thetas = model.hypernetwork(points).detach()
    slack = 1e-5  # float32 rounding of the two computations, far below the radii (checked non-trivial below)
    assert theta_r.max() > 0.01
    assert ((thetas >= theta_c - theta_r - slack) & (thetas <= theta_c + theta_r + slack)).all()
    x = torch.rand(5, 8, generator=g)
    lower, upper = model.logit_bounds(x, 0)
    lower, upper = lower.detach(), upper.detach()
    for theta in thetas:
        logits = target.forward(x, theta)
        assert ((logits >= lower - slack) & (logits <= upper + slack)).all()
    # and the interval-weight layer on interval inputs: sample weights and inputs inside both boxes
    wc, wr = torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g)
    bc, br = torch.randn(4, generator=g), torch.rand(4, generator=g)
    zc, zr = torch.randn(6, generator=g), torch.rand(6, generator=g)
    yc, yr = intervals.interval_weight_linear(zc, zr, wc, wr, bc, br)
    for _ in range(1000):
        w = wc + (2 * torch.rand(4, 6, generator=g) - 1) * wr
        b = bc + (2 * torch.rand(4, generator=g) - 1) * br
        z = zc + (2 * torch.rand(6, generator=g) - 1) * zr
        out = w @ z + b
        assert ((out >= yc - yr - slack) & (out <= yc + yr + slack)).all()


def test_universal_accuracy_at_least_verified_and_regulariser_zero_at_switch():
    target = TargetMLP(8, (16,), 2)
    model = HyperInterval(target, gamma=0.001, seed=0, **SMALL)  # small boxes: standard init, bounds stay tight
    with pytest.raises(ValueError, match="no task has been learned"):
        model.universal_embedding()
    tasks = [toy_task(s, n=96) for s in range(3)]
    for x, y in tasks:
        model.learn_task(x, y, epochs=6, batch_size=32)
        assert model.regulariser().item() > 0 or model.tasks_seen == 1
    model.begin_task()  # a task switch: eta* = eta, so the regulariser is exactly 0
    assert model.regulariser().item() == 0.0
    u = model.universal_embedding()
    for task, (x, y) in enumerate(tasks):
        lower, upper = model.interval(task)
        assert ((u >= lower - 1e-6) & (u <= upper + 1e-6)).all()
        verified = model.verified(x, y, task)
        correct = model.logits(x, embedding=u).argmax(-1) == y
        assert bool(correct[verified].all())  # the guarantee: verified => H(u) classifies it correctly
        assert correct.float().mean() >= verified.float().mean()
    assert sum(model.verified(x, y, t).sum().item() for t, (x, y) in enumerate(tasks)) > 0  # not vacuous


def test_the_hypernetwork_output_depends_on_the_embedding():
    # the standard initialisation: two N(0, 1) embeddings give target weights that differ by a large share of
    # their size (about 0.8 here); the old 0.01x first layer gave 0.03, so every task trained one shared network
    for seed in range(3):
        torch.manual_seed(seed)
        hypernetwork = HyperNetwork(24, 1000)
        g = torch.Generator().manual_seed(seed)
        first, second = torch.randn(24, generator=g), torch.randn(24, generator=g)
        with torch.no_grad():
            a, b = hypernetwork(first), hypernetwork(second)
        assert (a - b).norm() / a.norm() > 0.3
    model = HyperInterval(TargetMLP(8, (12,), 2), gamma=0.1, seed=0, **SMALL)
    model.begin_task(), model.begin_task()
    with torch.no_grad():
        assert not torch.allclose(model.logits(toy_task(0)[0], 0), model.logits(toy_task(0)[0], 1))


def test_the_regulariser_holds_the_propagated_bounds_of_the_whole_box():
    target = TargetMLP(8, (12,), 2)
    model = HyperInterval(target, gamma=0.2, beta_reg=0.5, seed=2, **SMALL)
    model.learn_task(*toy_task(0), epochs=2, batch_size=16)
    model.begin_task()
    with torch.no_grad():
        centre = model.embedding(0)
        theta_c, theta_r = model.hypernetwork.forward_interval(centre, torch.full_like(centre, 0.2))
        bounds = torch.stack([theta_c - theta_r, model.hypernetwork(centre), theta_c + theta_r])
        assert torch.equal(model.anchor_outputs([0]), bounds)  # the interval output of H on task 0's whole box
        assert model.regulariser().item() == 0.0  # eta* = eta at the switch
        # move H only where task 0's box maps: the bias of the last layer shifts every output, bounds included
        model.hypernetwork.layers[-1].bias.add_(0.1)
        n = bounds.shape[1]
        assert torch.allclose(model.regulariser(), torch.tensor(0.5 * 3 * n * 0.01), rtol=1e-4)  # float32 sums
        model.hypernetwork.layers[-1].bias.sub_(0.1)
        # widen the box's image without moving H(e_0): only the bounds see it
        model.hypernetwork.layers[-1].weight.mul_(1.5)
        wider = model.hypernetwork.forward_interval(centre, torch.full_like(centre, 0.2))[1]
        assert (wider >= theta_r).all() and model.regulariser().item() > 0


def test_ewc_penalty_holds_weights_that_finetuning_moves():
    torch.manual_seed(0)
    first, second = toy_task(0, n=64), toy_task(3, n=64)
    drift = {}
    for name, cls, kwargs in [("finetune", FineTune, {}), ("ewc", EWC, {"ewc_lambda": 1e4})]:
        torch.manual_seed(0)
        learner = cls(mlp(8, (16,), 2), seed=0, **kwargs)
        learner.learn_task(*first, epochs=5, batch_size=16)
        before = torch.cat([p.detach().flatten().clone() for p in learner.model.parameters()])
        assert learner.penalty().item() == 0.0 or name == "ewc"
        learner.learn_task(*second, epochs=5, batch_size=16)
        drift[name] = (torch.cat([p.detach().flatten() for p in learner.model.parameters()]) - before).norm()
    assert drift["ewc"] < drift["finetune"]


def test_bad_inputs_raise_clear_value_errors():
    target = TargetMLP(8, (12,), 2)
    with pytest.raises(ValueError, match="gamma=-0.1"):
        HyperInterval(target, gamma=-0.1)
    with pytest.raises(ValueError, match=r"kappa_min=1.5: kappa must lie in \[0, 1\]"):
        HyperInterval(target, kappa_min=1.5)
    with pytest.raises(ValueError, match="beta_reg=-1"):
        HyperInterval(target, beta_reg=-1)
    model = HyperInterval(target, **SMALL)
    x, y = toy_task(0)
    with pytest.raises(ValueError, match="label 2 is outside the head"):
        model.learn_task(x, y + 1)
    with pytest.raises(ValueError, match="empty"):
        model.learn_task(x[:0], y[:0])
    with pytest.raises(ValueError, match="label 3 is outside the head"):
        FineTune(mlp(8, (4,), 2)).learn_task(x, y + 2)
    with pytest.raises(ValueError, match="ewc_lambda=-1"):
        EWC(mlp(8, (4,), 2), ewc_lambda=-1)
    with pytest.raises(ValueError, match="task 0 has not been learned"):
        model.accuracy(x, y, 0)


def test_quick_experiment_is_deterministic():
    info = get_experiment("hyperinterval")
    overrides = ["epochs=1", "tasks=2", "batch_size=128"]
    first = run_experiment(info, quick=True, overrides=overrides, progress=False)
    second = run_experiment(info, quick=True, overrides=overrides, progress=False)
    assert first["metrics"] == second["metrics"]
    assert set(first["metrics"]) == {"hyperinterval", "hnet", "ewc", "finetune", "joint"}
    assert set(first["goals"]) and all(0 <= m["split_mean_acc"] <= 1 for m in first["metrics"].values())


def test_quick_run_does_not_forget_earlier_tasks():
    # issue 25: the non-forgetting check on --quick (2 tasks, 3 epochs each, the committed tuned gamma and
    # beta_reg): task 0's accuracy after task 1 stays within the goal's 0.03 of what it was when task 0 ended
    info = get_experiment("hyperinterval")
    report = run_experiment(info, quick=True, overrides=["workers=1"], progress=False)
    matrix = report["metrics"]["hyperinterval"]["split_accuracy_matrix"][0]  # row t: after task t
    assert len(matrix) == 2 and matrix[0][0] >= 0.9  # task 0 was learnt
    assert matrix[1][0] >= matrix[0][0] - 0.03
    assert report["metrics"]["hyperinterval"]["split_max_forgetting"] <= 0.03
