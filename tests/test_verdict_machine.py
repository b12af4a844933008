"""tools/verdict.py with the machine taken out: the speed correction, Welch, drift, thresholds,
simplifications and the number of runs, on fake runs whose val_bpb depends on the machine's speed
and the code's; and tools/simulate_verdicts.py's figures at a small, seeded size."""

import math
import random

import pytest

from tools import simulate_verdicts, verdict
from tools.runner_state import complete_speeds, probed_speed
from tools.status import correction_used
from tools.verdict import Noise, Outcome, compare, decide, judge_candidate, pooled_noise

STEPS_SLOPE = -0.1146   # val_bpb per log(steps), as measured on the 2-core VM
RESIDUAL = 0.0029       # what is left after log(steps)
HOST_SPREAD = 0.057     # the host's log speed from run to run
PROBE_ERROR = 0.01      # the fake probe's own error


def fake_run(rng, base, code_speed=1.0, machine=None):
    """(val_bpb, probe speed) of one run: the steps in the budget are the machine's speed times the
    code's; the probe sees only the machine's."""
    machine = math.exp(rng.gauss(0.0, HOST_SPREAD)) if machine is None else machine * math.exp(rng.gauss(0.0, 0.01))
    value = base + STEPS_SLOPE * math.log(machine * code_speed) + rng.gauss(0.0, RESIDUAL)
    return value, machine * math.exp(rng.gauss(0.0, PROBE_ERROR))


def fake_groups(rng, groups=10, runs=6):
    """Same-commit groups of code that trains at the same speed, each commit its own val_bpb."""
    values, speeds = [], []
    for g in range(groups):
        pairs = [fake_run(rng, 1.28 + 0.001 * g) for _ in range(runs)]
        values.append([v for v, _ in pairs])
        speeds.append([s for _, s in pairs])
    return values, speeds


def test_the_corrected_sigma_is_the_residual_and_the_slope_the_machines():
    values, speeds = fake_groups(random.Random(4))
    raw = pooled_noise(values)
    noise = pooled_noise(values, speeds)
    expected = math.hypot(RESIDUAL, STEPS_SLOPE * PROBE_ERROR)  # what the probe's error leaves
    assert noise.sigma == pytest.approx(expected, rel=0.3)
    assert raw.sigma > 2 * noise.sigma and noise.raw_sigma == raw.sigma
    assert noise.slope[0] == pytest.approx(STEPS_SLOPE, rel=0.25) and len(noise.slope) == 1
    assert (noise.runs, noise.dof) == (60, 49)  # one degree of freedom pays for the slope
    assert "corrected for the machine's speed" in noise.describe()


def test_a_change_that_makes_the_step_slower_pays_for_it_even_on_a_faster_machine():
    """The candidate's code is 10% slower per step and otherwise the same; its runs happen to land
    on a host 30% faster, so raw it trains more steps and looks better. Corrected on the probe
    (not on its steps), it is what it is: worse by the steps it lost."""
    rng = random.Random(7)
    groups, group_speeds = fake_groups(rng)
    best_pairs = [fake_run(rng, 1.28) for _ in range(6)]
    best, best_speeds = [v for v, _ in best_pairs], [s for _, s in best_pairs]
    raw_keeps = corrected_keeps = 0
    differences = []
    for _ in range(100):
        pairs = [fake_run(rng, 1.28, code_speed=0.9, machine=1.3) for _ in range(2)]
        candidate, speeds = [v for v, _ in pairs], [s for _, s in pairs]
        raw_keeps += decide(candidate, best, groups).action == "keep"
        decision = decide(candidate, best, groups, candidate_speeds=speeds, best_speeds=best_speeds,
                          repeat_speeds=group_speeds)
        corrected_keeps += decision.action == "keep"
        differences.append(decision.difference)
    assert raw_keeps > 50 and corrected_keeps == 0
    cost = STEPS_SLOPE * math.log(0.9)  # what 10% fewer steps cost: 0.0121 bpb
    assert -sum(differences) / len(differences) == pytest.approx(cost, rel=0.25)


