"""The catalogue's plain grid search (catalogue/tuning.py): the same grid and seeds for every arm, the best mean
wins, ties go to the earlier grid point, NaN is the worst, and evaluation seeds (< 100) are refused."""

import math

import pytest

from asyncgen.catalogue.frame import CatalogueError
from asyncgen.catalogue.tuning import grid_points, grid_search, point_label


def test_grid_points_first_parameter_slowest():
    assert grid_points({"lr": [0.1, 0.2], "m": [0, 1]}) == [
        {"lr": 0.1, "m": 0}, {"lr": 0.1, "m": 1}, {"lr": 0.2, "m": 0}, {"lr": 0.2, "m": 1}]
    assert point_label({"lr": 0.1, "m": 0}) == "lr=0.1,m=0"
    with pytest.raises(CatalogueError, match="tuning grid for m is empty"):
        grid_points({"lr": [0.1], "m": []})


def test_best_mean_wins_ties_go_early_nan_is_worst():
    calls = []
    table = {  # arm -> lr -> score per seed
        "a": {1.0: [0.5, 0.7], 2.0: [0.9, 0.1], 3.0: [0.6, 0.6]},  # means 0.6, 0.5, 0.6: the tie goes to lr=1
        "b": {1.0: [math.nan, 1.0], 2.0: [0.2, 0.2], 3.0: [0.3, 0.1]},  # NaN mean is the worst: lr=2 (0.2 = 0.2)
    }

    def score(arm, params, seed):
        calls.append((arm, params["lr"], seed))
        return table[arm][params["lr"]][seed - 100]

    out = grid_search(["a", "b"], {"lr": [1.0, 2.0, 3.0]}, [100, 101], score, "test")
    assert out["a"] == {"lr": 1.0} and out["b"] == {"lr": 2.0}
    assert sorted(calls) == sorted((arm, lr, s) for arm in "ab" for lr in (1.0, 2.0, 3.0) for s in (100, 101))
    assert out["grid"] == {"a": {"lr": [1.0, 2.0, 3.0]}, "b": {"lr": [1.0, 2.0, 3.0]}} and out["seeds"] == [100, 101]
    assert out["scores"]["a"] == {"lr=1": 0.6, "lr=2": 0.5, "lr=3": 0.6}
    assert math.isnan(out["scores"]["b"]["lr=1"])


@pytest.mark.parametrize("seeds", [[], [99], [100, 3]])
def test_evaluation_seeds_are_refused(seeds):
    with pytest.raises(CatalogueError, match=r"tuning runs only on seeds >= 100"):
        grid_search(["a"], {"lr": [1.0]}, seeds, lambda *a: 0.0, "test")
