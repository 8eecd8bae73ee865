"""Cut choosing (asyncgen/cost/cuts.py): balanced cuts are the optimum, and impossible splits are refused."""

import itertools
import random

import pytest

from asyncgen.cost.cuts import balanced_cuts


def test_balanced_cuts_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        costs = [rng.random() for _ in range(n)]
        stages = rng.randint(1, n)
        cuts = balanced_cuts(costs, stages)
        assert cuts[0] == 0 and cuts[-1] == n and len(cuts) == stages + 1 and cuts == sorted(set(cuts))
        best = min(
            max(sum(costs[a:b]) for a, b in zip((0, *c), (*c, n)))
            for c in itertools.combinations(range(1, n), stages - 1)
        )
        got = max(sum(costs[a:b]) for a, b in zip(cuts[:-1], cuts[1:]))
        assert got == pytest.approx(best)


def test_balanced_cuts_rejects_too_many_stages():
    with pytest.raises(ValueError, match="cannot split 3 units into 4 stages"):
        balanced_cuts([1, 1, 1], 4)


def _all_cuts(n, stages):
    return [[0, *c, n] for c in itertools.combinations(range(1, n), stages - 1)]


def test_composed_cuts_match_brute_force():
    from asyncgen.cost.cuts import composed_cuts, composed_schedule_time

    rng = random.Random(1)
    for _ in range(150):
        n = rng.randint(1, 8)
        costs = [rng.random() for _ in range(n)]
        stages = rng.randint(1, n)
        runs = [[rng.random() < 0.6 for _ in range(n)] for _ in range(rng.randint(1, 5))]
        cuts = composed_cuts(costs, runs, stages)
        assert cuts[0] == 0 and cuts[-1] == n and len(cuts) == stages + 1 and cuts == sorted(set(cuts))
        best = min(composed_schedule_time(costs, runs, c) for c in _all_cuts(n, stages))
        assert composed_schedule_time(costs, runs, cuts) == pytest.approx(best)


def test_composed_cuts_with_every_unit_every_step_are_the_bottleneck_cuts():
    from asyncgen.cost.cuts import composed_cuts

    rng = random.Random(2)
    for _ in range(50):
        n = rng.randint(2, 9)
        costs = [rng.random() for _ in range(n)]
        stages = rng.randint(1, n)
        assert composed_cuts(costs, [[True] * n] * 4, stages) == balanced_cuts(costs, stages)


def test_deep_cache_cuts_keep_the_shallow_path_balanced():
    """DeepCache's chain: shallow prefix, deep middle, shallow suffix. Balancing the full step alone cuts in the deep
    middle, where on cached steps the prefix rank and the suffix rank do unequal work; the composed cuts trade a
    slower full step for faster cached ones and the schedule is shorter."""
    from asyncgen.cost.cuts import composed_cuts, composed_schedule_time
    from asyncgen.runtime.deep_cache import deep_cache_runs

    costs = [1, 1, 4, 4, 4, 4, 2, 2, 2]  # prefix 2 units, deep 4, suffix 3 (heavier than the prefix, as in a UNet)
    deep = [False, False, True, True, True, True, False, False, False]
    runs = deep_cache_runs(deep, steps=10, interval=5)
    assert [all(r) for r in runs] == [t % 5 == 0 for t in range(10)]
    assert runs[1] == [not d for d in deep]
    bottleneck = balanced_cuts(costs, 2)
    composed = composed_cuts(costs, runs, 2)
    # bottleneck: full steps max(10, 14) = 14, cached steps max(2, 6) = 6: 2 x 14 + 8 x 6 = 76
    assert bottleneck == [0, 4, 9] and composed_schedule_time(costs, runs, bottleneck) == 76
    # composed: full steps max(20, 4) = 20, cached steps max(4, 4) = 4: 2 x 20 + 8 x 4 = 72
    assert composed == [0, 7, 9] and composed_schedule_time(costs, runs, composed) == 72
    # at interval 3 the full steps weigh more and the bottleneck cuts are also the composed optimum
    runs3 = deep_cache_runs(deep, steps=9, interval=3)
    assert composed_cuts(costs, runs3, 2) == bottleneck


def test_composed_cuts_refuse_bad_input():
    from asyncgen.cost.cuts import composed_cuts

    with pytest.raises(ValueError, match=r"runs\[1\] names 2 units, the costs 3"):
        composed_cuts([1, 1, 1], [[True] * 3, [True] * 2], 2)
    with pytest.raises(ValueError, match="cannot split 3 units into 4 stages"):
        composed_cuts([1, 1, 1], [[True] * 3], 4)
    with pytest.raises(ValueError, match="runs is empty"):
        composed_cuts([1, 1, 1], [], 2)


def test_choose_composed_cuts_on_a_unet_split():
    """On the tiny SD UNet's split, with the DeepCache mask: the counted costs give cuts no worse than the bottleneck
    cuts on the composed schedule (and exactly what composed_cuts gives on the same costs)."""
    import tiny_models
    from asyncgen.cost.cuts import choose_composed_cuts, composed_cuts, composed_schedule_time
    from asyncgen.cost.estimate import estimate_unit_costs
    from asyncgen.runtime.deep_cache import deep_cache_runs, deep_unit_mask
    from asyncgen.split.registry import split_denoiser

    unet = tiny_models.sd_unet()
    split = split_denoiser(unet, verify_split=False)
    mask = deep_unit_mask([u.name for u in split.units], len(unet.down_blocks), 0)
    runs = deep_cache_runs(mask, steps=12, interval=3)
    cuts = choose_composed_cuts(split, 2, runs)
    costs = estimate_unit_costs(split)
    assert cuts == composed_cuts(costs, runs, 2)
    assert composed_schedule_time(costs, runs, cuts) <= composed_schedule_time(costs, runs, balanced_cuts(costs, 2))