def test_a_no_effect_change_on_a_faster_hour_of_the_host_is_not_kept():
    rng = random.Random(11)
    groups, group_speeds = fake_groups(rng)
    best_pairs = [fake_run(rng, 1.28) for _ in range(6)]
    best, best_speeds = [v for v, _ in best_pairs], [s for _, s in best_pairs]
    raw_keeps = corrected_keeps = 0
    for _ in range(100):
        pairs = [fake_run(rng, 1.28, machine=1.12) for _ in range(2)]
        candidate, speeds = [v for v, _ in pairs], [s for _, s in pairs]
        raw_keeps += decide(candidate, best, groups).action == "keep"
        corrected_keeps += decide(candidate, best, groups, candidate_speeds=speeds, best_speeds=best_speeds,
                                  repeat_speeds=group_speeds).action == "keep"
    assert raw_keeps > 30 and corrected_keeps <= 5


MEMORY_SPREAD = 0.15     # log spread of a copy rate that wanders apart from the training (the EPYC's)


def fake_two_rate_run(rng, base, code_speed=1.0, machine=None):
    """(val_bpb, (matmul rate, memory rate)) of one run on a host like the EPYC's: the matmul rate
    follows the host's speed, the copy rate wanders on its own and says nothing of the steps."""
    value, matmul = fake_run(rng, base, code_speed, machine)
    return value, (190.0 * matmul, 60.0 * math.exp(rng.gauss(0.0, MEMORY_SPREAD)))


def fake_two_rate_groups(rng, groups=10, runs=6):
    pairs = [[fake_two_rate_run(rng, 1.28 + 0.001 * g) for _ in range(runs)] for g in range(groups)]
    return [[v for v, _ in group] for group in pairs], [[r for _, r in group] for group in pairs]


def test_each_rate_gets_its_own_slope_so_a_rate_that_wanders_cannot_hide_one_that_follows():
    """Runs on a host whose copy rate wandered apart from the training: one speed index (the
    geometric mean of both rates) corrected nothing there, the two rates apart do."""
    values, rates = fake_two_rate_groups(random.Random(2), groups=6, runs=10)
    raw = pooled_noise(values)
    index = pooled_noise(values, [[math.sqrt(m * c) for m, c in group] for group in rates])
    both = pooled_noise(values, rates)
    assert both.sigma < 0.5 * raw.sigma and index.sigma > 0.85 * raw.sigma
    assert both.slope[0] == pytest.approx(STEPS_SLOPE, rel=0.3)
    assert both.dof in (raw.dof - 1, raw.dof - 2)  # one degree of freedom per rate fitted


def test_a_rate_whose_slope_says_faster_scores_worse_leaves_the_fit_and_the_other_stays():
    rng = random.Random(8)
    values, rates = [], []
    for g in range(4):
        group = [fake_run(rng, 1.28 + 0.001 * g) for _ in range(6)]
        values.append([v for v, _ in group])
        # The copy rate here rises with the score's own noise: fitted, its slope is positive.
        rates.append([(190.0 * m, 60.0 * math.exp(40 * (v - verdict.mean([w for w, _ in group]) - STEPS_SLOPE
                                                         * math.log(m))))
                      for v, m in group])
    noise = pooled_noise(values, rates)
    assert noise.slope[1] == 0.0 and noise.slope[0] < 0
    assert noise.dof == pooled_noise(values).dof - 1  # the rate left out costs no degree of freedom
    assert noise.slope_covariance[1] == (0.0, 0.0)


