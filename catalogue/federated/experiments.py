"""The miniature experiments: each paper's headline comparison on digits in simulated time.

Common protocol (issue 12): per seed, FedAvg runs its rounds first; its simulated end time is
every arm's budget, and 0.95 × its final accuracy is the target. Each arm reports
``time_to_target`` (simulated), ``transfers_to_target`` (downloads + uploads until then) and
``final_accuracy`` (at the budget), plus the metrics its goals name.

One update scale (issue 24): with p_i client i's data share (Σp = 1), every arm applies client
i's update Δ_i with a weight proportional to p_i, times the arm's own server step η_g:

* fedavg: η_g·p_i / Σ_{j∈S} p_j over the round's kept clients S (a round adds up to η_g);
* fedbuff: η_g·s(τ)·p_i, applied every K results (``FedBuff(client_weights=p)``);
* fedasync: mixing weight min(1, η_g·s(τ)·p_i) (``FedAsync(client_weights=p)``);
* fedcompass: η_g·s(τ)·p_i, applied per group (its authors' weighting);
* fedfix: η_g·ceil(τ_i/Δt)·p_i per tick; its asynchronous baseline ``async``: η_g·(τ_i/Δt)·p_i
  per arrival, the same total weight per unit time as FedFix (1/Δt);
* favano: η_g·α_i/s (its paper's reweighting of partial progress).

η_g is then chosen per arm, with the same budget for every arm (a grid of the same size around
the arm's reference scale, the same tuning seeds ≥ 100, never an evaluation seed), by the
experiment's ``tune_NAME`` (``asyncgen catalogue tune NAME``, :func:`tune_settings`); the chosen
values are the experiments' defaults (``eta_g_ARM``) and are recorded in results.json under ``tuning``.
FedAST's arms (several models at once) are tuned the same way, scored by the mean over tasks of each task's
accuracy curve's mean over the budget; its arms' weighting: sync-st η_g·Σ_S p_iΔ_i/Σ_S p_i per task round,
fedast and fedast-static η_g·mean of b_m buffered results, async-st η_g·Δ per result (b_m = 1).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from ..frame import CatalogueError, ExperimentResult, Goal, Plot, Series
from .baselines import FedAsync, FedAvg
from .data import FederatedData, class_skew, federated_digits
from .engine import History, Simulation
from .fedbuff import FedBuff
from .local import BatchedMLPSGD, flatten, mlp
from .profiles import make_profile, slow_clients

SIMULATED_CLOCK_NOTE = ("simulated clock: task durations are drawn from a seeded speed profile, never measured; "
                        "local training is real torch SGD")
MLP = [64, 32, 10]
CURVE_POINTS = 80
EVALS_PER_BUDGET = 1000  # accuracy is measured at most this many times per budget (and at the end)


class Arena:
    """One seed's data, initial model and clocks; runs strategies in simulated time."""

    def __init__(self, seed: int, num_clients: int, alpha: float, profile: str, *, lr: float, batch: int,
                 steps: int = 1, sizes: Sequence[int] = MLP, skew: np.ndarray | None = None):
        torch.set_num_threads(1)
        self.seed, self.num_clients, self.profile_name, self.steps = seed, num_clients, profile, steps
        self.lr, self.batch, self.sizes = lr, batch, list(sizes)
        self.data: FederatedData = federated_digits(seed, num_clients, alpha, skew)
        self.initial = flatten(mlp(self.sizes, seed))
        self.p = self.data.weights

    def trainer(self) -> BatchedMLPSGD:
        return BatchedMLPSGD(self.sizes, self.data, lr=self.lr, batch=self.batch, seed=self.seed)

    def run(self, strategy, until: float, eval_interval: float = 0.0) -> History:
        trainer = self.trainer()
        profile = make_profile(self.profile_name, self.num_clients, self.seed, steps=self.steps)
        sim = Simulation(strategy, [trainer], profile,
                         lambda m, w: trainer.accuracy(w, self.data.x_test, self.data.y_test),
                         eval_interval=eval_interval)
        return sim.run(until)

    def accuracy_on(self, weights: torch.Tensor, classes: Sequence[int]) -> float:
        mask = np.isin(self.data.y_test, list(classes))
        return self.trainer().accuracy(weights, self.data.x_test[mask], self.data.y_test[mask])


def arm_metrics(history: History, target: float) -> dict[str, float]:
    time = history.time_to(target)
    return {"time_to_target": time, "transfers_to_target": history.transfers_at(time),
            "final_accuracy": history.final_accuracy()}


class Collector:
    """Per-seed metrics and curves of every arm; ratios of seed means; the accuracy-vs-time plot."""

    def __init__(self):
        self.per_seed: dict[str, dict[str, list[float]]] = {}
        self.curves: dict[str, list[tuple[list[float], list[float]]]] = {}  # arm -> per seed (times, acc)

    def add(self, arm: str, metrics: dict[str, float], history: History | None = None) -> None:
        row = self.per_seed.setdefault(arm, {})
        for key, value in metrics.items():
            row.setdefault(key, []).append(float(value))
        if history is not None:
            self.curves.setdefault(arm, []).append((list(history.times[0]) + [history.end],
                                                    list(history.accuracy[0]) + [history.accuracy[0][-1]]))

    def mean(self, arm: str, metric: str) -> float:
        values = self.per_seed[arm][metric]
        return float(np.mean(values)) if values and not any(math.isnan(v) for v in values) else math.nan

    def ratio(self, arm: str, baseline: str, metric: str = "time_to_target") -> float:
        a, b = self.mean(arm, metric), self.mean(baseline, metric)
        return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan

    def result(self, goals: list[Goal], title: str, notes: list[str], arms: Sequence[str] | None = None,
               extra_metrics: dict[str, dict[str, float]] | None = None) -> ExperimentResult:
        arms = list(arms or self.curves)
        end = max(times[-1] for arm in arms for times, _ in self.curves[arm])
        grid = list(np.linspace(0.0, end, CURVE_POINTS))
        series, extra = {}, {}
        for arm in arms:
            ys = [_step_curve(times, acc, grid) for times, acc in self.curves[arm]]
            series[arm] = Series(x=grid, y=ys)
            extra[arm] = {"curves": {"time": [float(t) for t in grid], "accuracy": ys}}
        for arm, values in (extra_metrics or {}).items():
            extra.setdefault(arm, {}).update(values)
        plot = Plot(panels=[{"title": title, "xlabel": "simulated time", "ylabel": "test accuracy",
                             "series": series}], title=title)
        return ExperimentResult(per_seed=self.per_seed, goals=goals, plot=plot, extra=extra,
                                notes=[SIMULATED_CLOCK_NOTE, *notes])


