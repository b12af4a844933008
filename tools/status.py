"""`uv run tools/experiment.py status`: where the branch stands, read from results.tsv, the runner's
state and the runs' details: the branch and its harness, an interrupted experiment, the kind a run
started now has and the defaults this machine resolved, the best and the noise (corrected for the
machine's speed where its runs were probed), the newest probe of the machine against the range the
best was measured in, the counts, the last verdict and the parallel queue.
"""

from tools import ledger, verdict
from tools.checkout import branch_base, current_branch, harness_changes, head
from tools.kind import defaults_digest, kind_or_problem, ready_ledger, resolved_defaults
from tools.parallel import queue_status, running_slot_threads
from tools.runner_state import end_orphaned_training_unless_locked, latest_probe, load_state, lock_holder, probed_speed
from tools.serial import first_description, kind_noise, speeds_context


def cmd_status(args):
    rows = ready_ledger()
    end_orphaned_training_unless_locked()
    holder = lock_holder()
    state = load_state()
    branch = current_branch() or "(detached HEAD)"
    base_name, base = branch_base()
    changed = harness_changes(base)
    harness = f"CHANGED: {', '.join(changed)}" if changed else "unchanged"
    print(f"branch       {branch} (base {base[:7]} on {base_name}; harness {harness})")
    # A killed runner leaves its unjudged experiment commit at HEAD: the best is the commit it was
    # judged against, and HEAD's advice ("run baseline") would make the unjudged change the best.
    interrupted = None if holder else state.get("in_progress")
    best = (interrupted["kept"] if interrupted else head())[:7]
    if interrupted:
        finished = len(interrupted.get("pending", []))
        print(f"interrupted  the runner was stopped before judging {interrupted['commit'][:7]} "
              f"({interrupted['description']}); the next run undoes that commit, keeps its edit staged in "
              f"{', '.join([interrupted['script'], *interrupted.get('files', [])])}, records its {finished} finished run(s) as unjudged and stops "
              f"so you can check the file")
    # The kind a run started here now has (as `run` computes it, or as `submit` does while the
    # scheduler runs CPU slots with part of the cores): the best of that kind is the bar the next
    # experiment meets, whatever kind the last runs had.
    slot_threads = running_slot_threads()
    kind, problem = kind_or_problem(slot_threads)
    present = list(dict.fromkeys(r.kind for r in rows if r.commit == best))
    if kind is None:
        print(f"kind         unknown: {problem}")
    else:
        kind = str(kind)
        runs_where = "a run on the scheduler's slots now has" if slot_threads else "a run started here now has"
        print(f"kind         {kind} (what {runs_where}; best and noise are of this kind)")
        defaults = resolved_defaults(slot_threads)
        if defaults:
            print(f"defaults     {describe_defaults(defaults)} (the machine's suggestions the "
                  f"script starts from, not the best's constants; {defaults_digest(defaults)} in the kind)")
        values = ledger.values_of(rows, best, kind)
        if values:
            print(f"best         {verdict.mean(values):.6f} mean of {len(values)} runs, {best} "
                  f"{first_description(rows, best, kind, '')} [{kind}]")
            noise = kind_noise(rows, kind, best)
            print(f"noise        {noise.describe()}" + (f", {noise.dof} degrees of freedom" if noise.sigma else ""))
        else:
            print(f"best         {best} has no results of this kind yet (measure it with: "
                  f"uv run tools/experiment.py baseline)")
    machine = machine_line(rows, kind, best)
    if machine:
        print(f"machine      {machine}")
    others = [k for k in present if k != kind]
    if others:
        print(f"other kinds  {best} also has results of kind " + "; ".join(
            f"{k} ({len(ledger.values_of(rows, best, k))} runs)" for k in others))
    counts = {status: sum(r.status == status for r in rows) for status in ledger.STATUSES}
    tally = ", ".join(f"{n} {status}" for status, n in counts.items())
    print(f"runs         {len(rows)} rows in results.tsv ({tally})")
    if holder:
        print(f"running      {holder}")
    print(f"last verdict {state.get('last_verdict', 'none yet')}")
    for line in queue_status():
        print(line)


def describe_defaults(defaults):
    """'depth 2, aspect 96, seq 512, batch 8,192 tokens (16 rows), window L, bf16, 2 threads'."""
    parts = [f"{label} {defaults[key]}" for key, label in
             (("depth", "depth"), ("aspect_ratio", "aspect"), ("seq_len", "seq")) if key in defaults]
    if "total_batch_size" in defaults:
        rows = f" ({defaults['device_batch_size']} rows)" if "device_batch_size" in defaults else ""
        parts.append(f"batch {defaults['total_batch_size']:,} tokens{rows}")
    if "window_pattern" in defaults:
        parts.append(f"window {defaults['window_pattern']}")
    return ", ".join(parts + [str(defaults.get("dtype")), f"{defaults['threads']} threads"])


def speed_range(speeds):
    """'0.9-1.1' of speed indexes, or 'matmul 187-198 GFLOP/s, memory 52.0-76.6 GB/s' of the
    probe's two rates."""
    if not isinstance(speeds[0], tuple):
        return f"{min(speeds):.1f}-{max(speeds):.1f}"
    matmul, memory = [s[0] for s in speeds], [s[1] for s in speeds]
    return f"matmul {min(matmul):.0f}-{max(matmul):.0f} GFLOP/s, memory {min(memory):.1f}-{max(memory):.1f} GB/s"


def correction_used(noise):
    """Which of the probe's rates the rule corrects for now, in words."""
    if noise.sigma is None:
        return "no correction until sigma is measured"
    if noise.slope is None:
        return "no correction: no rate explains the spread yet"
    if len(noise.slope) == 1:
        return "the correction uses the speed index"
    used = [verdict.RATE_NAMES[j].split()[0] for j, b in enumerate(noise.slope) if b != 0.0]
    return f"the correction uses the {' and '.join(used)} rate{'s' if len(used) > 1 else ''}"


def machine_line(rows, kind, best):
    """'speed index 62.7 (matmul 140 GFLOP/s, memory 26.5 GB/s) in the last run of <commit>, its
    last single probe +8.0% off its first; the best's runs: ...; the correction uses the matmul
    rate' from the newest run's probe, against the range the best was measured in; None before
    any probed run."""
    probe = latest_probe()
    if probe is None:
        return None
    text = f"speed index {probe['machine_speed']:.1f}"
    if probe.get("probe_matmul_gflops") and probe.get("probe_memory_gb_per_s"):
        text += f" (matmul {probe['probe_matmul_gflops']:.0f} GFLOP/s, memory {probe['probe_memory_gb_per_s']:.1f} GB/s)"
    text += f" in the last run of {probe['commit']}"
    if isinstance(probe.get("machine_speed_change"), (int, float)):
        text += f", its last single probe {100 * probe['machine_speed_change']:+.1f}% off its first"
    best_speeds = speeds_context(rows, kind, best)[0] if kind else None
    if best_speeds:
        text += f"; the best's runs: {speed_range(best_speeds)}"
        noise = kind_noise(rows, kind, best)
        moved = verdict.probe_drift(best_speeds, [probed_speed(probe)], noise)
        if moved:
            text += f" ({moved}: re-measure the best with uv run tools/experiment.py baseline --repeat 2)"
        text += f"; {correction_used(noise)}"
    return text
