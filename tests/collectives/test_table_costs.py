"""The cost formulas of the reduce, gather, scatter and all_to_all rows (csrc/algorithms/
collectives.cpp), as _C.predict evaluates them, against the formulas the algorithm files
state; and the rows as pycomm._C exports them."""
import math

import pytest

from pycomm import _C

ALPHA, BETA, GAMMA = 3e-6, 1 / 5e9, 1 / 11e9


def _f(p):
    return (p - 1) / p


def _log(p):
    return math.ceil(math.log2(p))


FORMULAS = {
    ("reduce", "ring"): lambda n, p: (p - 1 + _log(p)) * ALPHA + _f(p) * n * (2 * BETA + GAMMA),
    ("reduce", "tree"): lambda n, p: (_C.tree_depth(p) + 1) * ALPHA + n * BETA + n * GAMMA,
    ("gather", "ring"): lambda n, p: (p - 1) * ALPHA + _f(p) * n * BETA,
    ("gather", "tree"): lambda n, p: _log(p) * ALPHA + _f(p) * n * BETA,
    ("scatter", "ring"): lambda n, p: (p - 1) * ALPHA + _f(p) * n * BETA,
    ("scatter", "tree"): lambda n, p: _log(p) * ALPHA + _f(p) * n * BETA,
    ("all_to_all", "pairwise"): lambda n, p: (p - 1) * ALPHA + _f(p) * n * BETA,
}


@pytest.mark.parametrize("coll,algo", list(FORMULAS))
@pytest.mark.parametrize("p", [2, 3, 5, 8, 13, 64])
@pytest.mark.parametrize("n", [0.0, 1.0, 4096.0, 3e8])
def test_predict_is_the_stated_formula(coll, algo, p, n):
    got = _C.predict(_C.COLLECTIVES[coll], _C.ALGORITHMS[algo], n, p, ALPHA, BETA, GAMMA)
    assert got == pytest.approx(FORMULAS[coll, algo](n, p), rel=1e-12, abs=1e-18)


@pytest.mark.parametrize("coll,algo", list(FORMULAS))
def test_one_rank_costs_nothing(coll, algo):
    assert _C.predict(_C.COLLECTIVES[coll], _C.ALGORITHMS[algo], 1e6, 1, ALPHA, BETA, GAMMA) == 0.0


def test_rows_as_exported():
    rows = {r["name"]: r for r in _C.TABLE}
    assert {c: rows[c]["code"] for c in ("reduce", "gather", "scatter", "all_to_all")} == \
        {"reduce": 6, "gather": 7, "scatter": 8, "all_to_all": 9}
    assert [rows[c]["setting"] for c in ("reduce", "gather", "scatter", "all_to_all")] == \
        ["reduce", "gather", "scatter", "alltoall"]
    assert rows["reduce"]["reduces"] and rows["reduce"]["rooted"]
    assert not rows["gather"]["reduces"] and rows["gather"]["rooted"] and rows["scatter"]["rooted"]
    assert not rows["all_to_all"]["reduces"] and not rows["all_to_all"]["rooted"]
    assert rows["all_to_all"]["algorithms"] == ["pairwise"]
    for c in ("reduce", "gather", "scatter"):
        assert rows[c]["algorithms"] == ["ring", "tree"]
    assert _C.ALGORITHMS["pairwise"] == 3


def test_algo_setting_for_the_new_rows():
    a2a, gather = _C.COLLECTIVES["all_to_all"], _C.COLLECTIVES["gather"]
    # One algorithm for all applies where it exists; all_to_all stays with its own.
    assert _C.algo_override("ring", a2a) == _C.ALGORITHMS["direct"]
    assert _C.algo_override("ring", gather) == _C.ALGORITHMS["ring"]
    assert _C.algo_override("alltoall:pairwise;gather:tree", a2a) == _C.ALGORITHMS["pairwise"]
    assert _C.algo_override("alltoall:pairwise;gather:tree", gather) == _C.ALGORITHMS["tree"]
    with pytest.raises(ValueError, match="all_to_all has no ring algorithm; use pairwise"):
        _C.algo_override("alltoall:ring", gather)
