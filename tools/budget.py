"""Training outside the budget is never a win: the wall-clock allowance and the untimed-token share.

The time budget counts only a script's timed steps, and which steps are timed is decided by the
script the agent edits. So the runner checks what the script cannot misreport, the wall time of the
training process from start to exit, against the harness's TIME_BUDGET plus an allowance, and it
checks the script's token accounting:

- wall time <= TIME_BUDGET + ALLOWANCE_SECONDS + ALLOWANCE_FRACTION * TIME_BUDGET. The fixed part
  covers `uv run`, importing torch or MLX, building the model and a cold compile of new shapes; the
  proportional part covers the warm-up steps and the evaluation, which grow with the tier. Measured
  on the 2-core CPU tier (docs/design.md): 20-30 s outside training with a warm compile cache,
  about 70 s with a cold one, on a 300 s budget whose allowance is 120 s.
- the untimed steps train at most FREE_STEPS steps or UNTIMED_TOKEN_SHARE of the run's tokens,
  whichever is more: two steps are what compilation and the allocator's first growth need; more
  than that is training outside the budget.
- the tokens add up: timed + untimed = num_steps x total_batch_size = total_tokens_M (the scripts
  report all four). A result that cannot show its accounting cannot be trusted to be inside it.

A result that fails any check is recorded as `over budget` and never kept, whatever its val_bpb.
Training before the first step that no step reports is bounded only by the wall-time allowance;
program.md forbids it and the experiment's diff would show it.
"""

ALLOWANCE_SECONDS = 60.0
ALLOWANCE_FRACTION = 0.2
UNTIMED_TOKEN_SHARE = 0.05
FREE_STEPS = 2
ACCOUNTING_KEYS = ("timed_tokens", "untimed_tokens", "untimed_steps", "total_batch_size")


def allowance_seconds(time_budget):
    """Seconds a run may spend outside its timed steps, for this time budget."""
    return ALLOWANCE_SECONDS + ALLOWANCE_FRACTION * float(time_budget)


def over_budget(fields, wall_seconds, time_budget):
    """Why this result is over budget, or None when it is inside. time_budget is the harness's."""
    return wall_time_problem(wall_seconds, time_budget) or token_problem(fields)


def wall_time_problem(wall_seconds, time_budget):
    """Why this wall time is past the allowance, or None."""
    limit = float(time_budget) + allowance_seconds(time_budget)
    if wall_seconds > limit:
        return (f"over budget: {wall_seconds:.0f} s wall for a {float(time_budget):g} s budget, "
                f"at most {limit:.0f} s")
    return None


def token_problem(fields):
    """Why this run's token accounting is missing, inconsistent or past the untimed share, or None."""
    missing = [key for key in ACCOUNTING_KEYS if not isinstance(fields.get(key), (int, float))]
    if missing:
        return f"over budget: the script reports no {', '.join(missing)}, so its tokens cannot be checked"
    timed, untimed = int(fields["timed_tokens"]), int(fields["untimed_tokens"])
    steps, batch = int(fields["num_steps"]), int(fields["total_batch_size"])
    total = timed + untimed
    if (untimed != int(fields["untimed_steps"]) * batch or total != steps * batch
            or abs(total / 1e6 - float(fields["total_tokens_M"])) > 0.05 + 1e-9):
        return (f"over budget: tokens do not add up ({timed:,} timed + {untimed:,} untimed, "
                f"{steps} steps x {batch:,}, total_tokens_M {fields['total_tokens_M']})")
    free = max(UNTIMED_TOKEN_SHARE * total, FREE_STEPS * batch)
    if untimed > free:
        return (f"over budget: untimed steps trained {untimed:,} of {total:,} tokens "
                f"({100 * untimed / total:.0f}%, at most {FREE_STEPS} steps or "
                f"{100 * UNTIMED_TOKEN_SHARE:g}%)")
    return None
