"""The keep rule: when is a candidate's val_bpb really better than the best's, and when to rerun.

Everything here is plain statistics on lists of val_bpb values (and, when the runs carry them, the
machine speeds of backends/machine_speed.py); it knows nothing of git, files or training, so it can
be read on its own and simulated (tools/simulate_verdicts.py proves its error rates on seeded fake
runs through these same functions).

The rule, and why it is this one:
- Noise is measured, never assumed. sigma is the spread of single runs of the same code, pooled
  over every group of same-commit runs of one kind (baseline repeats, reruns, confirmations):
  sum of squared deviations from each group's mean over sum of (group size - 1). It counts only
  once it rests on at least MIN_NOISE_RUNS runs; before that the candidate is rerun, so its own
  reruns measure it.
- The machine is taken out. On a shared host the same code trains more or fewer steps in the
  budget as the host's speed moves, and that is most of the spread. When every run of the best and
  the candidate carries the probe's rates (a matmul rate and a memory copy rate), val_bpb is
  regressed on the log of each rate within each same-commit group (one slope per rate, pooled over
  every group, like sigma), and every value is corrected to a common speed: sigma is then the
  residual spread, one degree of freedom poorer per rate, and the comparison's standard error
  includes the slopes' own uncertainty. Each rate gets its own slope because which one follows the
  training depends on the host: on one VM the copy rate wandered 52-77 GB/s with no link to the
  steps while the matmul rate followed them, and one index of both corrected nothing
  (docs/measurements.md). A rate whose slope is not negative (faster hours scoring worse) is
  noise, not the machine, and one whose slope's t is not under -1 costs more in freedom than it
  explains (fitted, it would raise the residual sigma): either leaves the fit. The probe measures
  the machine with fixed work, never the run's own steps or tokens per second, so a code change
  that makes the step slower still pays for it.
- The best's value is the mean of all its runs, and the best is confirmed until it has
  best_runs_target() of them (BEST_RUNS without the correction; fewer when the corrected sigma
  makes fewer runs as precise in val_bpb as BEST_RUNS raw runs were): one lucky run cannot set the
  bar, and a rerun of the best refines it instead of moving it by luck.
- A candidate is judged by Student's t: t = (mean(best) - mean(candidate)) / standard error,
  looked at after each of its at most MAX_RUNS runs (a small group-sequential test). A first run
  under DROP_BELOW[1] is discarded at once (the early stop: most ideas do nothing or harm), a keep
  always needs a second run whose two runs agree within the noise (AGREE), and the grey zone in
  between is rerun. Until the candidate has WELCH_RUNS runs the standard error is
  sigma * sqrt(1/m + 1/k); from then on its own spread counts (Welch): sigma^2/m for the best, the
  candidate's own variance/k for it, on Welch-Satterthwaite's degrees of freedom, so a candidate
  noisier than the best cannot buy keeps with the best's small sigma. The boundaries were chosen
  by simulating whole nights on the measured noise model (tools/simulate_verdicts.py): a change
  with no effect is kept under 5% of the time, also for the first experiment after a baseline,
  when sigma has its fewest degrees of freedom, and for a candidate twice as noisy as the best,
  while a night finds as much real gain as the early stop and the small confirmations allow
  (docs/design.md has the figures).
  A sequential t-test was preferred to a bootstrap (too few runs to resample) and to a Bayesian
  rule (it would need a prior on effect sizes that nobody can state for a new machine).
- Drift. The host can speed up or slow down over a night, and the best's runs were taken hours
  ago. When the caller can run the best (judge_candidate's run_best; the serial runner always
  can), a would-be keep first reruns the best RECHECK_RUNS times: if the fresh runs moved from the old mean by more than DRIFT_T
  standard errors, the old runs are stale and the best is the fresh runs alone; else they join it.
  The candidate is then judged again. probe_drift() says when the probe itself has left the range
  the best was measured in, so the best should be re-measured before the next experiment.
- An explicit threshold (`run --threshold X`) replaces the test: keep when the mean improves on
  the best's by more than X, judged from THRESHOLD_RUNS runs, never one. The user then owns the
  error rate.
- A simplification (a change that removes lines) is kept by a non-inferiority test: when the
  candidate is not worse than the best by SIMPLIFY_MARGIN sigma, at the one-sided levels
  SIMPLIFY_LEVEL: a removal that really costs the whole margin is kept under 5% of the time
  (simulated: 3.5% right after a baseline, 1.7% over a night).
"""