def _step_curve(times: Sequence[float], accuracy: Sequence[float], grid: Sequence[float]) -> list[float]:
    out, j = [], 0
    for t in grid:
        while j + 1 < len(times) and times[j + 1] <= t:
            j += 1
        out.append(float(accuracy[j]))
    return out


def _fmt_ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


# --- tuning ------------------------------------------------------------------------------------

GRID_FACTOR = 3.0  # neighbouring grid values differ by this factor
TUNING_CRITERION = ("mean test accuracy over the budget (area under the accuracy-vs-simulated-time curve / budget), "
                    "mean over the tuning seeds; ties go to the smaller eta_g; a best value at an edge of the grid is "
                    "searched once more on a grid of the same size centred on it (the same rule for every arm)")
#: FedAST trains several models at once: every task's curve counts alike (the rest of the rule is the same)
FEDAST_CRITERION = "mean over the tasks of each task's " + TUNING_CRITERION


def eta_grid(reference: float, points: int) -> list[float]:
    """``points`` values of η_g, geometric with ratio GRID_FACTOR, centred on ``reference`` (4 significant digits)."""
    half = points // 2
    return [float(f"{reference * GRID_FACTOR ** k:.4g}") for k in range(-half, points - half)]


def mean_accuracy(history: History, budget: float) -> float:
    """The tuning criterion: the accuracy step curve's mean over [0, budget] (201 points), averaged over the
    history's models (one model in every experiment but FedAST's, whose tasks count alike)."""
    grid = np.linspace(0.0, budget, 201)
    return float(np.mean([np.mean(history.curve(grid, k)) for k in range(len(history.times))]))


def check_tune_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds or any(s < 100 for s in seeds):
        raise CatalogueError(f"tune_seeds={seeds}: tuning runs only on seeds >= 100 (evaluation seeds are 0..k-1)")
    return seeds


class Setting:
    """One seed's comparison at one operating point: the FedAvg baseline and the other arms, each built from η_g."""

    def __init__(self, arena: Arena, fedavg: Callable[[float], object], arms: dict[str, Callable[[float], object]],
                 suffix: str = ""):
        self.arena, self.fedavg, self.arms, self.suffix = arena, fedavg, arms, suffix

    def baseline(self, eta: float) -> tuple[object, History, float]:
        """FedAvg at ``eta``, run to its last round; its end time is every arm's budget."""
        strategy = self.fedavg(eta)
        history = self.arena.run(strategy, until=1e12)
        budget = history.end = history.times[0][-1]
        return strategy, history, budget

    def run(self, arm: str, eta: float, budget: float) -> tuple[object, History]:
        strategy = self.arms[arm](eta)
        return strategy, self.arena.run(strategy, until=budget, eval_interval=budget / EVALS_PER_BUDGET)


def tuning_record(config: dict, arms: Sequence[str], references: dict[str, float], suffixes: Sequence[str],
                  eta_of: Callable[[dict, str], object] | None = None, criterion: str = TUNING_CRITERION) -> dict:
    """What results.json records under ``tuning``: the η_g each arm ran with, its grid, the tuning seeds."""
    points = int(config["tune_points"])
    eta_of = eta_of or _eta
    record: dict = {}
    grid: dict = {}
    for index, suffix in enumerate(suffixes):
        for arm in arms:
            record[arm + suffix] = {"eta_g": _pick(eta_of(config, arm), index)}
            grid[arm + suffix] = {"eta_g": eta_grid(references[arm], points)}
    return {**record, "grid": grid, "seeds": check_tune_seeds(config["tune_seeds"]), "criterion": criterion}


def tuned_defaults(tuning: dict, arms: Sequence[str], suffixes: Sequence[str]) -> dict:
    """The config defaults a tuning result sets: eta_g_ARM, a list over the settings where there are several."""
    out = {}
    for arm in arms:
        values = [tuning[arm + suffix]["eta_g"] for suffix in suffixes]
        out["eta_g_" + arm.replace("-", "_")] = values if len(suffixes) > 1 else values[0]
    return out


def _eta(config: dict, arm: str):
    """η_g of ``arm`` in ``config``: key eta_g_ARM (hyphens as underscores); a list for per-setting arms."""
    return config["eta_g_" + arm.replace("-", "_")]


def tune_settings(settings_for_seed: Callable[[int, dict], list[Setting]], config: dict, arms: Sequence[str],
                  references: dict[str, float], progress, criterion: str = TUNING_CRITERION) -> dict:
    """Grid-search η_g per arm on the tuning seeds: {arm: {"eta_g": best}, "grid", "seeds", "scores", "criterion"}.

    ``arms`` are the base arm names, the synchronous baseline first (its run sets the budget). A setting with a
    suffix (an operating point such as fedbuff's C=10) is tuned separately: its arms are named ARM+suffix. Every arm
    gets the same budget:
    ``tune_points`` values of η_g around its reference on the same tuning seeds, and, where the best of them
    is at an edge of that grid, ``tune_points`` values around the best (the values not run yet), once.
    """
    seeds = check_tune_seeds(config["tune_seeds"])
    points = int(config["tune_points"])
    if points < 1:
        raise CatalogueError(f"tune_points={points}: need at least 1")
    scores: dict[str, dict[float, list[float]]] = {}
    baseline = arms[0]

    def search(grids: Callable[[str, str], list[float]]) -> None:
        for seed in seeds:
            for index, setting in enumerate(settings_for_seed(seed, config)):
                _, _, budget = setting.baseline(_pick(_eta(config, baseline), index))
                for arm in arms:
                    for eta in grids(arm, setting.suffix):
                        history = setting.baseline(eta)[1] if arm == baseline else setting.run(arm, eta, budget)[1]
                        scores.setdefault(arm + setting.suffix, {}).setdefault(eta, []).append(
                            mean_accuracy(history, budget))
                        progress.update()

    def best(name: str) -> float:
        by_eta = scores[name]
        return max(by_eta, key=lambda e: (float(np.mean(by_eta[e])), -e))

    settings = len(settings_for_seed(seeds[0], config))
    progress.set_total(len(seeds) * settings * len(arms) * points)
    search(lambda arm, suffix: eta_grid(references[arm], points))
    extra: dict[str, list[float]] = {}
    for name, by_eta in scores.items():
        first = sorted(by_eta)
        if points >= 3 and best(name) in (first[0], first[-1]):
            extra[name] = [e for e in eta_grid(best(name), points) if e not in by_eta]
    if extra:
        search(lambda arm, suffix: extra.get(arm + suffix, []))
    return {**{name: {"eta_g": best(name)} for name in scores},
            "grid": {name: {"eta_g": sorted(by_eta)} for name, by_eta in scores.items()}, "seeds": seeds,
            "scores": {name: {f"{e:g}": float(np.mean(v)) for e, v in sorted(by_eta.items())}
                       for name, by_eta in scores.items()},
            "criterion": criterion}


