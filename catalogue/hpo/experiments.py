"""The hpo family's miniatures: ``idhb`` (ID-Hyperband against Hyperband and a rerun) and
``aegis`` (asynchronous epsilon-greedy BO against asynchronous baselines)."""

from __future__ import annotations

from ..frame import CatalogueError, ExperimentResult, Goal, Plot, Series, map_in_processes, require_extra

require_extra("hpo", "numpy")

import numpy as np  # noqa: E402


# ---------------------------------------------------------------------------------------
# idhb
# ---------------------------------------------------------------------------------------
def _anytime(trace: list[tuple[float, float]], grid: np.ndarray) -> list[float]:
    """Step function: the last value of ``trace`` (cost, value) at or before each grid cost (nan before any)."""
    out, index, current = [], 0, float("nan")
    for c in grid:
        while index < len(trace) and trace[index][0] <= c:
            current = trace[index][1]
            index += 1
        out.append(current)
    return out


def _drive(scheduler, objective, g, trace, offset=0.0):
    """Run ``scheduler`` to the end; append (cumulative cost, true g of the incumbent) after each tell."""
    spent = offset
    while (job := scheduler.ask()) is not None:
        scheduler.tell(job, objective(job.params, job.budget))
        spent += job.budget
        trace.append((spent, g(objective.point(scheduler.incumbent()[1]))))
    if not scheduler.finished:
        raise RuntimeError("a Hyperband run stopped with unfinished brackets")
    return spent


_LABEL = {"eid": "eID-HB", "cid": "cID-HB", "dcid": "dcID-HB"}