import math
from dataclasses import dataclass

from tools.student_t import student_t_quantile

MAX_RUNS = 4            # a candidate's first run and at most three automatic reruns
MIN_KEEP_RUNS = 2       # a keep is always confirmed by a second run of the same commit
BEST_RUNS = 6           # the best is rerun (confirmed) until its mean rests on this many runs...
MIN_BEST_RUNS = 3       # ...or on as few as this when the corrected sigma is small (best_runs_target)
MIN_NOISE_RUNS = 3      # sigma counts only when pooled from at least this many runs
WELCH_RUNS = 3          # from this many runs, a candidate's own spread counts (Welch)
KEEP_LEVEL = {2: 0.015, 3: 0.015, 4: 0.015}  # one-sided t level for a keep at a candidate's run k
DROP_BELOW = {1: 0.5, 2: 0.8, 3: 1.2}      # t under which a candidate is discarded, no rerun
AGREE = 0.7             # a keep at k=2 needs |run1 - run2| <= AGREE * sigma * sqrt(2), else a third run
MAX_VOID_RUNS = 2       # runs that are not evidence (disturbed) tolerated per experiment
THRESHOLD_RUNS = 2      # an explicit --threshold judges the mean of at least this many runs
RECHECK_RUNS = 1        # fresh runs of the best before a keep, when the caller can run the best
DRIFT_T = 2.0           # fresh best runs this many standard errors off the old mean: the host drifted
PROBE_DRIFT = 0.05      # the probe left the best's speed range by this fraction: re-measure the best
RATE_NAMES = ("matmul rate", "memory rate")  # a two-rate speed's order, as tools/training_run.py reads the probe
SIMPLIFY_MARGIN = 1.0   # a simplification may cost up to this many sigma...
SIMPLIFY_LEVEL = {2: 0.03, 3: 0.04, 4: 0.05}  # ...one that costs it all is kept under 5% (simulated)
SIMPLIFY_DROP_BELOW = {1: -0.5, 2: 0.0, 3: 0.5}  # non-inferiority t under which it is discarded


@dataclass(frozen=True)
class Noise:
    """Pooled run-to-run spread: sigma (None until measured), the runs it rests on, its dof.
    With machine speeds: sigma is the residual after the machine, slope the d val_bpb / d log(rate)
    of each of the probe's rates (0.0 for a rate left out of the fit), slope_covariance the inverse
    of the pooled within-group sums of squares and products of the log rates (the slopes'
    covariance over sigma^2), raw_sigma the uncorrected one."""
    sigma: float | None
    runs: int
    dof: int
    slope: tuple | None = None
    slope_covariance: tuple | None = None
    raw_sigma: float | None = None

    def describe(self):
        if self.sigma is None:
            return f"sigma not measured yet ({self.runs} repeat runs, needs {MIN_NOISE_RUNS})"
        if self.slope is None:
            return f"sigma {self.sigma:.6f} from {self.runs} runs"
        return (f"sigma {self.sigma:.6f} corrected for the machine's speed from {self.runs} runs "
                f"(raw {self.raw_sigma:.6f})")


@dataclass(frozen=True)
class Decision:
    """What to do with a candidate after its latest run: keep, discard or rerun, and why."""
    action: str
    reason: str
    difference: float = math.nan  # mean(best) - mean(candidate), corrected: positive is an improvement
    t: float = math.nan
    noise: Noise | None = None


