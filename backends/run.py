"""What every training run does around the research, the same for train.py and train_mlx.py (locked).

    run = TrainingRun(backend, rank, world_size, time_budget=, untimed_steps=, total_batch_size=)
        checks before any work that the record can be written, turns SIGTERM into the same
        "interrupted" line as Ctrl-C, and ends the run when the runner that started it dies
    run.start(...)                  the banner and the first probe of the machine's speed
                                    (backends/machine_speed.py); the run's clock starts after it
    run.end_step(step, loss, seconds, data_wait_seconds, lrm)
                                    rank agreement, the budget (untimed steps, then timed ones),
                                    the diverged-loss check, the collector, the progress line,
                                    a probe every machine_speed.PROBE_EVERY_SECONDS of training
    run.budget_spent(steps)         True once the timed steps have used the time budget
    run.end_training()              the last probe, the collector back on
    run.finish(logits_fn, tokenizer, eval_batch_size)
                                    the final evaluation (prepare.evaluate_bpb, with the nats of
                                    backends/torch_ops.py or mlx_ops.py), the summary block and
                                    the JSON record
    run_main(main, backend, rank, world_size, parameter_count)
                                    runs main(); every fault that cannot finish ends in one line;
                                    a rank other than 0 exits as soon as main() returns

Exit codes: 0 a result, 1 a run that failed (diverged, out of memory), 2 a set-up error or a
rank stopped by another rank's fault, 130 Ctrl-C, 143 SIGTERM. Importing this module never
imports torch or mlx.
"""

import gc
import math
import os
import signal
import sys
import threading
import time

import psutil

import backends
from backends import distributed, machine_speed
from backends.report import format_summary, run_context, runs_dir, write_run_json

RUNNER_PID_ENV = "AUTORESEARCH_RUNNER_PID"  # set by tools/experiment.py: the run ends with it
PARENT_POLL_SECONDS = 0.5  # how often a run started by the runner checks that the runner lives
DIVERGED_LOSS = 100        # a training loss above this (or NaN/inf) ends the run: FAIL
GC_EVERY_STEPS = 5000      # the collector is off during training except every this many steps
EXIT_FAILED, EXIT_SETUP, EXIT_CTRL_C, EXIT_SIGTERM = 1, 2, 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: handled like Ctrl-C, with exit status 143."""


def exit_with_error(error, code=EXIT_SETUP, own_line=False):
    """End the run with one line on stderr and no traceback: the message says what to do.
    own_line starts it on a fresh line, for when an engine's threads may have left theirs
    unfinished. The line goes out in one write so that their output cannot split it."""
    sys.stderr.write(("\n" if own_line else "") + f"error: {error}\n")
    sys.stderr.flush()
    sys.exit(code)


def require_constant(name, value, valid, ok):
    """One line and exit 2 when a constant of the script cannot build the model: names the
    constant, its value and the values that work."""
    if not ok:
        exit_with_error(f"{name} = {value!r} cannot build the model: it must be {valid}")


def _raise_terminated(signum, frame):
    raise Terminated()


def check_record_writable(directory=None):
    """Exit 2 with one line unless the run's record can be written in runs_dir(): a run that
    could not keep its result must not spend the budget first."""
    directory = runs_dir() if directory is None else directory
    probe = directory / f".writable_{os.getpid()}.tmp"
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
        if created:
            directory.rmdir()  # made again with the record: a run that fails leaves nothing
    except OSError as error:
        reason = error.strerror or type(error).__name__
        exit_with_error(f"cannot write the run's record in {directory}/ ({reason}): make it a "
                        f"writable folder or point AUTORESEARCH_RUNS_DIR at one")


def end_with_runner(environ=None):
    """When RUNNER_PID_ENV names the runner that started this run, SIGTERM this process as soon
    as that runner is gone (killed, even with SIGKILL), so no training outlives its runner. On
    Linux, a runner that is the direct parent arms the kernel's parent-death signal; a thread
    also polls the runner's pid (the portable way, and the only one when `uv run` sits between)."""
    text = (environ if environ is not None else os.environ).get(RUNNER_PID_ENV, "")
    if not text.isdigit():
        return None
    runner = int(text)
    try:
        started = psutil.Process(runner).create_time()
    except psutil.Error:
        started = None
    if started is not None and os.getppid() == runner and sys.platform.startswith("linux"):
        import ctypes
        try:
            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def runner_alive():
        try:
            process = psutil.Process(runner)
            return process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def watch():
        while runner_alive():
            time.sleep(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="runner-watch", daemon=True)
    thread.start()
    return thread