def test_the_corrected_sigma_is_never_above_the_raw_one():
    """Six runs of a baseline on a host that did not move, with two rates that explain nothing:
    two slopes on five degrees of freedom could fit noise and leave a larger sigma per degree of
    freedom than the raw one. A rate stays only while it lowers the residual sigma."""
    rng = random.Random(12)
    for _ in range(200):
        values = [[1.3 + rng.gauss(0.0, 0.003) for _ in range(6)]]
        rates = [[(190 * math.exp(rng.gauss(0, 0.02)), 60 * math.exp(rng.gauss(0, 0.15))) for _ in range(6)]]
        noise = pooled_noise(values, rates)
        assert noise.sigma <= pooled_noise(values).sigma + 1e-12


def test_a_slower_step_pays_for_it_with_two_rates_as_with_one():
    rng = random.Random(9)
    groups, group_rates = fake_two_rate_groups(rng)
    best_pairs = [fake_two_rate_run(rng, 1.28) for _ in range(6)]
    best, best_rates = [v for v, _ in best_pairs], [r for _, r in best_pairs]
    differences, keeps = [], 0
    for _ in range(50):
        pairs = [fake_two_rate_run(rng, 1.28, code_speed=0.9, machine=1.3) for _ in range(2)]
        decision = decide([v for v, _ in pairs], best, groups, candidate_speeds=[r for _, r in pairs],
                          best_speeds=best_rates, repeat_speeds=group_rates)
        keeps += decision.action == "keep"
        differences.append(decision.difference)
    assert keeps == 0
    assert -verdict.mean(differences) == pytest.approx(STEPS_SLOPE * math.log(0.9), rel=0.3)


def test_status_says_which_rates_the_correction_uses():
    assert correction_used(Noise(0.003, 20, 17, (-0.4, 0.0), ((30.0, 0.0), (0.0, 0.0)), 0.009)) == \
        "the correction uses the matmul rate"
    assert correction_used(Noise(0.003, 20, 16, (-0.4, -0.01), ((30.0, 0.0), (0.0, 9.0)), 0.009)) == \
        "the correction uses the matmul and memory rates"
    assert correction_used(Noise(0.009, 20, 18)) == "no correction: no rate explains the spread yet"
    assert correction_used(Noise(None, 2, 1)) == "no correction until sigma is measured"


def test_runs_whose_speeds_carry_different_rates_are_judged_uncorrected():
    values, rates = fake_two_rate_groups(random.Random(6), groups=2)
    one_rate = [m for m, _ in rates[0]]
    decision = decide(values[1][:2], values[0], candidate_speeds=rates[1][:2], best_speeds=one_rate)
    assert decision.noise.slope is None


def test_the_drift_check_corrects_only_runs_that_carry_the_rates_the_slopes_were_fitted_on():
    noise = Noise(0.002, 20, 17, (-0.4, 0.0), ((30.0, 0.0), (0.0, 0.0)), 0.009)
    old, fresh = [1.300, 1.302, 1.298], [1.342]
    # On the same rates, the fresh run's 10% slower matmul explains its 0.042 rise: no drift.
    assert not verdict.drifted(old, fresh, noise, [(190.0, 60.0)] * 3, [(171.0, 60.0)])
    # Old runs with the speed index alone cannot be corrected with these slopes: judged raw, it drifted.
    assert verdict.drifted(old, fresh, noise, [100.0] * 3, [(171.0, 60.0)])


def test_the_small_linear_algebra_behind_the_slopes():
    assert verdict.log_rates(math.e) == (1.0,)
    assert verdict.log_rates((1.0, math.e ** 2)) == pytest.approx((0.0, 2.0))
    inverse = verdict.inverse_matrix([[2.0, 1.0], [1.0, 3.0]])
    assert inverse == [pytest.approx([0.6, -0.2]), pytest.approx([-0.2, 0.4])]
    assert verdict.inverse_matrix([[1.0, 2.0], [2.0, 4.0]]) is None  # two rates that move together
    syy, sxy, sxx, runs, dof = verdict.within_group_sums([[1.0, 3.0], [5.0]], [[(0.0,), (1.0,)], [(7.0,)]], 1)
    assert (syy, sxy, sxx, runs, dof) == (2.0, [1.0], [[0.5]], 2, 1)  # the one-run group adds nothing