def _pick(value, index: int) -> float:
    return float(value[index]) if isinstance(value, (list, tuple)) else float(value)


# --- fedbuff -----------------------------------------------------------------------------------

FEDBUFF_ARMS = ("fedavg", "fedbuff", "fedasync")


def _concurrencies(config: dict) -> list[int]:
    cs = [int(c) for c in config["concurrencies"]]
    if len(cs) != 2 or cs[0] >= cs[1]:
        raise CatalogueError(f"concurrencies={config['concurrencies']}: expected two values, small then large")
    for arm in FEDBUFF_ARMS:
        value = _eta(config, arm)
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise CatalogueError(f"eta_g_{arm}={value!r}: expected two values, for C={cs[0]} then C={cs[1]}")
    return cs


def _fedbuff_suffixes(config: dict) -> list[str]:
    small, _ = _concurrencies(config)
    return [f"_c{small}", ""]


def _fedbuff_references(config: dict) -> dict[str, float]:
    # the paper scales at uniform p: FedAvg's full step, FedBuff's mean of K results (η_g·p_i = 1/K), FedAsync's
    # mixing 0.6 (η_g·p_i = 0.6)
    return {"fedavg": 1.0, "fedbuff": config["N"] / config["K"], "fedasync": 0.6 * config["N"]}


def _fedbuff_settings(seed: int, config: dict) -> list[Setting]:
    cs = _concurrencies(config)
    arena = Arena(seed, config["N"], config["alpha"], config["profile"], lr=config["lr"], batch=config["B"])
    n, q = arena.num_clients, config["Q"]
    settings = []
    for c, suffix in zip(cs, _fedbuff_suffixes(config)):
        settings.append(Setting(arena, lambda eta, c=c: FedAvg(
            arena.initial, n, cohort=c, steps=q, client_weights=arena.p, over_selection=config["o"], server_lr=eta,
            max_rounds=config["rounds"], seed=seed), {
            "fedbuff": lambda eta, c=c: FedBuff(
                arena.initial, n, buffer_size=config["K"], concurrency=c, steps=q, staleness_exponent=config["a"],
                server_lr=eta, server_momentum=config["server_momentum"], client_weights=arena.p, seed=seed),
            "fedasync": lambda eta, c=c: FedAsync(
                arena.initial, n, concurrency=c, steps=q, mixing=eta, staleness_exponent=config["a"],
                client_weights=arena.p, seed=seed),
        }, suffix))
    return settings


def tune_fedbuff(config: dict, progress) -> dict:
    tuning = tune_settings(_fedbuff_settings, config, FEDBUFF_ARMS, _fedbuff_references(config), progress)
    return {"tuning": tuning, "defaults": tuned_defaults(tuning, FEDBUFF_ARMS, _fedbuff_suffixes(config))}


def run_fedbuff(config: dict, seeds: list[int], progress) -> ExperimentResult:
    """FedBuff vs FedAvg (over-selection o) and FedAsync at C=100 and C=10 (Papaya's comparison)."""
    small, large = _concurrencies(config)
    record = tuning_record(config, FEDBUFF_ARMS, _fedbuff_references(config), _fedbuff_suffixes(config))
    progress.set_total(len(seeds) * 2)
    collect = Collector()
    for seed in seeds:
        for index, setting in enumerate(_fedbuff_settings(seed, config)):
            suffix = setting.suffix
            _, base, budget = setting.baseline(_pick(_eta(config, "fedavg"), index))
            target = 0.95 * base.final_accuracy()
            collect.add("fedavg" + suffix, {**arm_metrics(base, target), "budget": budget}, base)
            for arm in ("fedbuff", "fedasync"):
                _, history = setting.run(arm, _pick(_eta(config, arm), index), budget)
                collect.add(arm + suffix, arm_metrics(history, target), history)
            progress.update()
    speed: dict[int, str] = {}
    exact: dict[int, float] = {}
    bound: dict[int, float] = {}
    for c, suffix in ((small, f"_c{small}"), (large, "")):
        fedavg_times = collect.per_seed["fedavg" + suffix]["time_to_target"]
        fedbuff_times = collect.per_seed["fedbuff" + suffix]["time_to_target"]
        budgets = collect.per_seed["fedavg" + suffix]["budget"]
        missing = sum(math.isnan(t) for t in fedbuff_times)
        # a seed where fedbuff never reached the target: its speedup is not measured (nan); counting that run as
        # reaching the target at the budget gives an upper bound on the speedup
        collect.per_seed["fedbuff" + suffix][f"speedup_c{c}"] = [a / t if not math.isnan(t) else math.nan
                                                                 for a, t in zip(fedavg_times, fedbuff_times)]
        censored = [b if math.isnan(t) else t for t, b in zip(fedbuff_times, budgets)]
        bound[c] = float(np.mean(fedavg_times) / np.mean(censored))
        exact[c] = math.nan if missing else bound[c]
        speed[c] = (f"{bound[c]:.2f}×" if not missing else
                    f"not reached on {missing} of {len(seeds)} seeds: < {bound[c]:.2f}×")
    time_ratio = collect.ratio("fedbuff", "fedavg")
    transfer_ratio = collect.ratio("fedbuff", "fedavg", "transfers_to_target")
    goals = [
        Goal("time_to_target_vs_fedavg", time_ratio, 1 / 3, "<=",
             f"fedbuff / fedavg (o={config['o']}) simulated time to 0.95×fedavg's final accuracy at C={large}",
             reason="the buffered updates are too stale to outpace the rounds at this scale"),
        Goal("transfers_to_target_vs_fedavg", transfer_ratio, 0.5, "<=",
             f"fedbuff / fedavg downloads+uploads until the target at C={large}",
             reason="fedbuff needed more server updates than the over-selected rounds save"),
        # the small-C speedup enters as measured, or as its upper bound where fedbuff did not reach the target: the
        # difference is then a lower bound, so a PASS stands; an unreached large-C run gives nan (MISSED)
        Goal("speedup_grows_with_concurrency", exact[large] - bound[small], 0.0, ">",
             f"speedup at C={large} ({speed[large]}) minus speedup at C={small} ({speed[small]})",
             reason=("fedbuff did not reach the target at C={large} on every seed" if math.isnan(exact[large]) else
                     "concurrency did not help fedbuff more than fedavg")),
    ]
    notes = [f"budget per seed: fedavg's simulated time for {config['rounds']} rounds; target: 0.95 × fedavg's "
             f"final accuracy; speedup = fedavg time-to-target / fedbuff time-to-target (ratio of seed means); "
             f"speedup_c per seed is nan where fedbuff did not reach the target within the budget",
             f"arms with suffix _c{small} ran at C={small}; the others at C={large}"]
    result = collect.result(goals, f"FedBuff vs FedAvg (o={config['o']}) and FedAsync, N={config['N']}", notes)
    result.tuning = record
    return result