def mean(values):
    return sum(values) / len(values)


def log_rates(speed):
    """A run's machine speed as a tuple of log rates: a number is one rate, a tuple (the probe's
    matmul and memory rates) one per rate."""
    return tuple(math.log(r) for r in speed) if isinstance(speed, (tuple, list)) else (math.log(speed),)


def _valid(speed):
    rates = speed if isinstance(speed, (tuple, list)) else (speed,)
    return bool(rates) and all(isinstance(r, (int, float)) and math.isfinite(r) and r > 0 for r in rates)


def within_group_sums(groups, log_speeds, width=0):
    """Sums of squares and products about each group's means, over the groups of at least two
    runs: (Syy, Sxy, Sxx, runs, dof), Syy of the values, Sxy a list over the width log rates of
    each run (log_speeds: a list per group, or None per group with width 0), Sxx their matrix."""
    syy, sxy, sxx = 0.0, [0.0] * width, [[0.0] * width for _ in range(width)]
    runs = dof = 0
    for values, speeds in zip(groups, log_speeds):
        if len(values) < 2:
            continue
        y_mean = mean(values)
        x_mean = [mean([x[j] for x in speeds]) for j in range(width)]
        for i, y in enumerate(values):
            x = [speeds[i][j] - x_mean[j] for j in range(width)]
            syy += (y - y_mean) ** 2
            for j in range(width):
                sxy[j] += x[j] * (y - y_mean)
                for other in range(width):
                    sxx[j][other] += x[j] * x[other]
        runs += len(values)
        dof += len(values) - 1
    return syy, sxy, sxx, runs, dof


def inverse_matrix(matrix):
    """The inverse of a small symmetric matrix (Gauss-Jordan), or None when it is singular."""
    n = len(matrix)
    work = [list(row) + [float(i == j) for j in range(n)] for i, row in enumerate(matrix)]
    scale = max((abs(matrix[i][i]) for i in range(n)), default=0.0)
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(work[r][col]))
        if abs(work[pivot][col]) <= 1e-12 * scale or scale == 0:
            return None
        work[col], work[pivot] = work[pivot], work[col]
        lead = work[col][col]
        work[col] = [v / lead for v in work[col]]
        for row in range(n):
            if row != col and work[row][col]:
                factor = work[row][col]
                work[row] = [a - factor * b for a, b in zip(work[row], work[col])]
    return [row[n:] for row in work]


def pooled_noise(groups, speed_groups=None):
    """Noise from groups of same-commit runs (lists of val_bpb); groups of one run add nothing.

    speed_groups: the machine speeds of those runs, a list per group in the same order (a speed is
    a number or a tuple of the probe's rates, see log_rates). Given, val_bpb is regressed on the
    log rates within groups, one slope per rate pooled over every group, and sigma is the residual
    spread (the groups whose runs lack a speed, or carry other rates than the last group's, are
    left out: their spread includes the machine). Each rate's slope must be negative: a faster
    machine trains more steps of the same code in the budget and never a worse model, so a slope
    that is not says that rate did not follow the training (corrected with it, a candidate on a
    slow hour would be charged for the machine). It must also pay for its degree of freedom: its
    t under -1, which is when fitting it beside the others lowers the residual sigma (two slopes
    on a baseline's six runs could otherwise fit noise into a sigma above the raw one). A rate
    that fails, or one there are too few runs to fit beside the others, leaves the fit, the
    weakest first, and the rest are fitted again; with no rate left the raw sigma is returned."""
    raw = _raw_noise(groups)
    if speed_groups is None:
        return raw
    complete = [(g, sp) for g, sp in zip(groups, speed_groups) if speeds_complete(sp, len(g))]
    if not complete:
        return raw
    width = len(log_rates(complete[-1][1][0]))
    kept = [(g, [log_rates(s) for s in sp]) for g, sp in complete if len(log_rates(sp[0])) == width]
    syy, sxy, sxx, runs, dof = within_group_sums([g for g, _ in kept], [x for _, x in kept], width)
    active = list(range(width))
    while active:
        fitted = _fit(syy, sxy, sxx, active, runs, dof)
        if fitted is not None and all(t < -1 for t in fitted[2].values()):
            slope, covariance, _, sigma = fitted
            return Noise(sigma, runs, dof - len(active), slope, covariance, raw.sigma)
        active.remove(_weakest(sxy, sxx, active, fitted))
    return raw