def test_a_runs_record_gives_the_rule_its_two_rates_or_its_index_or_nothing():
    assert probed_speed({"probe_matmul_gflops": 190.5, "probe_memory_gb_per_s": 60, "machine_speed": 107.0}) \
        == (190.5, 60.0)
    assert probed_speed({"machine_speed": 107.0}) == 107.0  # a record from before the two rates
    assert probed_speed({"probe_matmul_gflops": 0.0, "probe_memory_gb_per_s": 60.0}) is None
    assert probed_speed({}) is None
    assert complete_speeds([(190.0, 60.0), (185.0, 58.0)]) == [(190.0, 60.0), (185.0, 58.0)]
    assert complete_speeds([(190.0, 60.0), 107.0]) is None  # not the same rates: judged raw
    assert complete_speeds([(190.0, 60.0), None]) is None


def test_runs_without_a_probe_leave_the_rule_uncorrected():
    values, speeds = fake_groups(random.Random(2), groups=3)
    assert pooled_noise(values, [None, None, None]).slope is None
    decision = decide(values[0][:2], values[1], [values[2]], candidate_speeds=[None, 1.0], best_speeds=speeds[1])
    assert decision.noise.slope is None


# Measured on one-thread slots of the Intel Xeon (standard profile): a night's start (no warmdown)
# and its first keep, six runs each, with the probe's machine speed of every run; then a real
# improvement whose first run landed on an hour 14% slower than any of the best's runs.
SLOT_START = [1.366656, 1.363118, 1.341594, 1.342058, 1.340661, 1.342901]
SLOT_START_SPEEDS = [62.01, 62.84, 59.48, 61.15, 62.22, 62.83]
SLOT_BEST = [1.297473, 1.297546, 1.29897, 1.297155, 1.298622, 1.295176]
SLOT_BEST_SPEEDS = [60.68, 64.66, 64.95, 65.9, 62.13, 62.75]


def test_a_slope_where_faster_hours_score_worse_corrects_nothing():
    """In these runs the start's two worst results had fast probes: fitted, the slope says a
    faster machine trains a worse model. Applied 14% below the best's speeds it charged a real
    gain of 0.016 for the machine and dropped it after one run; it is noise, so the rule stays
    uncorrected and the gain is rerun."""
    noise = pooled_noise([SLOT_START, SLOT_BEST], [SLOT_START_SPEEDS, SLOT_BEST_SPEEDS])
    assert noise.slope is None and noise.sigma == pytest.approx(pooled_noise([SLOT_START, SLOT_BEST]).sigma)
    decision = decide([1.281051], SLOT_BEST, [SLOT_START], candidate_speeds=[53.23], best_speeds=SLOT_BEST_SPEEDS,
                      repeat_speeds=[SLOT_START_SPEEDS])
    assert decision.action == "rerun" and decision.noise.slope is None
    assert decision.difference == pytest.approx(0.016439, abs=1e-6)


def test_from_three_runs_a_wide_candidate_is_judged_on_its_own_spread():
    best = [1.300, 1.301, 1.299, 1.300, 1.302, 1.298]
    groups = [[1.310, 1.311, 1.309], [1.320, 1.321, 1.319, 1.320]]
    narrow = compare([1.296, 1.2965, 1.2955], best, groups)
    wide = compare([1.286, 1.306, 1.296], best, groups)
    assert narrow.difference == pytest.approx(wide.difference, abs=1e-9)
    assert wide.error > 3 * narrow.error and wide.dof < 3  # Welch-Satterthwaite: the wide spread's 2 dof
    assert decide([1.286, 1.306, 1.296], best, groups).action != "keep"
    two_runs = compare([1.286, 1.306], best, groups)
    assert two_runs.dof == pooled_noise([*groups, best, [1.286, 1.306]]).dof  # under 3 runs: the pooled sigma