def run_idhb(config: dict, seeds: list[int], progress) -> ExperimentResult:
    from .hyperband import Hyperband, IDHyperband
    from .learning_curves import LearningCurves, final_loss, sample_unit_cube

    eta, r_min, first, noise = config["eta"], config["r_min"], config["first_max_budget"], config["noise"]
    try:
        Hyperband(sample_unit_cube, eta=eta, r_min=r_min, max_budget=first)
    except ValueError as exc:
        raise CatalogueError(str(exc)) from None
    second = first * eta
    arms = ["hb-27", "hb-81", "rerun", "eid-hb", "cid-hb", "dcid-hb"]
    per_seed = {arm: {"cost": [], "incumbent_g": []} for arm in arms}
    for arm in ("eid-hb", "cid-hb", "dcid-hb"):
        per_seed[arm].update(first_run_reused=[], repeated_pairs=[])
    traces: dict[str, list] = {arm: [] for arm in arms}
    progress.set_total(len(seeds))
    for seed in seeds:
        objective = LearningCurves(seed, noise)
        g = final_loss
        hb_first, trace_first = Hyperband(sample_unit_cube, eta, r_min, first, seed=[seed, 0]), []
        cost_first = _drive(hb_first, objective, g, trace_first)
        hb_second, trace_second = Hyperband(sample_unit_cube, eta, r_min, second, seed=[seed, 1]), []
        cost_second = _drive(hb_second, objective, g, trace_second)
        for arm, sched, cost, trace in (("hb-27", hb_first, cost_first, trace_first),
                                        ("hb-81", hb_second, cost_second, trace_second)):
            per_seed[arm]["cost"].append(cost)
            per_seed[arm]["incumbent_g"].append(g(objective.point(sched.incumbent()[1])))
            traces[arm].append(trace)
        per_seed["rerun"]["cost"].append(cost_first + cost_second)
        per_seed["rerun"]["incumbent_g"].append(g(objective.point(hb_second.incumbent()[1])))
        traces["rerun"].append(trace_first + [(c + cost_first, v) for c, v in trace_second])
        for variant in ("eid", "cid", "dcid"):
            arm = f"{variant}-hb"
            # same seed as hb-27: the first run is the same run, then it is extended
            sched, trace = IDHyperband(sample_unit_cube, eta, r_min, first, variant=variant, seed=[seed, 0]), []
            spent = _drive(sched, objective, g, trace)
            first_pairs = set(sched.evaluated)
            sched.extend()
            _drive(sched, objective, g, trace, offset=spent)
            evaluated = sched.evaluated
            later = evaluated[len(first_pairs):]
            per_seed[arm]["cost"].append(sched.cost)
            per_seed[arm]["incumbent_g"].append(g(objective.point(sched.incumbent()[1])))
            per_seed[arm]["first_run_reused"].append(1.0 - len(first_pairs & set(later)) / len(first_pairs))
            per_seed[arm]["repeated_pairs"].append(float(len(evaluated) - len(set(evaluated))))
            traces[arm].append(trace)
        progress.update()

    def median(arm, metric):
        return float(np.median(per_seed[arm][metric]))

    hb81_cost = median("hb-81", "cost")
    rerun_cost = median("rerun", "cost")
    goals = [Goal("eid_cost_equals_hb81", float(np.max(np.abs(np.subtract(per_seed["eid-hb"]["cost"],
                                                                           per_seed["hb-81"]["cost"])))),
                  0.0, "<=", f"largest |eID-HB cost - HB({second:g}) cost| over seeds (HB({second:g}) = {hb81_cost:g})",
                  reason="the extension evaluated pairs Hyperband at eta R would not")]
    # cost goals on the seed mean (the number results.json reports); the worst seed is in the description
    for variant in ("cid", "dcid"):
        costs = per_seed[f"{variant}-hb"]["cost"]
        goals.append(Goal(f"{variant}_cost_vs_hb81", float(np.mean(costs)) / hb81_cost, 1.05, "<=",
                          f"{_LABEL[variant]} mean cost / HB({second:g}) cost; worst seed {max(costs) / hb81_cost:.3f}",
                          reason="re-ranking promoted configurations that earlier promotions would have covered"))
    for variant in ("eid", "cid", "dcid"):
        costs = per_seed[f"{variant}-hb"]["cost"]
        goals.append(Goal(f"{variant}_cost_vs_rerun", float(np.mean(costs)) / rerun_cost, 0.85, "<=",
                          f"{_LABEL[variant]} mean cost / rerun cost (rerun = {rerun_cost:g}); "
                          f"worst seed {max(costs) / rerun_cost:.3f}",
                          reason="not enough of the first run was reusable"))
    reused = min(min(per_seed[f"{v}-hb"]["first_run_reused"]) for v in ("eid", "cid", "dcid"))
    goals.append(Goal("first_run_fully_reused", reused, 1.0, ">=",
                      "smallest fraction of first-run (config, budget) pairs never evaluated again",
                      reason="a pair was evaluated twice"))
    # one-sided (issue 24): ID-HB must not find a worse configuration than HB(eta R) by more than 0.01 in g; a
    # better one passes (the two arms sample different configurations, so the medians differ by sampling spread)
    for variant in ("eid", "cid", "dcid"):
        gap = median(f"{variant}-hb", "incumbent_g") - median("hb-81", "incumbent_g")
        goals.append(Goal(f"{variant}_incumbent_vs_hb81", gap, 0.01, "<=",
                          f"median true g of the final incumbent - HB({second:g})'s over {len(seeds)} seeds "
                          "(lower is better; negative = ID-HB better)",
                          reason="ID-HB's incumbent is worse than HB(eta R)'s by more than the sampling spread "
                                 "allows; see per-seed incumbent_g"))

    start = max(t[0][0] for arm in arms for t in traces[arm])  # every arm has an incumbent from here on
    grid = np.linspace(start, float(max(per_seed["rerun"]["cost"])), 200)
    series = {arm: Series(list(map(float, grid)), [_anytime(t, grid) for t in traces[arm]])
              for arm in ("hb-81", "rerun", "eid-hb", "cid-hb", "dcid-hb")}
    plot = Plot(title="ID-Hyperband: true final loss g of the incumbent against budget spent", panels=[
        {"title": f"extend R {first:g} -> {second:g} (seed mean, min-max band)", "xlabel": "cumulative budget",
         "ylabel": "g(incumbent)", "series": series}])
    notes = [
        "budgets are abstract units; cost = sum of budgets evaluated, no clock involved",
        "synthetic learning curves loss(x, r) = g(x) + a(x) r^-b(x) + N(0, 0.002^2), noise fixed per (seed, x, r)",
        "eID/cID/dcID-HB start from the same configurations as hb-27 (same sampler seed); hb-81 and the rerun's "
        "second half draw their own",
        "medians of incumbent_g: " + ", ".join(f"{arm} {median(arm, 'incumbent_g'):.4f}" for arm in arms),
    ]
    return ExperimentResult(per_seed=per_seed, goals=goals, plot=plot, notes=notes)