def _fit(syy, sxy, sxx, active, runs, dof):
    """(slopes, their covariance over sigma^2, {rate: the t of its slope}, residual sigma) over the
    active rates, slopes and covariance full-width with zeros for the others; None with too few
    runs to fit them or when the rates move together."""
    if runs < MIN_NOISE_RUNS + len(active) or dof < len(active) + 1:
        return None
    inverse = inverse_matrix([[sxx[j][other] for other in active] for j in active])
    if inverse is None:
        return None
    width = len(sxy)
    slope, covariance = [0.0] * width, [[0.0] * width for _ in range(width)]
    for a, j in enumerate(active):
        slope[j] = sum(inverse[a][b] * sxy[other] for b, other in enumerate(active))
        for b, other in enumerate(active):
            covariance[j][other] = inverse[a][b]
    residual = max(syy - sum(slope[j] * sxy[j] for j in active), 0.0)
    sigma = math.sqrt(residual / (dof - len(active)))
    t = {j: slope[j] / (sigma * math.sqrt(covariance[j][j])) if sigma > 0 else math.copysign(math.inf, slope[j])
         for j in active}
    return tuple(slope), tuple(tuple(row) for row in covariance), t, sigma


def _weakest(sxy, sxx, active, fitted):
    """The rate to leave out next: the one whose slope's t is the highest (least negative); without
    a fit, the one least linked to val_bpb on its own."""
    def strength(j):
        if fitted is not None:
            return fitted[2][j]
        return sxy[j] / math.sqrt(sxx[j][j]) if sxx[j][j] > 0 else math.inf
    return max(active, key=strength)


def _raw_noise(groups):
    syy, _, _, runs, dof = within_group_sums(groups, [None] * len(groups))
    if runs < MIN_NOISE_RUNS or dof < 1:
        return Noise(None, runs, dof)
    return Noise(math.sqrt(syy / dof), runs, dof)


def corrected(values, speeds, noise):
    """values corrected to the machine speed 1.0 with noise's slopes (unchanged without them)."""
    if noise.slope is None or speeds is None:
        return list(values)
    return [v - sum(b * x for b, x in zip(noise.slope, log_rates(s))) for v, s in zip(values, speeds)]


@dataclass(frozen=True)
class Comparison:
    """The corrected difference mean(best) - mean(candidate), its standard error and dof."""
    difference: float
    error: float
    dof: float
    noise: Noise

    @property
    def t(self):
        if self.error == 0:
            return math.inf if self.difference > 0 else (-math.inf if self.difference < 0 else 0.0)
        return self.difference / self.error


