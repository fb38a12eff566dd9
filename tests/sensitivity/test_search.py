"""Ranking and greedy search on a planted AP table: the order by AP recovered per GFLOP,
combined sets measured again (recoveries that do not add up), a group that does not help
in combination dropped, the stop at the limit, and the limits users write."""
from __future__ import annotations

import pytest

from harness.errors import UserError
from harness.sensitivity.search import (
    DeltaLimit, greedy_order, greedy_search, rank_groups,
)

AP_FP32, AP_INT8 = 0.500, 0.480
GFLOPS = {"stem": 0.1, "stage1": 1.0, "neck": 0.5, "head": 0.01, "stage2": 2.0}
# AP with each group alone in fp32
SINGLE = {"stem": 0.488, "stage1": 0.492, "neck": 0.487, "head": 0.482, "stage2": 0.478}
# AP of combined sets (by frozenset): stem and stage1 overlap (their recoveries do not add),
# head adds a little on top of stem
COMBINED = {
    frozenset({"head", "stem"}): 0.490,
    frozenset({"head", "stem", "neck"}): 0.494,
    frozenset({"head", "stem", "neck", "stage1"}): 0.4935,  # no better: dropped again
}


class Table:
    """measure() from the planted table, recording every set asked for."""

    def __init__(self):
        self.asked = []

    def __call__(self, names):
        self.asked.append(tuple(names))
        key = frozenset(names)
        return SINGLE[names[0]] if len(names) == 1 else COMBINED[key]


def test_ranking_by_recovered_per_gflop():
    ranked = rank_groups(SINGLE, GFLOPS, AP_INT8)
    assert [r.name for r in ranked] == ["head", "stem", "neck", "stage1", "stage2"]
    head, stem = ranked[0], ranked[1]
    assert head.recovered == pytest.approx(0.002) and head.recovered_per_gflop == \
        pytest.approx(0.2)
    assert stem.recovered_per_gflop == pytest.approx(0.08) and stem.rank == 2
    assert ranked[-1].recovered < 0
    # a negative recovery is never a candidate; order=recovered puts stage1 first
    assert greedy_order(ranked) == ["head", "stem", "neck", "stage1"]
    assert greedy_order(ranked, "recovered") == ["stage1", "stem", "neck", "head"]
    with pytest.raises(UserError, match="unknown --order"):
        greedy_order(ranked, "flops")


def test_greedy_stops_at_the_limit():
    table = Table()
    ranked = rank_groups(SINGLE, GFLOPS, AP_INT8)
    outcome = greedy_search(greedy_order(ranked), table, AP_FP32, AP_INT8, limit=0.0061)
    # head alone (0.482) is not within 0.0061 of 0.500; head + stem (0.490) neither;
    # + neck (0.494): loss 0.006, within
    assert outcome.chosen == ("head", "stem", "neck") and outcome.met
    assert outcome.AP == pytest.approx(0.494)
    assert table.asked == [("head",), ("head", "stem"), ("head", "stem", "neck")]
    assert [s.kept for s in outcome.steps] == [True, True, True]


def test_greedy_drops_a_group_that_does_not_help_and_says_when_it_cannot_reach():
    table = Table()
    ranked = rank_groups(SINGLE, GFLOPS, AP_INT8)
    outcome = greedy_search(greedy_order(ranked), table, AP_FP32, AP_INT8, limit=0.001)
    assert not outcome.met
    assert outcome.chosen == ("head", "stem", "neck")  # stage1 tried, then dropped
    assert outcome.steps[-1].added == "stage1" and not outcome.steps[-1].kept
    assert outcome.steps[-1].groups == ("head", "stem", "neck", "stage1")
    assert outcome.AP == pytest.approx(0.494)


def test_nothing_measured_when_the_quantized_model_is_within_the_limit():
    def measure(names):
        pytest.fail(f"measured {names}")

    outcome = greedy_search(["stem"], measure, AP_FP32, AP_INT8, limit=0.021)
    assert outcome.met and outcome.chosen == () and outcome.AP == AP_INT8


@pytest.mark.parametrize("text, value, relative, absolute", [
    ("0.005", 0.005, False, 0.005), ("50%", 0.5, True, 0.01), ("25 %", 0.25, True, 0.005),
    ("0", 0.0, False, 0.0)])
def test_limits(text, value, relative, absolute):
    limit = DeltaLimit.parse(text)
    assert (limit.value, limit.relative) == (pytest.approx(value), relative)
    assert limit.absolute(0.02) == pytest.approx(absolute)


@pytest.mark.parametrize("text", ["half", "-0.01", "150%", ""])
def test_bad_limits_are_one_line(text):
    with pytest.raises(UserError, match="--max-delta-ap"):
        DeltaLimit.parse(text)


def test_relative_limit_of_a_model_that_loses_nothing():
    assert DeltaLimit.parse("50%").absolute(-0.003) == 0.0