# ---------------------------------------------------------------------------------------
# aegis
# ---------------------------------------------------------------------------------------
AEGIS_ARMS = ("aegis", "random", "kb-ei", "local-penalisation", "thompson", "gp-sampler")


def _make_sampler(arm: str, seed: int, d: int, workers: int, config: dict):
    import optuna

    from .aegis import AEGiSSampler
    from .baselines import KrigingBelieverSampler, LocalPenalisationSampler

    common = dict(n_startup_trials=2 * d, seed=seed, refit_every=config["refit_every"])
    budget = dict(num_restarts=config["num_restarts"], raw_samples=config["raw_samples"])
    if arm in ("aegis", "aegis-1worker"):
        return AEGiSSampler(n_workers=workers, **common, **budget)
    if arm == "thompson":
        return AEGiSSampler(n_workers=workers, probabilities=(0.0, 1.0, 0.0), **common, **budget)
    if arm in ("kb-ei", "logei-sequential"):
        return KrigingBelieverSampler(**common, **budget)
    if arm == "local-penalisation":
        return LocalPenalisationSampler(**common, **budget)
    if arm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if arm == "gp-sampler":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=2 * d)
    raise CatalogueError(f"arm {arm!r}: unknown; expected one of {', '.join(AEGIS_ARMS)}")