def compare(candidate, best, repeat_groups=(), candidate_speeds=None, best_speeds=None, repeat_speeds=None):
    """The comparison the rule judges, or a Noise whose sigma is None while noise is unmeasured.

    Speeds are used only when every run of the best and the candidate has one (repeat_speeds: a
    list per repeat group, None for a group without)."""
    k, m = len(candidate), len(best)
    speeds = None
    if (speeds_complete(candidate_speeds, k) and speeds_complete(best_speeds, m)
            and len(log_rates(candidate_speeds[0])) == len(log_rates(best_speeds[0]))):
        speeds = [*(repeat_speeds or [None] * len(repeat_groups)), list(best_speeds), list(candidate_speeds)]
    groups = [*repeat_groups, list(best), list(candidate)]
    noise = pooled_noise(groups, speeds)
    if noise.sigma is None:
        return noise
    cand = corrected(candidate, candidate_speeds, noise)
    base = corrected(best, best_speeds, noise)
    difference = mean(base) - mean(cand)
    slope_term = 0.0
    if noise.slope is not None:
        best_logs, candidate_logs = [log_rates(s) for s in best_speeds], [log_rates(s) for s in candidate_speeds]
        gap = [mean([x[j] for x in best_logs]) - mean([x[j] for x in candidate_logs]) for j in range(len(noise.slope))]
        slope_term = sum(gap[j] * noise.slope_covariance[j][other] * gap[other]
                         for j in range(len(gap)) for other in range(len(gap)))
    if k < WELCH_RUNS:
        error = noise.sigma * math.sqrt(1 / m + 1 / k + slope_term)
        return Comparison(difference, error, noise.dof, noise)
    # Welch: the best's part rests on the pooled sigma of the other groups, the candidate's on its own spread.
    others = pooled_noise(groups[:-1], speeds[:-1] if speeds else None)
    if others.sigma is None or (noise.slope is not None and others.slope is None):
        others = noise
    own = sum((v - mean(cand)) ** 2 for v in cand) / (k - 1)
    best_part = others.sigma ** 2 * (1 / m + slope_term)
    cand_part = own / k
    error = math.sqrt(best_part + cand_part)
    if best_part + cand_part == 0:
        return Comparison(difference, 0.0, others.dof, noise)
    dof = (best_part + cand_part) ** 2 / (best_part ** 2 / others.dof + cand_part ** 2 / (k - 1))
    return Comparison(difference, error, dof, noise)


def speeds_complete(speeds, count):
    """Every one of count runs has a valid speed, all of one width (the same rates): then the rule
    corrects for the machine."""
    return (speeds is not None and len(speeds) == count and count > 0 and all(_valid(s) for s in speeds)
            and len({len(log_rates(s)) for s in speeds}) == 1)


def decide(candidate, best, repeat_groups=(), threshold=None, *, candidate_speeds=None, best_speeds=None,
           repeat_speeds=None, simplify=False):
    """Keep, discard or rerun a candidate with these runs against the best's runs.

    repeat_groups: the other same-commit groups of the same kind, for the pooled sigma (the best's
    and the candidate's own runs are added here). The speeds, when given, are the runs' machine
    speeds in the same order (see compare). simplify judges a simplification (non-inferiority)."""
    k = len(candidate)
    speeds = {"candidate_speeds": candidate_speeds, "best_speeds": best_speeds, "repeat_speeds": repeat_speeds}
    if threshold is not None:
        return _decide_threshold(candidate, best, repeat_groups, threshold, speeds)
    comparison = compare(candidate, best, repeat_groups, **speeds)
    if isinstance(comparison, Noise):
        raw_difference = mean(best) - mean(candidate)
        action = "rerun" if k < MAX_RUNS else "discard"
        return Decision(action, comparison.describe(), raw_difference, noise=comparison)
    if simplify:
        return _decide_simplification(comparison, k)
    t, noise = comparison.t, comparison.noise
    args = (comparison.difference, t, noise)
    needed = _keep_bar(KEEP_LEVEL, k, comparison.dof)
    runs = f"{k} run{'s' if k > 1 else ''}"
    if t > needed:
        if k == 2 and _runs_disagree(candidate, candidate_speeds, noise):
            return Decision("rerun", f"{standing(t)}, but its two runs disagree: a third", *args)
        return Decision("keep", f"better by {t:.1f} standard errors", *args)
    if k < MAX_RUNS and t < DROP_BELOW[k]:
        return Decision("discard", f"{standing(t)} after {runs}, under the {DROP_BELOW[k]:.1f} better a rerun "
                                   f"needs", *args)
    if k < MAX_RUNS:
        return Decision("rerun", f"{standing(t)} after {runs}: grey zone", *args)
    return Decision("discard", f"{standing(t)} after {runs}, short of the {needed:.1f} a keep needs", *args)