def test_two_runs_that_disagree_get_a_third_before_a_keep():
    best = [1.300, 1.310, 1.290, 1.300, 1.305, 1.295]
    assert decide([1.250, 1.251], best).action == "keep"
    disagree = decide([1.240, 1.262], best)
    assert disagree.action == "rerun" and "disagree" in disagree.reason


def test_a_simplification_is_kept_when_not_worse_by_the_margin_and_dropped_when_it_is():
    rng = random.Random(3)
    groups = [[1.3 + rng.gauss(0, 0.003) for _ in range(6)] for _ in range(8)]
    best = [1.3 + rng.gauss(0, 0.003) for _ in range(6)]
    same = [sum(best) / 6 + d for d in (-0.0003, 0.0003, 0.0, 0.0)]
    kept = next(decide(same[:k], best, groups, simplify=True) for k in (2, 3, 4)
                if decide(same[:k], best, groups, simplify=True).action != "rerun")
    assert kept.action == "keep" and "not worse" in kept.reason
    worse = decide([sum(best) / 6 + 0.012], best, groups, simplify=True)
    assert worse.action == "discard" and "standard errors outside the margin" in worse.reason


def test_the_best_needs_fewer_runs_when_the_corrected_sigma_is_small():
    assert verdict.best_runs_target(None) == verdict.BEST_RUNS
    assert verdict.best_runs_target(Noise(0.007, 6, 5)) == verdict.BEST_RUNS  # not corrected
    small = Noise(0.003, 20, 17, slope=(-0.1,), slope_covariance=((20.0,),), raw_sigma=0.007)
    assert verdict.best_runs_target(small) == verdict.MIN_BEST_RUNS  # 6 * (3/7)^2 = 1.1 runs, floor 3
    assert verdict.best_runs_target(Noise(0.006, 20, 17, (-0.1,), ((20.0,),), 0.007)) == 5  # 6 * (6/7)^2 = 4.4


def test_probe_drift_says_when_the_machine_left_the_speed_range_of_the_best():
    best_speeds = [40.0, 41.0, 42.0]
    assert "faster" in verdict.probe_drift(best_speeds, [45.0, 46.0])
    assert "slower" in verdict.probe_drift(best_speeds, [36.0])
    assert verdict.probe_drift(best_speeds, [41.5, 43.0]) is None
    assert verdict.probe_drift([], [41.0]) is None
    # Two rates are checked apart, and named; with a fit, only the rates it corrects for count.
    best_rates = [(190.0, 55.0), (195.0, 70.0), (193.0, 62.0)]
    assert verdict.probe_drift(best_rates, [(175.0, 62.0)]) == \
        "the machine's matmul rate is 8% slower than in any of the best's runs"
    assert "memory rate is 11% faster" in verdict.probe_drift(best_rates, [(192.0, 78.0)])
    matmul_only = Noise(0.003, 20, 17, (-0.4, 0.0), ((30.0, 0.0), (0.0, 0.0)), 0.009)
    assert verdict.probe_drift(best_rates, [(192.0, 78.0)], matmul_only) is None


BEST = [1.300, 1.310, 1.290, 1.300, 1.305, 1.295]


def test_a_keep_against_a_stale_best_rechecks_it_and_the_drift_is_caught():
    candidate = iter([Outcome(value=v) for v in (1.285, 1.2852, 1.2851, 1.2849)])
    result = judge_candidate(lambda attempt: next(candidate), BEST,
                             run_best=lambda attempt: Outcome(value=1.2845))
    assert result.drift and result.best_values == (1.2845,)
    assert result.status == "discard" and "re-measured" in result.reason