# --- favano ------------------------------------------------------------------------------------

FAVANO_ARMS = ("fedavg", "fedbuff", "favano", "favano-noreweight")
LATE_CLASSES = list(range(5, 10))


def _favano_references(config: dict) -> dict[str, float]:
    return {"fedavg": 1.0, "fedbuff": config["N"] / config["fedbuff_K"], "favano": 1.0, "favano-noreweight": 1.0}


def _favano_settings(seed: int, config: dict) -> list[Setting]:
    from .favano import FAVANO

    n, s, k = config["N"], config["s"], config["K"]
    if s > n:
        raise CatalogueError(f"s={s}: cannot exceed the number of clients N={n}")
    slow = slow_clients(n, seed)
    skew = class_skew(slow, LATE_CLASSES, config["slow_fraction"])
    arena = Arena(seed, n, config["alpha"], "two-class", lr=config["lr"], batch=config["B"], skew=skew)
    return [Setting(arena, lambda eta: FedAvg(arena.initial, n, cohort=s, steps=k, client_weights=arena.p,
                                              server_lr=eta, max_rounds=config["rounds"], seed=seed), {
        "fedbuff": lambda eta: FedBuff(arena.initial, n, buffer_size=config["fedbuff_K"], concurrency=s, steps=k,
                                       staleness_exponent=config["a"], server_lr=eta, client_weights=arena.p,
                                       seed=seed),
        "favano": lambda eta: FAVANO(arena.initial, n, sample_size=s, steps=k, period=config["period"],
                                     server_lr=eta, reweight=True, seed=seed),
        "favano-noreweight": lambda eta: FAVANO(arena.initial, n, sample_size=s, steps=k, period=config["period"],
                                                server_lr=eta, reweight=False, seed=seed),
    })]


def tune_favano(config: dict, progress) -> dict:
    tuning = tune_settings(_favano_settings, config, FAVANO_ARMS, _favano_references(config), progress)
    return {"tuning": tuning, "defaults": tuned_defaults(tuning, FAVANO_ARMS, [""])}


def run_favano(config: dict, seeds: list[int], progress) -> ExperimentResult:
    """FAVANO vs FedAvg (s clients, K steps each), FedBuff (C=s) and FAVANO without reweighting."""
    n, s, k = config["N"], config["s"], config["K"]
    if s > n:
        raise CatalogueError(f"s={s}: cannot exceed the number of clients N={n}")
    record = tuning_record(config, FAVANO_ARMS, _favano_references(config), [""])
    progress.set_total(len(seeds))
    collect = Collector()
    for seed in seeds:
        (setting,) = _favano_settings(seed, config)
        fedavg, base, budget = setting.baseline(_eta(config, "fedavg"))
        target = 0.95 * base.final_accuracy()
        runs = [("fedavg", fedavg, base)]
        for arm in FAVANO_ARMS[1:]:
            runs.append((arm, *setting.run(arm, _eta(config, arm), budget)))
        for name, strategy, history in runs:
            metrics = arm_metrics(history, target)
            metrics["accuracy_classes_5_9"] = setting.arena.accuracy_on(strategy.weights, LATE_CLASSES)
            metrics["accuracy_classes_0_4"] = setting.arena.accuracy_on(strategy.weights, range(5))
            collect.add(name, metrics, history)
        progress.update()
    time_ratio = collect.ratio("favano", "fedavg")
    final_gap = collect.mean("favano", "final_accuracy") - collect.mean("fedbuff", "final_accuracy")
    class_gap = collect.mean("favano", "accuracy_classes_5_9") - collect.mean("favano-noreweight",
                                                                              "accuracy_classes_5_9")
    goals = [
        Goal("time_to_target_vs_fedavg", time_ratio, 0.5, "<=",
             "favano / fedavg simulated time to 0.95×fedavg's final accuracy",
             reason="favano's partial updates did not reach the target twice as fast as the waiting rounds"),
        Goal("final_accuracy_minus_fedbuff", final_gap, -0.01, ">=",
             "favano − fedbuff final accuracy (goal: at most 1 point below)",
             reason="fedbuff's full-length updates beat favano's partial ones at the budget"),
        Goal("classes_5_9_reweight_minus_noreweight", class_gap, 0.0, ">=",
             "favano − favano-noreweight accuracy on classes 5–9 (held mostly by slow clients)",
             reason="reweighting did not remove the bias toward fast clients in this run"),
    ]
    notes = [f"budget per seed: fedavg's simulated time for {config['rounds']} rounds (s={s} clients, K={k} "
             f"steps each); two-class profile (half the clients 10× slower); slow clients hold "
             f"{config['slow_fraction']:.0%} of their labels in classes 5–9",
             "accuracy_classes_5_9 shows whether the reweighting removes the bias toward fast clients"]
    result = collect.result(goals, f"FAVANO vs FedAvg and FedBuff, N={n}, s={s}, K={k}", notes)
    result.tuning = record
    return result


# --- fedfix ------------------------------------------------------------------------------------

def _fedfix_periods(config: dict) -> list[float]:
    periods = [float(config["dt"])] + [float(p) for p in config["other_dts"]]
    etas = config["eta_g_fedfix"]
    if not isinstance(etas, (list, tuple)) or len(etas) != len(periods):
        raise CatalogueError(f"eta_g_fedfix={etas!r}: expected {len(periods)} values, one per Δt in "
                             f"{periods} (dt, then other_dts)")
    return periods


def _fedfix_names(config: dict) -> list[str]:
    return ["fedfix" if i == 0 else f"fedfix_dt{p:g}" for i, p in enumerate(_fedfix_periods(config))]


def _fedfix_arms(config: dict) -> list[str]:
    """The tuned arms: every FedFix period is an arm of its own (η_g scales a total weight of 1/Δt per unit time)."""
    return ["fedavg", *_fedfix_names(config), "async", "fedbuff"]