def _keep_bar(levels, k, dof):
    """The t a keep needs after k runs at these one-sided levels; infinite before MIN_KEEP_RUNS."""
    return student_t_quantile(1 - levels[min(k, MAX_RUNS)], dof) if k >= MIN_KEEP_RUNS else math.inf


def standing(t):
    """'1.8 standard errors better' or '0.5 standard errors worse': the t of a comparison in words,
    so its sign cannot be read against the val_bpb difference's (where negative is better)."""
    return f"{abs(t):.1f} standard errors {'better' if t >= 0 else 'worse'}"


def _runs_disagree(candidate, speeds, noise):
    """Two runs further apart than AGREE * sigma * sqrt(2): the candidate may be noisier than the
    best, which two runs cannot measure, so a third run lets Welch's test see it."""
    first, second = corrected(candidate, speeds, noise)
    return abs(first - second) > AGREE * noise.sigma * math.sqrt(2)


def _decide_threshold(candidate, best, repeat_groups, threshold, speeds):
    """The user's rule: keep when the (corrected) mean beats the best's by more than threshold,
    judged on THRESHOLD_RUNS runs."""
    k = len(candidate)
    comparison = compare(candidate, best, repeat_groups, **speeds)
    difference = (comparison.difference if isinstance(comparison, Comparison)
                  else mean(best) - mean(candidate))
    if k < THRESHOLD_RUNS:
        return Decision("rerun", f"threshold {threshold:.6f} given: it judges {THRESHOLD_RUNS} runs, "
                                 f"this is run {k}", difference)
    action = "keep" if difference > threshold else "discard"
    return Decision(action, f"threshold {threshold:.6f} given, mean of {k} runs", difference)


def _decide_simplification(comparison, k):
    """Non-inferiority: keep when the candidate is not worse than the best by SIMPLIFY_MARGIN sigma."""
    margin = SIMPLIFY_MARGIN * comparison.noise.sigma
    t = comparison.t if comparison.error == 0 else (comparison.difference + margin) / comparison.error
    args = (comparison.difference, t, comparison.noise)
    needed = _keep_bar(SIMPLIFY_LEVEL, k, comparison.dof)
    reason = f"{abs(t):.1f} standard errors {'inside' if t >= 0 else 'outside'} the margin of {margin:.6f}"
    if needed < math.inf:
        reason += f" (a keep needs {needed:.1f} inside)"
    if t > needed:
        return Decision("keep", f"simplification not worse: {reason}", *args)
    if k < MAX_RUNS and t < SIMPLIFY_DROP_BELOW[k]:
        return Decision("discard", f"simplification not worth a rerun: {reason}", *args)
    if k < MAX_RUNS:
        return Decision("rerun", f"simplification in the grey zone: {reason}", *args)
    return Decision("discard", f"simplification not shown harmless after {k} runs: {reason}", *args)


def best_runs_target(noise):
    """How many runs the best's mean should rest on: BEST_RUNS raw runs' precision in val_bpb,
    sigma_corrected^2 / m <= sigma_raw^2 / BEST_RUNS, between MIN_BEST_RUNS and BEST_RUNS."""
    if noise is None or noise.sigma is None or noise.slope is None or not noise.raw_sigma:
        return BEST_RUNS
    needed = math.ceil(BEST_RUNS * (noise.sigma / noise.raw_sigma) ** 2 - 1e-9)
    return max(MIN_BEST_RUNS, min(BEST_RUNS, needed))