class DataWait:
    """How long a step waits for its batches: mark() right before and right after each
    next_batch(), seconds() once the step has finished. A CPU (and MLX, whose mx.eval has already
    waited for the device) computes as the host runs, so the wait is the host's time in
    next_batch(). A CUDA or MPS device runs the queued kernels meanwhile, so that host time is no
    wait; its wait is the device's time between an event queued after the micro-step's kernels
    and one queued after the batch's copy, which is idle time only when the batch came late."""

    def __init__(self, device_type):
        self.event = None
        if device_type in ("cuda", "mps"):
            import torch
            self.event = {"cuda": torch.cuda.Event, "mps": torch.mps.Event}[device_type]
        self.marks = []

    def mark(self):
        if self.event is None:
            self.marks.append(time.perf_counter())
        else:
            self.marks.append(self.event(enable_timing=True))
            self.marks[-1].record()

    def seconds(self):
        """The marked spans since the last call, summed; on a GPU every mark must have been
        reached (true after the step's .item())."""
        spans = zip(self.marks[0::2], self.marks[1::2])
        if self.event is None:
            total = sum(end - start for start, end in spans)
        else:
            total = sum(start.elapsed_time(end) for start, end in spans) / 1000  # ms
        self.marks = []
        return total


class TrainingRun:
    """One training run's plumbing and bookkeeping; see the module docstring."""

    def __init__(self, backend, rank=0, world_size=1, *, time_budget, untimed_steps,
                 total_batch_size, device=None, group=None):
        self.process_start = psutil.Process().create_time()
        self.backend, self.rank, self.world_size = backend, rank, world_size
        self.device, self.group = device, group  # torch's device or MLX's group, for all-reduce
        self.time_budget, self.untimed_steps = time_budget, untimed_steps
        self.total_batch_size = total_batch_size
        self.training_seconds = self.untimed_seconds = self.data_wait_seconds = 0.0
        self.smooth_loss = 0.0
        self.steps = 0
        signal.signal(signal.SIGTERM, _raise_terminated)
        end_with_runner()
        if rank == 0:
            check_record_writable()
        self.watchdog = None
        self.speed_probes, self.next_probe_seconds = [], machine_speed.PROBE_EVERY_SECONDS
        self.probe_device = backend  # what the probe measures: torch's device, or MLX's below
        if backend == "mlx":
            import mlx.core as mx
            self.probe_device = "mlx" if mx.default_device() == mx.gpu else "numpy"

    def probe_machine_speed(self):
        """Rank 0 measures the machine (backends/machine_speed.py) between steps, outside the
        clock. A probe that fails is recorded as missing: it must never cost the run."""
        if self.rank != 0:
            return
        try:
            self.speed_probes.append(machine_speed.measure(self.probe_device))
        except Exception:  # noqa: BLE001 - any failure of the probe only loses the probe
            self.speed_probes.append(None)

    def print0(self, *args, **kwargs):
        """print on rank 0 only: one progress line and one summary however many ranks train."""
        if self.rank == 0:
            print(*args, **kwargs)

    @property
    def progress(self):
        """Fraction of the time budget the timed steps have used, at most 1."""
        return min(self.training_seconds / self.time_budget, 1.0)

    def start(self, *, chip, precision, compute_dtype, compile, profile, peak_flops, peak_source,
              engine, model_line, num_params, flops_per_token, depth, grad_accum_steps,
              device_batch_size, seq_len):
        """Print the banner; from here on end_step() times the steps."""
        self.chip, self.compute_dtype, self.peak_flops = chip, compute_dtype, peak_flops
        self.num_params, self.flops_per_token, self.depth = num_params, flops_per_token, depth
        forced = " (forced)" if compute_dtype != precision["dtype"] else ""
        ranks = f" x {self.world_size} ranks" if self.world_size > 1 else ""
        self.print0(f"backend {self.backend} ({chip}), {compute_dtype}, compile {compile}, profile {profile}")
        self.print0(f"precision: {compute_dtype}{forced}, chosen from {precision['how']}; mfu against "
                    f"{peak_flops / 1e12:.3f} TFLOP/s, {peak_source}")
        if self.world_size > 1:
            self.print0(f"data parallel: {self.world_size} ranks, {engine}")
        self.print0(f"model: {model_line}, {num_params / 1e6:.1f}M params, "
                    f"{flops_per_token / 1e6:.1f} MFLOP/token")
        self.print0(f"batch: {self.total_batch_size:,} tokens/step = {grad_accum_steps} x "
                    f"{device_batch_size} rows x {seq_len} tokens{ranks}; time budget "
                    f"{self.time_budget:g}s", flush=True)
        self.watchdog = distributed.Watchdog(self.rank, self.world_size)
        self.startup_seconds = time.time() - self.process_start
        self.probe_machine_speed()

    def agree_across_ranks(self, train_loss, step_seconds):
        """Every rank takes the mean loss over the ranks and rank 0's step time, so all of them
        stop together on a diverged loss, follow the same schedules and end at the same step."""
        if self.world_size == 1:
            return train_loss, step_seconds
        values = [train_loss / self.world_size, step_seconds if self.rank == 0 else 0.0]
        if self.backend == "mlx":
            import mlx.core as mx
            return mx.distributed.all_sum(mx.array(values), group=self.group).tolist()
        import torch
        import torch.distributed as dist
        stats = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(stats)
        return stats.tolist()

    def end_step(self, step, train_loss, step_seconds, data_wait_seconds, lrm):
        """Account for a finished step (untimed while step < untimed_steps) and print the
        progress line; returns the loss all ranks agree on. A diverged loss ends the run (FAIL)."""
        train_loss, step_seconds = self.agree_across_ranks(train_loss, step_seconds)
        self.watchdog.beat()
        if not math.isfinite(train_loss) or train_loss > DIVERGED_LOSS:
            self.print0(f"\nFAIL: training diverged at step {step}: loss {train_loss}", flush=True)
            sys.exit(EXIT_FAILED)
        progress = self.progress
        if step >= self.untimed_steps:
            self.training_seconds += step_seconds
            self.data_wait_seconds += data_wait_seconds
        else:
            self.untimed_seconds += step_seconds
        if step == 0:
            # Everything alive now lives for the whole run: stop the collector scanning it.
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % GC_EVERY_STEPS == 0:
            gc.collect()
        if self.training_seconds >= self.next_probe_seconds:
            self.probe_machine_speed()
            self.next_probe_seconds += machine_speed.PROBE_EVERY_SECONDS
        self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * train_loss
        debiased_loss = self.smooth_loss / (1 - 0.9 ** (step + 1))
        tokens_per_second = self.total_batch_size / step_seconds
        mfu = 100 * self.flops_per_token * tokens_per_second / self.peak_flops
        remaining = max(0.0, self.time_budget - self.training_seconds)
        self.print0(f"\rstep {step:05d} ({100 * progress:.1f}%) | loss {debiased_loss:.4f} | lrm {lrm:.2f} "
                    f"| {tokens_per_second:,.0f} tok/s | mfu {mfu:.1f}% | remaining {remaining:.0f}s   ",
                    end="", flush=True)
        self.steps = step + 1
        return train_loss

    def budget_spent(self, steps):
        """True once `steps` steps include every untimed one and the timed ones used the budget."""
        return steps > self.untimed_steps and self.training_seconds >= self.time_budget

    def end_training(self):
        """After the last step: the last probe of the machine, the collector back on (left frozen,
        the objects of compiled code outlive the interpreter and print "nanobind: leaked" lines at
        exit), the watchdog off."""
        self.print0()
        self.probe_machine_speed()
        gc.unfreeze()
        gc.enable()
        self.watchdog.stop()

    def finish(self, logits_fn, tokenizer, eval_batch_size):
        """Rank 0, after training: evaluate (logits_fn(inputs) gives the model's logits for the
        validation inputs; see prepare.evaluate_bpb), print the summary and write the record.
        Returns the fields."""
        import prepare  # here: importing prepare reads AUTORESEARCH_TIME_BUDGET, which may be bad
        if self.backend == "mlx":
            from backends.mlx_ops import target_nats
        else:
            from backends.torch_ops import target_nats
        timed_tokens = (self.steps - self.untimed_steps) * self.total_batch_size
        untimed_tokens = self.untimed_steps * self.total_batch_size
        mfu_percent = 100 * self.flops_per_token * timed_tokens / self.training_seconds / self.peak_flops
        print(f"training: {timed_tokens / self.training_seconds:,.0f} tok/s, mfu {mfu_percent:.2f}% over "
              f"{self.training_seconds:.1f}s timed; total_tokens_M counts the {self.untimed_steps} untimed "
              f"steps too ({untimed_tokens:,} tokens in {self.untimed_seconds:.1f}s)", flush=True)
        eval_start = time.perf_counter()
        evaluation = prepare.evaluate_bpb(logits_fn, tokenizer, eval_batch_size, self.backend,
                                          target_nats=target_nats)
        eval_seconds = time.perf_counter() - eval_start
        eval_tokens = prepare.eval_token_budget(self.backend)
        print(f"evaluation: {eval_tokens:,} tokens in {eval_seconds:.1f}s", flush=True)
        fields = {
            "val_bpb": evaluation["val_bpb"],
            "training_seconds": self.training_seconds,
            "total_seconds": time.time() - self.process_start,
            "peak_vram_mb": backends.peak_memory_mb(self.backend),
            "mfu_percent": mfu_percent,
            "total_tokens_M": self.steps * self.total_batch_size / 1e6,
            "num_steps": self.steps,
            "num_params_M": self.num_params / 1e6,
            "depth": self.depth,
            "backend": self.backend,
            "chip": self.chip,
            **run_context(world_size=self.world_size, backend=self.backend),
            "startup_seconds": self.startup_seconds,
            "untimed_seconds": self.untimed_seconds,
            "train_tokens_per_second": timed_tokens / self.training_seconds,
            "data_wait_percent": 100 * self.data_wait_seconds / self.training_seconds,
            "eval_seconds": eval_seconds,
            "eval_tokens_per_second": eval_tokens / eval_seconds,
            "compute_dtype": self.compute_dtype,
            "peak_tflops": self.peak_flops / 1e12,
            "untimed_steps": self.untimed_steps,
            "untimed_tokens": untimed_tokens,
            "timed_tokens": timed_tokens,
            "total_batch_size": self.total_batch_size,
            **{key: evaluation[key] for key in ("eval_scored_tokens", "eval_bytes", "eval_nats")},
            **(machine_speed.summarize(self.speed_probes) or {}),
        }
        print(format_summary(fields), flush=True)
        write_run_json(fields)
        return fields