def _fedfix_eta(config: dict, arm: str) -> float:
    names = _fedfix_names(config)
    return float(config["eta_g_fedfix"][names.index(arm)]) if arm in names else _eta(config, arm)


def _fedfix_task_times(m: int) -> list[float]:
    return list(np.linspace(0.2, 1.0, m))


def _fedfix_references(config: dict) -> dict[str, float]:
    return {"fedavg": 1.0, **{name: 1.0 for name in _fedfix_names(config)}, "async": 1.0,
            "fedbuff": config["M"] / config["fedbuff_K"]}


def _fedfix_settings(seed: int, config: dict) -> list[Setting]:
    from .fedfix import FedFix, WeightedAsync

    m, q = config["M"], config["Q"]
    periods = _fedfix_periods(config)
    arena = Arena(seed, m, config["alpha"], "linear", lr=config["lr"], batch=config["B"], steps=q)
    p = [1.0 / m] * m  # the p_i = 1/M
    task_times = _fedfix_task_times(m)
    arms = {}
    for i, period in enumerate(periods):
        arms["fedfix" if i == 0 else f"fedfix_dt{period:g}"] = lambda eta, period=period: FedFix(
            arena.initial, m, period=period, task_times=task_times, steps=q, client_weights=p, server_lr=eta,
            seed=seed)
    arms["async"] = lambda eta: WeightedAsync(arena.initial, m, task_times=task_times, steps=q, client_weights=p,
                                              period=periods[0], server_lr=eta, seed=seed)
    arms["fedbuff"] = lambda eta: FedBuff(arena.initial, m, buffer_size=config["fedbuff_K"], concurrency=m, steps=q,
                                          staleness_exponent=0.0, server_lr=eta, client_weights=p, seed=seed)
    return [Setting(arena, lambda eta: FedAvg(arena.initial, m, cohort=m, steps=q, client_weights=p, server_lr=eta,
                                              max_rounds=config["rounds"], seed=seed), arms)]


def tune_fedfix(config: dict, progress) -> dict:
    arms = _fedfix_arms(config)
    tuning = tune_settings(_fedfix_settings, config, arms, _fedfix_references(config), progress)
    defaults = tuned_defaults(tuning, [a for a in arms if not a.startswith("fedfix")], [""])
    defaults["eta_g_fedfix"] = [tuning[name]["eta_g"] for name in _fedfix_names(config)]
    return {"tuning": tuning, "defaults": defaults}


def run_fedfix(config: dict, seeds: list[int], progress) -> ExperimentResult:
    """FedFix at Δt = 0.5 (and the other periods) vs FedAvg, weighted async and FedBuff."""
    m = config["M"]
    periods = _fedfix_periods(config)
    record = tuning_record(config, _fedfix_arms(config), _fedfix_references(config), [""], _fedfix_eta)
    progress.set_total(len(seeds))
    collect = Collector()
    for seed in seeds:
        (setting,) = _fedfix_settings(seed, config)
        _, base, budget = setting.baseline(_eta(config, "fedavg"))
        target = 0.95 * base.final_accuracy()
        runs = [("fedavg", base)]
        for arm in setting.arms:
            runs.append((arm, setting.run(arm, _fedfix_eta(config, arm), budget)[1]))
        for name, history in runs:
            metrics = arm_metrics(history, target)
            tail_grid = np.linspace(0.75 * budget, budget, 200)
            metrics["tail_accuracy_std"] = float(np.std(history.curve(tail_grid)))
            collect.add(name, metrics, history)
        progress.update()
    goals = [
        Goal("time_to_target_vs_fedavg", collect.ratio("fedfix", "fedavg"), 0.8, "<=",
             f"fedfix (Δt={periods[0]:g}) / fedavg simulated time to 0.95×fedavg's final accuracy",
             reason="the fixed clock did not beat waiting for the slowest client"),
        Goal("final_accuracy_minus_async", collect.mean("fedfix", "final_accuracy")
             - collect.mean("async", "final_accuracy"), 0.0, ">=", "fedfix − async final accuracy",
             reason="per-arrival asynchronous updates ended higher"),
        Goal("tail_std_vs_async", collect.ratio("fedfix", "async", "tail_accuracy_std"), 0.7, "<=",
             "fedfix / async std of accuracy over the last 25% of the budget",
             reason="the per-arrival updates, on the same total weight per unit time, fluctuate no more than "
                    "FedFix's ticks"),
    ]
    notes = [f"budget per seed: fedavg's simulated time for {config['rounds']} rounds (a round lasts the slowest "
             f"task, τ = 1); task times τ_i linearly spaced 0.2…1 with ±10% jitter; p_i = 1/M",
             f"fedfix arms: Δt = {', '.join(f'{p:g}' for p in periods)} (the first is the goal's), each with its "
             "own tuned η_g",
             _async_weight_note(_fedfix_task_times(m), periods[0], m)]
    result = collect.result(goals, f"FedFix vs FedAvg, async and FedBuff, M={m}", notes)
    result.tuning = record
    return result


def _async_weight_note(task_times: list[float], period: float, m: int) -> str:
    """How much total update weight per unit time each arm applies (FedAvg = 1 per round of τ = 1)."""
    d = [t / period / m for t in task_times]
    original = sum(1.0 / t for t in task_times)
    return (f"total update weight per unit of simulated time at η_g = 1 (each Δ_i counted by its weight; FedAvg: "
            f"Σp_i = 1 per round of max τ = 1): fedfix (Δt={period:g}) Σ_i ceil(τ_i/Δt)·p_i / (ceil(τ_i/Δt)·Δt) = "
            f"1/Δt = {1 / period:.1f}×; async d_i = (τ_i/Δt)·p_i ∈ [{min(d):.3f}, {max(d):.3f}], Σ_i d_i/τ_i = "
            f"1/Δt, the same (issue 24 normalised it: the first statement's d_i = (Σ_j 1/τ_j)·τ_i·p_i applied "
            f"{original:.1f}× FedAvg's weight per unit time and the arm collapsed to chance)")


# --- fedcompass --------------------------------------------------------------------------------

FEDCOMPASS_ARMS = ("fedavg", "fedasync", "fedbuff", "fedcompass")


def _fedcompass_references(config: dict) -> dict[str, float]:
    return {"fedavg": 1.0, "fedasync": 0.6 * config["N"], "fedbuff": config["N"] / config["fedbuff_K"],
            "fedcompass": 1.0}