def probe_drift(best_speeds, recent_speeds, noise=None):
    """Why the best should be re-measured because the machine's speed left the range it was measured
    in (the correction's slopes would extrapolate), or None. Each rate is checked apart; given noise
    with slopes, only the rates the correction uses. Fractions of the rate."""
    if not best_speeds or not recent_speeds or not speeds_complete(best_speeds, len(best_speeds)):
        return None
    best_logs, recent_logs = [log_rates(s) for s in best_speeds], [log_rates(s) for s in recent_speeds]
    width = len(best_logs[0])
    if any(len(x) != width for x in recent_logs):
        return None
    used = [j for j in range(width) if noise is None or noise.slope is None or noise.slope[j] != 0.0]
    for j in used:
        name = RATE_NAMES[j] if j < len(RATE_NAMES) else f"rate {j + 1}"
        what = "the machine" if width == 1 else f"the machine's {name}"
        recent = math.exp(mean([x[j] for x in recent_logs]))
        low, high = (math.exp(f([x[j] for x in best_logs])) for f in (min, max))
        if recent > high * (1 + PROBE_DRIFT):
            return f"{what} is {100 * (recent / high - 1):.0f}% faster than in any of the best's runs"
        if recent < low * (1 - PROBE_DRIFT):
            return f"{what} is {100 * (1 - recent / low):.0f}% slower than in any of the best's runs"
    return None


def drifted(old, fresh, noise, old_speeds=None, fresh_speeds=None):
    """Did the best's fresh runs move from its old mean by more than DRIFT_T standard errors?"""
    if noise is None or noise.sigma is None or not old or not fresh:
        return False
    speeds_ok = (speeds_complete(old_speeds, len(old)) and speeds_complete(fresh_speeds, len(fresh))
                 and noise.slope is not None
                 and len(log_rates(old_speeds[0])) == len(log_rates(fresh_speeds[0])) == len(noise.slope))
    then = mean(corrected(old, old_speeds if speeds_ok else None, noise))
    now = mean(corrected(fresh, fresh_speeds if speeds_ok else None, noise))
    error = noise.sigma * math.sqrt(1 / len(old) + 1 / len(fresh))
    return error > 0 and abs(now - then) > DRIFT_T * error


@dataclass(frozen=True)
class Outcome:
    """One run as the loop sees it: a val_bpb (with the machine's speed when probed); or a crash or
    a rejection (over budget), which end the experiment as the idea's failure; or void (a disturbed
    machine: not evidence, rerun)."""
    value: float | None = None
    crash: str | None = None
    rejected: str | None = None
    void: str | None = None
    speed: float | None = None


@dataclass(frozen=True)
class Verdict:
    """The end of one experiment: status keep/discard/crash/void, the candidate's evidence values.
    When the best was rechecked: its values (and speeds) as the verdict used them, and whether the
    old ones were dropped as drifted."""
    status: str
    values: tuple
    decision: Decision | None = None
    reason: str = ""
    speeds: tuple = ()
    best_values: tuple | None = None
    best_speeds: tuple | None = None
    drift: bool = False