def is_out_of_memory(error):
    """An allocation failure, as each framework reports it: CUDA's OutOfMemoryError, a CPU,
    MPS or Metal RuntimeError that says it cannot allocate, or Python's MemoryError."""
    message = str(error)
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in message or "out of memory" in message
            or "allocate" in message)


def step_reached(error, main):
    """The step main() was on when error went through it (0 before the training loop)."""
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code is main.__code__:
            return traceback.tb_frame.f_locals.get("step", 0)
        traceback = traceback.tb_next
    return 0


def exit_out_of_memory(backend, num_params, rank=0):
    """The one line of a run that ran out of memory (exit 1), after the progress line."""
    if rank == 0:
        print()
    print(backends.out_of_memory_message(backend, num_params), file=sys.stderr, flush=True)
    sys.exit(EXIT_FAILED)


def exit_if_model_cannot_fit(backend, num_params, rank=0):
    """Refuse, before allocating it, a model whose training state alone passes the memory."""
    if not backends.model_fits_in_memory(backend, num_params):
        exit_out_of_memory(backend, num_params, rank)


def run_main(main, backend, rank, world_size, parameter_count):
    """Run main() so that every way it cannot finish ends in one line and its exit code (see the
    module docstring); parameter_count() gives the model size for the out-of-memory line."""
    import prepare
    try:
        main()
        if rank != 0:
            # Rank 0 alone evaluates and reports; another rank's work ended with training. It
            # skips the interpreter's teardown, where the engine's threads can abort a finished
            # process ("terminate called without an active exception") and fail the whole run.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except KeyboardInterrupt as interrupt:
        if rank == 0:
            print(flush=True)  # end the progress line
            print(f"interrupted at step {step_reached(interrupt, main)}: nothing recorded",
                  file=sys.stderr, flush=True)
        sys.exit(EXIT_SIGTERM if isinstance(interrupt, Terminated) else EXIT_CTRL_C)
    except (prepare.DataError, distributed.DistributedError) as error:
        exit_with_error(error)
    except (RuntimeError, MemoryError) as error:
        if is_out_of_memory(error):
            exit_out_of_memory(backend, parameter_count(), rank)
        if world_size == 1:
            raise
        # Usually the engine reporting a peer rank that stopped first: one line, not a traceback.
        # MLX's ring threads are still printing their socket errors, a line in two writes.
        exit_with_error(f"rank {rank} of {world_size}: {str(error).strip().splitlines()[0]} "
                        f"(if another rank failed first, its output says why)", own_line=True)
    finally:
        # However the run ends (FAIL, Ctrl-C, an error), the collector goes back on, as after a
        # finished run: else the leak report of compiled code follows the last line.
        gc.unfreeze()
        gc.enable()