def test_a_keep_against_a_steady_best_adds_the_fresh_run_and_stands():
    candidate = iter([Outcome(value=v) for v in (1.280, 1.2805)])
    result = judge_candidate(lambda attempt: next(candidate), BEST, run_best=lambda attempt: Outcome(value=1.301))
    assert result.status == "keep" and not result.drift
    assert result.best_values == (*BEST, 1.301)


def test_confirm_best_runs_returns_the_speeds_of_the_runs():
    outcomes = iter([Outcome(value=1.0, speed=40.0), Outcome(void="busy"), Outcome(value=1.1, speed=41.0)])
    values, speeds = verdict.confirm_best_runs(lambda attempt: next(outcomes), [0.9], [39.0], target=3)
    assert values == [0.9, 1.0, 1.1] and speeds == [39.0, 40.0, 41.0]


# --- the simulation, at a small seeded size -----------------------------------------------------

def test_the_simulated_noise_model_is_the_measured_days_pooled():
    days = simulate_verdicts.MEASURED_DAYS
    moving = {"EPYC, host moved 15%, no probe": days["EPYC, host moved 15%, no probe"]}
    raw, residual, slope, _, probe_error, _ = simulate_verdicts.measured_model(moving)
    assert (raw, residual) == (pytest.approx(0.00713, abs=1e-5), pytest.approx(0.00293, abs=1e-5))
    assert probe_error is None  # that day ran no probe
    xeon = {"Xeon, host moved 6%, torch probe": days["Xeon, host moved 6%, torch probe"]}
    raw, residual, _, _, probe_error, _ = simulate_verdicts.measured_model(xeon)
    assert (raw, residual) == (pytest.approx(0.00525, abs=1e-5), pytest.approx(0.00203, abs=1e-5))
    assert probe_error is None  # the probe a minute apart: not the probe runs take now
    dense = {"Xeon, host moved 11%, probe every 10 s": days["Xeon, host moved 11%, probe every 10 s"]}
    raw, residual, _, _, probe_error, wander = simulate_verdicts.measured_model(dense)
    assert (raw, residual) == (pytest.approx(0.01158, abs=1e-5), pytest.approx(0.00246, abs=1e-5))
    assert probe_error == pytest.approx(0.0097, abs=1e-4) and wander is None  # the speed index alone
    epyc = {"EPYC, host moved 10%, probe every 10 s": days["EPYC, host moved 10%, probe every 10 s"]}
    raw, residual, _, _, probe_error, wander = simulate_verdicts.measured_model(epyc)
    assert (raw, residual) == (pytest.approx(0.00945, abs=1e-5), pytest.approx(0.00217, abs=1e-5))
    # The two rates leave 0.74% of log(steps) unexplained; the memory rate wandered 15% on its own.
    assert probe_error == pytest.approx(0.0074, abs=1e-4) and wander == pytest.approx(0.149, abs=1e-3)
    assert simulate_verdicts.RAW_SIGMA == pytest.approx(0.00925, abs=1e-5)
    assert simulate_verdicts.RESIDUAL_SIGMA == pytest.approx(0.00411, abs=1e-5)
    # Today's probe leaves 1.1% of log(steps) unexplained: a quarter of the host's own spread.
    assert simulate_verdicts.PROBE_ERROR == pytest.approx(0.0110, abs=1e-4)
    assert simulate_verdicts.PROBE_ERROR < simulate_verdicts.HOST_SPREAD / 3


def test_simulated_no_effect_keeps_stay_under_five_percent_and_large_gains_are_found():
    first, _ = simulate_verdicts.keep_rate(0.0, 400, 1, seed=1)
    night, runs = simulate_verdicts.keep_rate(0.0, 20, 20, seed=1)
    gain, _ = simulate_verdicts.keep_rate(2.0, 600, 1, seed=1)
    assert first <= 0.05 and night <= 0.05
    assert gain >= 0.7  # the measured probe adds its own error to the correction: 2 raw sigma is kept ~75%
    assert runs < 1.6  # a no-effect idea mostly ends after its first run


