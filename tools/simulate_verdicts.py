"""Seeded simulation of the keep rule: how often it keeps a change with no effect, how often it
keeps a real gain, and how many training runs an experiment costs. Also the rule it replaced.

    uv run tools/simulate_verdicts.py                 # 2,000 experiments per effect, the table
    uv run tools/simulate_verdicts.py --nights 500 --experiments 20 --seed 7

A fake training run returns its code's true val_bpb plus Gaussian noise (sigma = 1 unit). A night
starts with `baseline` (the best confirmed to BEST_RUNS runs), then runs experiments one after the
other, every candidate true_best - effect * sigma, through tools/verdict.py's judge_candidate and
confirm_best, the functions the runner calls. Rates are per experiment over all nights; runs per
experiment include the reruns and the confirmation of a new best (not the night's first baseline).
Environment variables: none.
"""

import argparse
import random
import statistics

from tools.verdict import BEST_RUNS, Outcome, confirm_best, judge_candidate

EFFECTS = (0.0, 1.0, 2.0, 3.0)  # true gains, in sigmas, of every candidate in a simulated night


def simulate_kit_rule(effect, nights, experiments, seed):
    """(keep rate, runs per experiment) of the kit's rule for candidates `effect` sigmas better."""
    rng = random.Random(seed)
    keeps = runs = 0
    for _ in range(nights):
        best_true, repeats = 0.0, []

        def runner(true):
            def run_once(attempt):
                nonlocal runs
                runs += 1
                return Outcome(value=true + rng.gauss(0.0, 1.0))
            return run_once

        best = confirm_best(runner(best_true), [])
        runs -= len(best)  # the night's first baseline is not part of any experiment
        for _ in range(experiments):
            true = best_true - effect
            verdict = judge_candidate(runner(true), best, repeats)
            if verdict.status == "keep":
                keeps += 1
                repeats.append(best)
                best_true, best = true, confirm_best(runner(true), list(verdict.values))
            else:
                repeats.append(list(verdict.values))
    total = nights * experiments
    return keeps / total, runs / total


def simulate_old_rule(effect, nights, experiments, seed):
    """The rule before: `baseline --repeat 2` sets sigma to the stdev of two runs and the best to
    the first run; a candidate is kept when its one run beats the best kept run by sigma."""
    rng = random.Random(seed)
    keeps = 0
    for _ in range(nights):
        best_true = 0.0
        baseline = [best_true + rng.gauss(0.0, 1.0) for _ in range(2)]
        threshold, best = statistics.stdev(baseline), baseline[0]
        for _ in range(experiments):
            true = best_true - effect
            value = true + rng.gauss(0.0, 1.0)
            if value < best - threshold:
                keeps += 1
                best_true, best = true, value
    return keeps / (nights * experiments), 1.0


def table(nights, experiments, seed):
    """Rows (effect, kit keep rate, kit runs per experiment, old keep rate) for EFFECTS."""
    return [(effect, *simulate_kit_rule(effect, nights, experiments, seed),
             simulate_old_rule(effect, nights, experiments, seed)[0]) for effect in EFFECTS]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="The README and docs/design.md quote this table.")
    parser.add_argument("--nights", type=int, default=100, help="simulated nights (default 100)")
    parser.add_argument("--experiments", type=int, default=20, help="experiments per night (default 20)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    args = parser.parse_args()
    if args.nights < 1 or args.experiments < 1:
        parser.error("--nights and --experiments must be at least 1")
    print(f"{args.nights} nights x {args.experiments} experiments, seed {args.seed}, "
          f"best confirmed to {BEST_RUNS} runs")
    print("| true gain | kept (kit rule) | runs per experiment | kept (old one-sigma rule) |")
    print("| --- | --- | --- | --- |")
    for effect, kept, runs, old in table(args.nights, args.experiments, args.seed):
        print(f"| {effect:g} sigma | {100 * kept:.1f}% | {runs:.2f} | {100 * old:.1f}% |")


if __name__ == "__main__":
    main()
