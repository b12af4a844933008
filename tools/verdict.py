"""The keep rule: when is a candidate's val_bpb really better than the best's, and when to rerun.

Everything here is plain statistics on lists of val_bpb values; it knows nothing of git, files or
training, so it can be read on its own and simulated (tools/simulate_verdicts.py proves its error
rates on seeded fake runs through these same functions).

The rule, and why it is this one:
- Noise is measured, never assumed. sigma is the spread of single runs of the same code, pooled
  over every group of same-commit runs of one kind (baseline repeats, reruns, confirmations):
  sum of squared deviations from each group's mean over sum of (group size - 1). It counts only
  once it rests on at least MIN_NOISE_RUNS runs; before that the candidate is rerun, so its own
  reruns measure it.
- The best's value is the mean of all its runs, and the best is confirmed until it has BEST_RUNS
  of them: one lucky run cannot set the bar, and a rerun of the best refines it instead of moving
  it by luck. The old rule (beat the best single run by one sigma) kept a change with no effect
  about a quarter of the time, because the difference of two single runs has sigma * sqrt(2).
- A candidate is judged by Student's t with the pooled sigma: t = (mean(best) - mean(candidate))
  / (sigma * sqrt(1/m + 1/k)) on sigma's degrees of freedom, looked at after each of its
  at most MAX_RUNS runs (a small group-sequential test). A clear loser is discarded after one run,
  a keep always needs a confirming second run, and the grey zone in between is rerun. The
  boundaries (KEEP_LEVEL, DROP_BELOW, BEST_RUNS) were chosen by simulation so that a change with
  no effect is kept at most 5% of the time and a real gain of 2 sigma at least 80% of the time,
  even for the first experiment after a baseline, when sigma has its fewest degrees of freedom
  (the keep levels add up to 6.5%: since each look's t is exactly t-distributed, that bounds the
  false keeps at any dof, and the looks overlap enough that about 4% happen). A null idea costs
  about two runs, a clear loser one (docs/design.md has the measured table).
  A sequential t-test was preferred to a bootstrap (too few runs to resample) and to a Bayesian
  rule (it would need a prior on effect sizes that nobody can state for a new machine).
- An explicit threshold (`run --threshold X`) replaces the test: keep when the mean improves on
  the best's by more than X, after one run. The user then owns the error rate.
"""

import math
from dataclasses import dataclass

MAX_RUNS = 4            # a candidate's first run and at most three automatic reruns
MIN_KEEP_RUNS = 2       # a keep is always confirmed by a second run of the same commit
BEST_RUNS = 6           # the best is rerun (confirmed) until its mean rests on this many runs
MIN_NOISE_RUNS = 3      # sigma counts only when pooled from at least this many runs
KEEP_LEVEL = {2: 0.01, 3: 0.02, 4: 0.035}  # one-sided t level for a keep at a candidate's run k
DROP_BELOW = {1: -0.5, 2: 0.5, 3: 1.0}     # t under which a candidate is discarded, no rerun
MAX_VOID_RUNS = 2       # runs that are not evidence (disturbed) tolerated per experiment


@dataclass(frozen=True)
class Noise:
    """Pooled run-to-run spread: sigma (None until measured), the runs it rests on, its dof."""
    sigma: float | None
    runs: int
    dof: int

    def describe(self):
        if self.sigma is None:
            return f"sigma not measured yet ({self.runs} repeat runs, needs {MIN_NOISE_RUNS})"
        return f"sigma {self.sigma:.6f} from {self.runs} runs"


@dataclass(frozen=True)
class Decision:
    """What to do with a candidate after its latest run: keep, discard or rerun, and why."""
    action: str
    reason: str
    difference: float = math.nan  # mean(best) - mean(candidate): positive is an improvement
    t: float = math.nan
    noise: Noise | None = None


def mean(values):
    return sum(values) / len(values)


def pooled_noise(groups):
    """Noise from groups of same-commit runs (lists of val_bpb); groups of one run add nothing."""
    repeated = [g for g in groups if len(g) >= 2]
    runs = sum(len(g) for g in repeated)
    dof = sum(len(g) - 1 for g in repeated)
    if runs < MIN_NOISE_RUNS or dof < 1:
        return Noise(None, runs, dof)
    squares = sum(sum((x - mean(g)) ** 2 for x in g) for g in repeated)
    return Noise(math.sqrt(squares / dof), runs, dof)


def student_t_cdf(x, dof, intervals=400):
    """P(T <= x) for Student's t with dof degrees of freedom (Simpson's rule on the density)."""
    scale = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)
    density = lambda u: scale * (1 + u * u / dof) ** (-(dof + 1) / 2)  # noqa: E731
    a = min(abs(x), 100.0)  # beyond 100 the tail is negligible at the levels used
    h = a / intervals
    area = density(0) + density(a) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    upper_half = area * h / 3
    return 0.5 + upper_half if x >= 0 else 0.5 - upper_half