def _fedcompass_settings(seed: int, config: dict) -> list[Setting]:
    from .fedcompass import FedCompass

    n, qmax = config["N"], config["Qmax"]
    qmin = max(1, math.floor(config["Qmin_fraction"] * qmax))
    arena = Arena(seed, n, config["alpha"], "exponential", lr=config["lr"], batch=config["B"])
    return [Setting(arena, lambda eta: FedAvg(arena.initial, n, cohort=n, steps=qmax, client_weights=arena.p,
                                              server_lr=eta, max_rounds=config["rounds"], seed=seed), {
        "fedasync": lambda eta: FedAsync(arena.initial, n, concurrency=n, steps=qmax, mixing=eta,
                                         staleness_exponent=config["a"], client_weights=arena.p, seed=seed),
        "fedbuff": lambda eta: FedBuff(arena.initial, n, buffer_size=config["fedbuff_K"], concurrency=n, steps=qmax,
                                       staleness_exponent=config["a"], server_lr=eta, client_weights=arena.p,
                                       seed=seed),
        "fedcompass": lambda eta: FedCompass(arena.initial, n, client_weights=arena.p, max_steps=qmax,
                                             min_steps=qmin, latest_factor=config["lambda"],
                                             staleness_exponent=config["a"], server_lr=eta, seed=seed),
    })]


def tune_fedcompass(config: dict, progress) -> dict:
    tuning = tune_settings(_fedcompass_settings, config, FEDCOMPASS_ARMS, _fedcompass_references(config), progress)
    return {"tuning": tuning, "defaults": tuned_defaults(tuning, FEDCOMPASS_ARMS, [""])}


def run_fedcompass(config: dict, seeds: list[int], progress) -> ExperimentResult:
    """FedCompass vs FedAvg (Q = Qmax, all clients), FedAsync and FedBuff on exponential client speeds."""
    n, qmax = config["N"], config["Qmax"]
    qmin = max(1, math.floor(config["Qmin_fraction"] * qmax))
    record = tuning_record(config, FEDCOMPASS_ARMS, _fedcompass_references(config), [""])
    progress.set_total(len(seeds))
    collect = Collector()
    group_weights: list[float] = []
    for seed in seeds:
        (setting,) = _fedcompass_settings(seed, config)
        _, base, budget = setting.baseline(_eta(config, "fedavg"))
        target = 0.95 * base.final_accuracy()
        collect.add("fedavg", arm_metrics(base, target), base)
        for arm in FEDCOMPASS_ARMS[1:]:
            strategy, history = setting.run(arm, _eta(config, arm), budget)
            collect.add(arm, arm_metrics(history, target), history)
            if arm == "fedcompass":
                p = setting.arena.p
                group_weights += [sum(p[c] for c in group.members) for group in strategy.groups[1:]
                                  if not group.open]
        progress.update()
    best_async = min(collect.mean("fedasync", "time_to_target"), collect.mean("fedbuff", "time_to_target"))
    compass = collect.mean("fedcompass", "time_to_target")
    goals = [
        Goal("time_to_target_vs_best_async", compass / best_async if best_async else math.nan, 0.9, "<=",
             "fedcompass / min(fedasync, fedbuff) simulated time to 0.95×fedavg's final accuracy",
             reason="grouping by speed did not beat the best asynchronous baseline here"),
        Goal("time_to_target_vs_fedavg", collect.ratio("fedcompass", "fedavg"), 0.6, "<=",
             "fedcompass / fedavg simulated time to target",
             reason="fedcompass was not fast enough against the synchronous rounds"),
        Goal("final_accuracy_minus_best_async", collect.mean("fedcompass", "final_accuracy")
             - max(collect.mean("fedasync", "final_accuracy"), collect.mean("fedbuff", "final_accuracy")),
             -0.005, ">=", "fedcompass − max(fedasync, fedbuff) final accuracy (goal: at most 0.5 point below)",
             reason="an asynchronous baseline ended higher"),
    ]
    spread = (f"; a group's members hold Σp = {np.median(group_weights):.2f} of the data (median over the "
              f"aggregated groups after the first; range {min(group_weights):.2f}–{max(group_weights):.2f})"
              if group_weights else "")
    notes = [f"budget per seed: fedavg's simulated time for {config['rounds']} rounds (all N={n} clients, "
             f"Q=Qmax={qmax}); Qmin={qmin}, λ={config['lambda']}; step times ~ Exp(1) clipped to [0.05, 20]",
             "fedcompass's initial group (all clients, Qmax steps) gets its deadline at its first arrival: "
             "λ × that arrival time (the paper leaves the first round open)" + spread]
    result = collect.result(goals, f"FedCompass vs FedAvg, FedAsync and FedBuff, N={n}", notes)
    result.tuning = record
    return result


# --- fedast ------------------------------------------------------------------------------------

#: FedAST's three tasks (issue 12): (name, layer sizes, cost κ, labels: "digit" or "parity")
FEDAST_TASKS = [("digits-mlp32", [64, 32, 10], 1.0, "digit"),
                ("digits-mlp128", [64, 128, 10], 3.0, "digit"),
                ("parity-logreg", [64, 2], 1.0, "parity")]


FEDAST_ARMS = ("sync-st", "async-st", "fedast-static", "fedast")
ASYNC_ST_ARMS = FEDAST_ARMS[1:]


def _fedast_tasks(config: dict) -> list:
    from .fedast import check_tasks

    n, r, g, m = config["N"], config["R"], config["g"], config["M"]
    check_tasks(m, r, g)
    if m > len(FEDAST_TASKS):
        raise CatalogueError(f"M={m}: this experiment has {len(FEDAST_TASKS)} tasks (M in 1..{len(FEDAST_TASKS)})")
    return FEDAST_TASKS[:m]


def _fedast_references(config: dict) -> dict[str, float]:
    # a full step of the mean update for sync-st (its round's p-weighted mean) and for the buffered arms (the mean
    # of a buffer); async-st applies every result alone, so its reference gives one result the weight it has in
    # fedast-static's buffer of b = ceil((R/M)/g) results
    b = math.ceil(config["R"] / config["M"] / config["g"])
    return {"sync-st": 1.0, "async-st": 1.0 / b, "fedast-static": 1.0, "fedast": 1.0}