def test_simulated_drift_of_a_fifth_sigma_per_run_keeps_at_most_two_of_twelve():
    visible, _ = simulate_verdicts.drift_keeps(40, seed=1, drift=0.2)
    hidden, _ = simulate_verdicts.drift_keeps(40, seed=1, hidden_drift=0.2)
    with simulate_verdicts.rule_constants(RECHECK_RUNS=0):
        unchecked, _ = simulate_verdicts.drift_keeps(40, seed=1, hidden_drift=0.2)
    assert visible <= 2 and hidden <= 2 and unchecked > 4


def test_simulated_early_stop_saves_runs_on_no_effect_ideas():
    _, runs = simulate_verdicts.keep_rate(0.0, 20, 20, seed=2)
    with simulate_verdicts.rule_constants(DROP_BELOW={**verdict.DROP_BELOW, 1: -math.inf}):
        _, runs_without = simulate_verdicts.keep_rate(0.0, 20, 20, seed=2)
    assert runs < runs_without - 0.5


def test_simulated_simplification_costing_the_margin_is_rarely_kept():
    sigma = simulate_verdicts.corrected_sigma() / simulate_verdicts.RAW_SIGMA
    harm, _ = simulate_verdicts.keep_rate(-verdict.SIMPLIFY_MARGIN * sigma, 400, 1, seed=1, simplify=True)
    assert harm <= 0.05


def test_simulated_candidate_twice_as_noisy_with_no_effect_is_kept_under_five_percent():
    kept, _ = simulate_verdicts.keep_rate(0.0, 4000, 1, seed=2, noise=2.0)
    assert kept <= 0.05
    with simulate_verdicts.rule_constants(KEEP_LEVEL={**verdict.KEEP_LEVEL, 4: 0.04}):
        looser, _ = simulate_verdicts.keep_rate(0.0, 4000, 1, seed=2, noise=2.0)
    assert looser > kept  # the fourth run's level is what lets such a candidate through


def test_simulated_nights_keep_far_fewer_false_changes_than_the_greedy_rule():
    kit = simulate_verdicts.night_figures(simulate_verdicts.kit_night, 20, seed=1)
    greedy = simulate_verdicts.night_figures(simulate_verdicts.greedy_night, 20, seed=1)
    assert greedy[0] == pytest.approx(simulate_verdicts.NIGHT_SECONDS / simulate_verdicts.RUN_SECONDS, abs=1)
    assert kit[2] < greedy[2] / 5 and kit[4] <= 0.05 < greedy[4]


def test_the_rule_without_its_guards_finds_more_but_keeps_noise_the_guards_refuse():
    rows = {label: figures for label, *figures in simulate_verdicts.ceiling(20, seed=1)}
    (kit, kit_first, kit_noisy), (loose, loose_first, loose_noisy) = rows["kit rule"], rows["without its guards"]
    assert loose[3] > kit[3] and loose[0] > kit[0]  # more net gain, from more experiments a night
    assert loose_first > 2 * kit_first and loose_noisy > 2 * kit_noisy
    assert set(rows) == {"kit rule", "without its guards", "without its guards, sigma known", "upstream greedy, one run"}
    # The loosened constants and the normal quantiles are put back afterwards.
    assert verdict.MIN_KEEP_RUNS == 2 and verdict.RECHECK_RUNS == 1
    assert verdict.student_t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)


def test_write_readme_replaces_only_the_marked_table(tmp_path):
    readme = tmp_path / "README.md"
    start, end = simulate_verdicts.MARKERS
    readme.write_text(f"before\n{start}\nold table\n{end}\nafter\n")
    simulate_verdicts.write_readme("new table", readme)
    assert readme.read_text() == f"before\n{start}\nnew table\n{end}\nafter\n"
    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="markers"):
        simulate_verdicts.write_readme("new table", readme)