_QUANTILES = {}


def student_t_quantile(p, dof):
    """x with P(T <= x) = p, by bisection (cached: the rule asks for a handful of levels)."""
    key = (p, dof)
    if key not in _QUANTILES:
        low, high = -100.0, 100.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if student_t_cdf(middle, dof) < p else (low, middle)
        _QUANTILES[key] = (low + high) / 2
    return _QUANTILES[key]


def decide(candidate, best, repeat_groups=(), threshold=None):
    """Keep, discard or rerun a candidate with these runs against the best's runs.

    repeat_groups: the other same-commit groups of the same kind, for the pooled sigma (the best's
    and the candidate's own runs are added here).
    """
    k, m = len(candidate), len(best)
    difference = mean(best) - mean(candidate)
    if threshold is not None:
        action = "keep" if difference > threshold else "discard"
        return Decision(action, f"threshold {threshold:.6f} given", difference)
    noise = pooled_noise([*repeat_groups, list(best), list(candidate)])
    if noise.sigma is None:
        if k < MAX_RUNS:
            return Decision("rerun", noise.describe(), difference, noise=noise)
        return Decision("discard", noise.describe(), difference, noise=noise)
    if noise.sigma == 0:
        t = math.inf if difference > 0 else (-math.inf if difference < 0 else 0.0)
    else:
        t = difference / (noise.sigma * math.sqrt(1 / m + 1 / k))
    if k >= MIN_KEEP_RUNS and t > student_t_quantile(1 - KEEP_LEVEL[min(k, MAX_RUNS)], noise.dof):
        return Decision("keep", f"better by {t:.1f} standard errors", difference, t, noise)
    if k < MAX_RUNS and t < DROP_BELOW[k]:
        return Decision("discard", f"{t:+.1f} standard errors: not worth a rerun", difference, t, noise)
    if k < MAX_RUNS:
        return Decision("rerun", f"{t:+.1f} standard errors: grey zone", difference, t, noise)
    return Decision("discard", f"{t:+.1f} standard errors after {k} runs", difference, t, noise)


@dataclass(frozen=True)
class Outcome:
    """One run as the loop sees it: a val_bpb; or a crash or a rejection (over budget), which end
    the experiment as the idea's failure; or void (a disturbed machine: not evidence, rerun)."""
    value: float | None = None
    crash: str | None = None
    rejected: str | None = None
    void: str | None = None


@dataclass(frozen=True)
class Verdict:
    """The end of one experiment: status keep/discard/crash/void, the candidate's evidence values."""
    status: str
    values: tuple
    decision: Decision | None = None
    reason: str = ""


def judge_candidate(run_once, best, repeat_groups=(), threshold=None):
    """Run a candidate until the rule decides. run_once(attempt) -> Outcome; attempt counts from 1.

    A crash ends the experiment (a script that crashes sometimes is broken). A void run (disturbed
    machine) is rerun, up to MAX_VOID_RUNS times, then the experiment is void: no verdict on the
    idea. The candidate's values are evidence only inside this experiment and for sigma.
    """
    values, voids, attempt = [], 0, 0
    while True:
        attempt += 1
        outcome = run_once(attempt)
        if outcome.crash is not None:
            return Verdict("crash", tuple(values), reason=outcome.crash)
        if outcome.rejected is not None:
            return Verdict("discard", tuple(values), reason=outcome.rejected)
        if outcome.value is None:
            voids += 1
            if voids > MAX_VOID_RUNS:
                return Verdict("void", tuple(values), reason=outcome.void or "not evidence")
            continue
        values.append(outcome.value)
        decision = decide(values, best, repeat_groups, threshold)
        if decision.action != "rerun":
            return Verdict(decision.action, tuple(values), decision, decision.reason)


def confirm_best(run_once, best, target=BEST_RUNS):
    """Rerun the best until it has `target` evidence runs (bounded by MAX_VOID_RUNS misses).

    Returns the best's values, old and new. A void run (disturbed) is rerun, at most MAX_VOID_RUNS
    times; a crash or an over-budget run stops the confirmation: the code itself is at fault, and
    rerunning it would only spend the night.
    """
    values, voids, attempt = list(best), 0, 0
    while len(values) < target and voids <= MAX_VOID_RUNS:
        attempt += 1
        outcome = run_once(attempt)
        if outcome.crash is not None or outcome.rejected is not None:
            break
        if outcome.value is None:
            voids += 1
        else:
            values.append(outcome.value)
    return values