def judge_candidate(run_once, best, repeat_groups=(), threshold=None, *, best_speeds=None, repeat_speeds=None,
                    simplify=False, run_best=None):
    """Run a candidate until the rule decides. run_once(attempt) -> Outcome; attempt counts from 1.

    A crash ends the experiment (a script that crashes sometimes is broken). A void run (disturbed
    machine) is rerun, up to MAX_VOID_RUNS times, then the experiment is void: no verdict on the
    idea. The candidate's values are evidence only inside this experiment and for sigma.
    run_best(attempt) -> Outcome runs the best once more: given, a would-be keep first rechecks the
    best (RECHECK_RUNS runs) for drift. Speeds are used when every run carries one.
    """
    values, speeds, voids, attempt = [], [], 0, 0
    best, best_speeds = list(best), (list(best_speeds) if best_speeds is not None else None)
    checked = drift = False
    while True:
        attempt += 1
        outcome = run_once(attempt)
        if outcome.crash is not None:
            return Verdict("crash", tuple(values), reason=outcome.crash, speeds=tuple(speeds))
        if outcome.rejected is not None:
            return Verdict("discard", tuple(values), reason=outcome.rejected, speeds=tuple(speeds))
        if outcome.value is None:
            voids += 1
            if voids > MAX_VOID_RUNS:
                return Verdict("void", tuple(values), reason=outcome.void or "not evidence", speeds=tuple(speeds))
            continue
        values.append(outcome.value)
        speeds.append(outcome.speed)
        options = {"candidate_speeds": speeds, "repeat_speeds": repeat_speeds, "simplify": simplify}
        decision = decide(values, best, repeat_groups, threshold, best_speeds=best_speeds, **options)
        if decision.action == "keep" and run_best is not None and not checked:
            checked = True
            old, old_speeds = best, best_speeds
            best, best_speeds, drift = _recheck_best(run_best, best, best_speeds, decision.noise)
            if drift:
                # The old runs no longer give the best's level, but their spread still measures the noise.
                repeat_groups = [*repeat_groups, old]
                if repeat_speeds is not None or old_speeds is not None:
                    repeat_speeds = [*(repeat_speeds or [None] * (len(repeat_groups) - 1)), old_speeds]
                options["repeat_speeds"] = repeat_speeds
            decision = decide(values, best, repeat_groups, threshold, best_speeds=best_speeds, **options)
        if decision.action != "rerun":
            rechecked = (tuple(best), tuple(best_speeds) if best_speeds is not None else None) if checked else (None, None)
            reason = decision.reason + ("; the best drifted and was re-measured" if drift else "")
            return Verdict(decision.action, tuple(values), decision, reason, tuple(speeds), *rechecked, drift)


def _recheck_best(run_best, best, best_speeds, noise):
    """RECHECK_RUNS fresh runs of the best; (values, speeds, drifted). When the fresh runs moved
    from the old mean (drifted), the old runs are stale and the best stands on the fresh runs
    alone (more fresh runs would only make the next drifted keep easier); else old and fresh
    runs together. A void run is retried up to MAX_VOID_RUNS times; a crash stops the recheck."""
    fresh, fresh_speeds, misses, attempt = [], [], 0, 0
    while len(fresh) < RECHECK_RUNS and misses <= MAX_VOID_RUNS:
        attempt += 1
        outcome = run_best(attempt)
        if outcome.crash is not None or outcome.rejected is not None:
            break
        if outcome.value is None:
            misses += 1
        else:
            fresh.append(outcome.value)
            fresh_speeds.append(outcome.speed)
    if not fresh:
        return best, best_speeds, False
    with_speeds = best_speeds is not None and speeds_complete(fresh_speeds, len(fresh))
    if drifted(best, fresh, noise, best_speeds, fresh_speeds):
        return fresh, (fresh_speeds if with_speeds else None), True
    return best + fresh, (best_speeds + fresh_speeds if with_speeds else None), False


def confirm_best(run_once, best, target=BEST_RUNS):
    """Rerun the best until it has `target` evidence runs (bounded by MAX_VOID_RUNS misses).

    Returns the best's values, old and new. A void run (disturbed) is rerun, at most MAX_VOID_RUNS
    times; a crash or an over-budget run stops the confirmation: the code itself is at fault, and
    rerunning it would only spend the night.
    """
    return confirm_best_runs(run_once, best, None, target)[0]


def confirm_best_runs(run_once, best, best_speeds=None, target=BEST_RUNS):
    """confirm_best that also returns the runs' machine speeds: (values, speeds), speeds None when
    best_speeds is None."""
    values, speeds, voids, attempt = list(best), (list(best_speeds) if best_speeds is not None else None), 0, 0
    while len(values) < target and voids <= MAX_VOID_RUNS:
        attempt += 1
        outcome = run_once(attempt)
        if outcome.crash is not None or outcome.rejected is not None:
            break
        if outcome.value is None:
            voids += 1
        else:
            values.append(outcome.value)
            if speeds is not None:
                speeds.append(outcome.speed)
    return values, speeds