class FedASTSetting:
    """One seed of the FedAST experiment: the tasks' data and initial models, each arm built from its η_g.

    Quacks like :class:`Setting` for :func:`tune_settings` (baseline: sync-st, run for its rounds; run: an
    asynchronous arm to the budget with no task stopped); :meth:`simulate` with ``targets`` stops each task at its
    target, as the experiment's runs do.
    """

    suffix = ""

    def __init__(self, seed: int, config: dict):
        torch.set_num_threads(1)
        self.seed, self.config = seed, config
        self.tasks = _fedast_tasks(config)
        digits = federated_digits(seed, config["N"], config["alpha"])
        parity = digits.relabel(digits.y_train % 2, digits.y_test % 2)
        self.client_weights = digits.weights
        self.datasets = [digits if labels == "digit" else parity for _, _, _, labels in self.tasks]
        self.initial = [flatten(mlp(sizes, seed)) for _, sizes, _, _ in self.tasks]

    def strategy(self, arm: str, eta: float):
        from .fedast import FedAST, SyncST

        c = self.config
        if arm == "sync-st":
            return SyncST(self.initial, c["N"], cohort=c["R"] // c["M"], steps=c["Q"],
                          client_weights=self.client_weights, server_lr=eta, max_rounds=c["rounds"], seed=self.seed)
        kind = {"async-st": dict(buffered=False, reallocate=False), "fedast-static": dict(reallocate=False),
                "fedast": {}}[arm]
        return FedAST(self.initial, c["N"], in_flight=c["R"], granularity=c["g"], steps=c["Q"], server_lr=eta,
                      seed=self.seed, **kind)

    def simulate(self, strategy, until: float, targets: list[float] | None = None,
                 eval_interval: float = 0.0) -> History:
        c = self.config
        trainers = [BatchedMLPSGD(sizes, data, lr=c["lr"], batch=c["B"], seed=self.seed)
                    for (_, sizes, _, _), data in zip(self.tasks, self.datasets)]
        profile = make_profile("shifted-exp", c["N"], self.seed, task_costs=[kappa for _, _, kappa, _ in self.tasks])

        def evaluate(k: int, weights: torch.Tensor) -> float:
            accuracy = trainers[k].accuracy(weights, self.datasets[k].x_test, self.datasets[k].y_test)
            if targets is not None and accuracy >= targets[k]:
                strategy.finish(k)  # a task that reached its target stops and releases its quota
            return accuracy

        return Simulation(strategy, trainers, profile, evaluate, eval_interval=eval_interval).run(until)

    def baseline(self, eta: float) -> tuple[object, History, float]:
        """sync-st at ``eta`` for its rounds; its end (the last task's last round) is every arm's budget."""
        strategy = self.strategy("sync-st", eta)
        history = self.simulate(strategy, until=1e12)
        budget = history.end = max(times[-1] for times in history.times)
        return strategy, history, budget

    def run(self, arm: str, eta: float, budget: float) -> tuple[object, History]:
        strategy = self.strategy(arm, eta)
        return strategy, self.simulate(strategy, until=budget, eval_interval=budget / EVALS_PER_BUDGET)


def _fedast_settings(seed: int, config: dict) -> list[FedASTSetting]:
    return [FedASTSetting(seed, config)]


def tune_fedast(config: dict, progress) -> dict:
    tuning = tune_settings(_fedast_settings, config, FEDAST_ARMS, _fedast_references(config), progress,
                           FEDAST_CRITERION)
    return {"tuning": tuning, "defaults": tuned_defaults(tuning, FEDAST_ARMS, [""])}