def simulate_workers(sampler, objective, d: int, workers: int, evaluations: int, seed: int) -> list[float]:
    """Asynchronous ask/tell with ``workers`` simulated workers; job times half-normal with mean 1.

    Returns the best loss after each completed evaluation. The durations come from a generator
    seeded by ``seed`` alone, so every arm sees the same sequence of job times.
    """
    import heapq
    import math

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler, direction="minimize")
    space = {f"x{i}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(d)}
    durations = np.random.default_rng([seed, 31])
    events: list = []
    asked = 0

    def launch(now: float) -> None:
        nonlocal asked
        trial = study.ask(space)
        value = objective([trial.params[f"x{i}"] for i in range(d)])
        finish = now + abs(durations.normal(0.0, math.sqrt(math.pi / 2)))  # half-normal, mean 1
        heapq.heappush(events, (finish, trial.number, trial, value))
        asked += 1

    for _ in range(min(workers, evaluations)):
        launch(0.0)
    best, curve = math.inf, []
    while events:
        now, _, trial, value = heapq.heappop(events)
        study.tell(trial, value)
        best = min(best, value)
        curve.append(best)
        if asked < evaluations:
            launch(now)
    return curve


def _aegis_task(task):
    import warnings

    import torch

    from .benchmarks import PROBLEMS

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # botorch's numerical-conditioning and optimisation warnings
    arm, problem, seed, workers, config = task
    objective, d, minimum = PROBLEMS[problem]
    evaluations = config[f"evaluations_{problem}"]
    curve = simulate_workers(_make_sampler(arm, seed, d, workers, config), objective, d, workers, evaluations, seed)
    return arm, problem, seed, [float(np.log10(max(b - minimum, 1e-12))) for b in curve]


def run_aegis(config: dict, seeds: list[int], progress) -> ExperimentResult:
    if config["workers"] < 1 or config["processes"] < 1:
        raise CatalogueError(f"workers={config['workers']}, processes={config['processes']}: need >= 1")
    arms = [a for a in config["arms"]]
    unknown = set(arms) - set(AEGIS_ARMS)
    if unknown:
        raise CatalogueError(f"arms: unknown {sorted(unknown)}; expected some of {', '.join(AEGIS_ARMS)}")
    tasks = [(arm, problem, s, config["workers"], config) for problem in ("branin", "hartmann6") for arm in arms
             for s in seeds]
    if config["one_worker_check"]:
        tasks += [(arm, "hartmann6", s, 1, config) for arm in ("aegis-1worker", "logei-sequential") for s in seeds]
    progress.set_total(len(tasks))
    curves: dict = {}
    for arm, problem, seed, curve in map_in_processes(_aegis_task, tasks, config["processes"], progress):
        curves.setdefault(arm, {}).setdefault(problem, {})[seed] = curve
    per_seed = {arm: {f"log10_regret_{problem}": [curves[arm][problem][s][-1] for s in seeds]
                      for problem in curves[arm]} for arm in curves}

    def median(arm, problem):
        return float(np.median(per_seed[arm][f"log10_regret_{problem}"]))

    goals = []
    n_eval = {p: config[f"evaluations_{p}"] for p in ("branin", "hartmann6")}
    thompson_note = (f" (Thompson-only: median {median('thompson', 'hartmann6'):.2f})" if "thompson" in per_seed
                     else "")
    if {"aegis", "kb-ei", "random"} <= set(arms):
        goals += [
            Goal("hartmann6_aegis_below_kb_ei", median("aegis", "hartmann6") - median("kb-ei", "hartmann6"), 0.0, "<",
                 f"Hartmann6, {n_eval['hartmann6']} evaluations, {config['workers']} workers: median log10 regret "
                 "AEGiS - KB-EI",
                 reason=f"at d = 6 AEGiS explores (Thompson or Pareto) with probability 2 eps = 0.82; with "
                        f"{n_eval['hartmann6'] - 12} proposals after start-up, {len(seeds)} seeds and a "
                        f"{config['num_restarts']}/{config['raw_samples']} optimize_acqf budget that exploration had "
                        f"not paid off{thompson_note}, while KB-EI's LogEI exploits at every step"),
            Goal("hartmann6_aegis_below_random", median("aegis", "hartmann6") - median("random", "hartmann6"), 0.0,
                 "<", "Hartmann6: median log10 regret AEGiS - random", reason="the GP did not help at this budget"),
            Goal("branin_aegis_vs_random", median("aegis", "branin") - median("random", "branin"), -1.0, "<=",
                 f"Branin, {n_eval['branin']} evaluations: median log10 regret AEGiS - random",
                 reason="not enough evaluations for AEGiS to pull ten times closer than random search"),
            Goal("branin_aegis_vs_kb_ei", median("aegis", "branin") - median("kb-ei", "branin"), 0.5, "<=",
                 "Branin: median log10 regret AEGiS - KB-EI",
                 reason="at d = 2 the default eps = min(1/sqrt(max(d, 4)), 0.5) = 0.5, so P(exploit) = 0: every AEGiS "
                        f"move is Thompson or Pareto, and after {n_eval['branin']} evaluations it sits behind KB-EI, "
                        "which exploits at every step"),
        ]
    if config["one_worker_check"]:
        goals.append(Goal("one_worker_aegis_vs_logei",
                          median("aegis-1worker", "hartmann6") - median("logei-sequential", "hartmann6"), 0.5, "<=",
                          "Hartmann6 with 1 worker: median log10 regret AEGiS - sequential LogEI (paper: no worse "
                          "than EI)",
                          reason="with one worker AEGiS still explores with probability 0.82 at d = 6, while LogEI "
                                 f"exploits the GP at every step; {n_eval['hartmann6'] - 12} proposals after start-up "
                                 "were too few for that exploration to pay off"))

    panels = []
    for problem in ("branin", "hartmann6"):
        series = {}
        for arm in curves:
            if problem in curves[arm]:
                stacked = np.array([curves[arm][problem][s] for s in seeds])
                x = [float(i + 1) for i in range(stacked.shape[1])]
                series[arm] = Series(x, [list(np.median(stacked, axis=0))])
        panels.append({"title": f"{problem}: median log10 simple regret", "xlabel": "completed evaluations",
                       "ylabel": "log10 regret", "series": series})
    notes = [
        f"simulated clock: {config['workers']} workers, job times half-normal with mean 1 drawn from a generator seeded "
        "by the evaluation seed (the same sequence for every arm), never measured",
        "the plot shows seed medians only (the frame draws a min-max band around a mean; quartiles are in "
        "results.json per seed)",
        f"GP hyperparameters refitted every {config['refit_every']} results (warm start); optimize_acqf budget "
        f"{config['num_restarts']} restarts / {config['raw_samples']} raw samples for every GP arm",
    ]
    return ExperimentResult(per_seed=per_seed, goals=goals, plot=Plot(panels=panels, title="asynchronous BO"),
                            notes=notes)
