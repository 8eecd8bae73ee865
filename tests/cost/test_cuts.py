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
