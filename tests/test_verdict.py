"""tools/verdict.py, the keep rule: its statistics, its decisions, and its error rates measured by
seeded simulation through the same functions the runner calls (tools/simulate_verdicts.py)."""

import math

import pytest

from tools import verdict
from tools.verdict import Outcome, decide, judge_candidate, pooled_noise, student_t_quantile


@pytest.mark.parametrize("p, dof, expected", [(0.95, 2, 2.919986), (0.95, 10, 1.812461), (0.99, 5, 3.364930),
                                              (0.975, 1, 12.706205), (0.5, 7, 0.0), (0.05, 4, -2.131847)])
def test_student_t_quantiles_match_the_tables(p, dof, expected):
    assert student_t_quantile(p, dof) == pytest.approx(expected, abs=2e-4)


def test_noise_is_pooled_over_same_commit_groups_and_needs_three_runs():
    assert pooled_noise([[1.0, 1.2]]).sigma is None  # two runs are not enough
    assert pooled_noise([[1.0], [2.0], [3.0]]).sigma is None  # single runs say nothing about noise
    noise = pooled_noise([[1.0, 1.2], [2.0, 2.1, 2.2], [5.0]])
    # squares 0.02 + 0.02 over 1 + 2 degrees of freedom
    assert noise.sigma == pytest.approx(math.sqrt(0.04 / 3))
    assert (noise.runs, noise.dof) == (5, 3)


BEST = [1.300, 1.310, 1.290, 1.300, 1.305, 1.295]


def test_a_keep_always_needs_a_second_run_even_for_a_huge_gain():
    assert decide([1.0], BEST).action == "rerun"
    assert decide([1.0, 1.002], BEST).action == "keep"


def test_a_clear_loser_is_discarded_after_one_run():
    decision = decide([1.40], BEST)
    assert decision.action == "discard" and decision.t < -10


def test_a_grey_zone_result_is_rerun_and_judged_by_the_last_run():
    assert decide([1.295], BEST).action == "rerun"
    final = decide([1.295, 1.297, 1.2985, 1.2975], BEST)
    assert final.action == "discard" and "after 4 runs" in final.reason


def test_reasons_say_better_or_worse_and_what_the_next_step_needed():
    # The val_bpb difference is negative when better; the reasons put t in words instead of a sign.
    assert decide([1.40], BEST).reason.endswith("standard errors worse after 1 run, under the 0.5 better a rerun needs")
    slightly_better = decide([1.2995], BEST)
    assert 0 < slightly_better.t < 0.5
    assert slightly_better.reason == (f"{slightly_better.t:.1f} standard errors better after 1 run, "
                                      "under the 0.5 better a rerun needs")
    final = decide([1.295, 1.297, 1.2985, 1.2975], BEST)
    assert final.t > 0 and final.reason.startswith(f"{final.t:.1f} standard errors better after 4 runs, short of the ")
    needed = float(final.reason.split("short of the ")[1].removesuffix(" a keep needs"))
    assert final.t < needed < 5
    assert verdict.standing(-2.04) == "2.0 standard errors worse" and verdict.standing(0.0) == "0.0 standard errors better"


def test_without_measured_noise_the_candidate_is_rerun_until_its_own_runs_measure_it():
    first = decide([1.0], [1.3])
    assert first.action == "rerun" and "sigma not measured yet" in first.reason
    assert decide([1.0, 1.01], [1.3]).action == "rerun"  # 2 repeat runs: still not measured
    assert decide([1.0, 1.01, 1.0], [1.3]).noise.runs == 3


def test_an_explicit_threshold_needs_two_runs_then_judges_their_mean():
    first = decide([1.289], BEST, threshold=0.01)
    assert first.action == "rerun" and "judges 2 runs" in first.reason
    assert decide([1.289, 1.289], BEST, threshold=0.01).action == "keep"
    assert decide([1.289, 1.293], BEST, threshold=0.01).action == "discard"


def test_judge_candidate_reruns_void_runs_and_stops_on_a_crash_or_rejection():
    outcomes = iter([Outcome(void="busy"), Outcome(value=1.0), Outcome(value=1.002)])
    result = judge_candidate(lambda attempt: next(outcomes), BEST)
    assert result.status == "keep" and result.values == (1.0, 1.002)
    assert judge_candidate(lambda attempt: Outcome(crash="boom"), BEST).status == "crash"
    assert judge_candidate(lambda attempt: Outcome(rejected="over budget"), BEST).status == "discard"
    assert judge_candidate(lambda attempt: Outcome(void="busy"), BEST).status == "void"


def test_confirm_best_tops_up_to_best_runs_and_stops_on_a_crash():
    values = iter([1.0, 1.1, 1.2, 1.3])
    assert verdict.confirm_best(lambda attempt: Outcome(value=next(values)), [0.9, 0.95]) == [0.9, 0.95, 1.0, 1.1, 1.2, 1.3]
    assert verdict.confirm_best(lambda attempt: Outcome(crash="boom"), [0.9]) == [0.9]