def run_fedast(config: dict, seeds: list[int], progress) -> ExperimentResult:
    """FedAST vs sync-st, async-st and fedast-static: time until every task reaches its target."""
    from .fedast import FedAST

    n, r, g, m = config["N"], config["R"], config["g"], config["M"]
    tasks = _fedast_tasks(config)
    names = [t[0] for t in tasks]
    record = tuning_record(config, FEDAST_ARMS, _fedast_references(config), [""], criterion=FEDAST_CRITERION)
    progress.set_total(len(seeds) * 8)
    per_seed: dict[str, dict[str, list[float]]] = {}
    runs: dict[str, list[History]] = {}
    for seed in seeds:
        setting = FedASTSetting(seed, config)
        sync, base, budget = setting.baseline(_eta(config, "sync-st"))
        targets = [0.95 * base.final_accuracy(k) for k in range(m)]
        near = [config["near_target"] * base.final_accuracy(k) for k in range(m)]
        progress.update()

        def asynchronous(arm: str):
            return setting.strategy(arm, _eta(config, arm))

        arms = {"sync-st": (sync, base), **{arm: (asynchronous(arm), None) for arm in ASYNC_ST_ARMS}}
        for arm in ASYNC_ST_ARMS:
            # the near-converged target: the same run, but a task stops (and releases its quota) only at
            # near_target × sync-st's final accuracy, so reallocation has the late phase to act in
            strategy = asynchronous(arm)
            # every model change is evaluated, so a task finishes at the first update that reaches its target
            history = setting.simulate(strategy, until=budget, targets=near)
            near_times = [history.time_to(near[k], k) for k in range(m)]
            per_seed.setdefault(arm, {}).setdefault("time_all_tasks_near", []).append(
                math.nan if any(math.isnan(t) for t in near_times) else max(near_times))
            for k, name in enumerate(names):
                per_seed[arm].setdefault(f"time_near_{name}", []).append(near_times[k])
            if isinstance(strategy, FedAST) and strategy.reallocate:
                per_seed[arm].setdefault("reallocations_near", []).append(len(strategy.reallocations))
            per_seed[arm].setdefault("budget", []).append(budget)
            progress.update()
        # report-only: fedast at fedast-static's η_g, so that the quotas are the only difference between the two
        equal = setting.strategy("fedast", _eta(config, "fedast-static"))
        history = setting.simulate(equal, until=budget, targets=near)
        near_times = [history.time_to(near[k], k) for k in range(m)]
        per_seed["fedast"].setdefault("time_all_tasks_near_at_static_eta", []).append(
            math.nan if any(math.isnan(t) for t in near_times) else max(near_times))
        progress.update()
        for arm, (strategy, history) in arms.items():
            if history is None:
                history = setting.simulate(strategy, until=budget, targets=targets)
                progress.update()
            task_times = [history.time_to(targets[k], k) for k in range(m)]
            all_done = math.nan if any(math.isnan(t) for t in task_times) else max(task_times)
            last = int(np.argmax(task_times)) if not math.isnan(all_done) else 0
            metrics = {"time_all_tasks": all_done, "time_to_target": all_done,
                       "transfers_to_target": history.transfers_at(all_done, last),
                       "final_accuracy": float(np.mean([history.final_accuracy(k) for k in range(m)]))}
            for k, name in enumerate(names):
                metrics[f"time_{name}"] = task_times[k]
            if isinstance(strategy, FedAST):
                metrics["reallocations"] = len(strategy.reallocations)
                metrics["dropped_results"] = strategy.dropped
            row = per_seed.setdefault(arm, {})
            for key, value in metrics.items():
                row.setdefault(key, []).append(float(value))
            runs.setdefault(arm, []).append(history)

    def mean(arm: str, metric: str) -> float:
        values = per_seed[arm][metric]
        return math.nan if any(math.isnan(v) for v in values) else float(np.mean(values))

    ratio = mean("fedast", "time_all_tasks") / mean("sync-st", "time_all_tasks")
    goals = [Goal("time_all_tasks_vs_sync_st", ratio, 0.75, "<=",
                  "fedast / sync-st simulated time until all M tasks reach 0.95 × sync-st's final accuracy "
                  "(paper: up to 46% less)",
                  reason="buffered asynchronous training with reallocated quotas did not finish all tasks 25% "
                         "sooner than concurrent synchronous rounds")]
    # near-converged target (issue 24): adaptive quotas against fixed ones and against unbuffered async. A
    # baseline that never reaches it within the budget counts as reaching it at the budget, which makes its time a
    # lower bound and fedast's ratio to it an upper bound (a PASS stands); fedast itself must reach it on every seed
    fedast_near = mean("fedast", "time_all_tasks_near")
    # the report-only run: fedast at fedast-static's η_g, where the quotas are the only difference
    static_near = mean("fedast-static", "time_all_tasks_near")
    equal_near = mean("fedast", "time_all_tasks_near_at_static_eta")
    generic = "moving quotas toward the noisiest task did not shorten the late phase by 10%"
    if math.isnan(static_near) or math.isnan(equal_near):
        static_reason = f"{generic} at the tuned η_g"
    elif equal_near / static_near <= 0.9:  # the step sizes, not the quotas, decide the goal: say so first
        static_reason = (f"the tuned server steps differ (η_g fedast {_eta(config, 'fedast'):g}, fedast-static "
                         f"{_eta(config, 'fedast-static'):g}), and at fedast-static's η_g fedast takes "
                         f"{equal_near / static_near:.3f}× its time (the quotas alone would pass)")
    else:
        static_reason = (f"{generic} even at one η_g (at fedast-static's {_eta(config, 'fedast-static'):g}, fedast "
                         f"takes {equal_near / static_near:.3f}× its time)")
    near_counts = {}
    for baseline in ("fedast-static", "async-st"):
        times, budgets = per_seed[baseline]["time_all_tasks_near"], per_seed[baseline]["budget"]
        near_counts[baseline] = sum(not math.isnan(t) for t in times)
        censored = float(np.mean([b if math.isnan(t) else t for t, b in zip(times, budgets)]))
        reached = near_counts[baseline]
        goals.append(Goal(f"near_target_vs_{baseline.replace('-', '_')}", fedast_near / censored, 0.9, "<=",
                          f"fedast / {baseline} simulated time until all tasks reach {config['near_target']:g} × "
                          f"sync-st's final accuracy ({baseline} reached it on {reached} of {len(seeds)} seeds"
                          + ("" if reached == len(seeds) else "; unreached seeds count at the budget") + ")",
                          reason=("fedast did not reach the near-converged target on every seed"
                                  if math.isnan(fedast_near) else static_reason if baseline == "fedast-static" else
                                  f"{generic} at the tuned η_g (fedast {_eta(config, 'fedast'):g}, {baseline} "
                                  f"{_eta(config, baseline):g})")))
    end = max(h.end for hs in runs.values() for h in hs)
    grid = list(np.linspace(0.0, end, CURVE_POINTS))
    panels, extra = [], {}
    for k, name in enumerate(names):
        series = {arm: Series(x=grid, y=[_step_curve(list(h.times[k]) + [h.end], list(h.accuracy[k])
                                                     + [h.accuracy[k][-1]], grid) for h in hs])
                  for arm, hs in runs.items()}
        panels.append({"title": f"task {name} (κ={tasks[k][2]:g})", "xlabel": "simulated time",
                       "ylabel": "test accuracy", "series": series})
    for arm, hs in runs.items():
        by_task = {name: [_step_curve(list(h.times[k]) + [h.end], list(h.accuracy[k]) + [h.accuracy[k][-1]], grid)
                          for h in hs] for k, name in enumerate(names)}
        mean_curve = [list(np.mean([by_task[name][s] for name in names], axis=0)) for s in range(len(hs))]
        extra[arm] = {"curves": {"time": [float(t) for t in grid], "accuracy": mean_curve,
                                 "accuracy_by_task": by_task}}
    notes = [SIMULATED_CLOCK_NOTE,
             f"tasks: {', '.join(f'{name} (κ={kappa:g})' for name, _, kappa, _ in tasks)}; all on the same N={n} "
             f"clients and Dirichlet({config['alpha']}) split (parity = label mod 2)",
             f"target per seed and task: 0.95 × sync-st's final accuracy after {config['rounds']} rounds per task "
             f"(R/M = {r // m} clients of its N/M share per round); the budget of every arm is sync-st's "
             f"simulated time; a task that reaches its target stops (its in-flight results are dropped) and "
             f"releases its quota",
             f"choices the issue leaves open: Q = {config['Q']} local steps per job, Dirichlet α = "
             f"{config['alpha']}, sync-st's budget = {config['rounds']} rounds per task; async-st and "
             f"fedast-static re-split R equally over the unfinished tasks when one finishes",
             "final_accuracy is the mean over tasks (asynchronous arms stop training a task at its target)",
             f"time_all_tasks_near: a second run of each asynchronous arm in which a task stops only at "
             f"{config['near_target']:g} × sync-st's final accuracy (nan: not reached within the budget on that "
             f"seed), with time_near_TASK each task's time in that run; sync-st itself ends at 1.0 × by definition",
             f"time_all_tasks_near_at_static_eta (report-only, fedast's row): fedast's near-target run at "
             f"fedast-static's η_g ({_eta(config, 'fedast-static'):g}), so that only the quotas differ",
             "η_g per arm (tuned): sync-st η_g·Σ_S p_iΔ_i/Σ_S p_i per task round; fedast and fedast-static η_g·mean "
             "of a task's b_m buffered results; async-st η_g·Δ per result"]
    plot = Plot(panels=panels, title=f"FedAST vs sync-st, async-st, fedast-static (M={m}, N={n}, R={r}, g={g})")
    result = ExperimentResult(per_seed=per_seed, goals=goals, plot=plot, extra=extra, notes=notes)
    result.tuning = record
    return result
