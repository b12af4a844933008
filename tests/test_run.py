"""backends/run.py: the plumbing every training run shares. Its pieces in process, then the faults
that only a real smoke run of each script shows: a record that cannot be written (found before the
first step), a constant the model cannot be built from, SIGTERM, and a runner killed under its
training."""

import os
import signal
import subprocess
import sys

import psutil
import pytest

from backends import run
from test_train_torch import REPO_ROOT, run_script

# The MLX twin of each real run is an end-to-end test behind the slow marker (.ci/run runs it).
SCRIPTS = ["train.py", pytest.param("train_mlx.py", marks=pytest.mark.slow)]


def script_env(tiny_dataset, script, **extra):
    return {**tiny_dataset.env, "AUTORESEARCH_BACKEND": "cpu" if script == "train.py" else "mlx", **extra}


# In process ---------------------------------------------------------------------------------------

def test_data_wait_on_a_cpu_sums_the_host_time_of_each_marked_batch_and_starts_over(monkeypatch):
    clock = iter([10.0, 10.5, 20.0, 20.25, 30.0, 31.0])
    monkeypatch.setattr(run.time, "perf_counter", lambda: next(clock))
    data_wait = run.DataWait("cpu")
    assert data_wait.event is None  # a CPU has no queue to time on the device
    for _ in range(2):  # two micro-steps
        data_wait.mark()
        data_wait.mark()
    assert data_wait.seconds() == pytest.approx(0.75)
    data_wait.mark()
    data_wait.mark()
    assert data_wait.seconds() == pytest.approx(1.0)
    assert data_wait.seconds() == 0.0


def test_data_wait_times_a_gpu_on_its_own_queue():
    import torch
    assert run.DataWait("cuda").event is torch.cuda.Event
    assert run.DataWait("mps").event is torch.mps.Event
    assert run.DataWait("mlx").event is None


def started_run(tmp_path, monkeypatch, **changes):
    monkeypatch.setenv("AUTORESEARCH_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv(run.RUNNER_PID_ENV, raising=False)
    monkeypatch.setattr(run.signal, "signal", lambda *args: None)  # leave pytest's handlers alone
    options = dict(time_budget=10.0, untimed_steps=2, total_batch_size=100)
    options.update(changes)
    training = run.TrainingRun("cpu", **options)
    training.flops_per_token, training.peak_flops = 6.0, 1e6
    training.watchdog = run.distributed.Watchdog(0, 1)
    return training


def test_untimed_steps_are_not_timed_and_the_budget_ends_after_them(tmp_path, monkeypatch, capsys):
    training = started_run(tmp_path, monkeypatch)
    for step, seconds in enumerate([4.0, 3.0, 6.0, 5.0]):
        assert not training.budget_spent(step)
        training.end_step(step, 5.0, seconds, 0.5, 1.0)
    assert training.untimed_seconds == 7.0 and training.training_seconds == 11.0
    assert training.data_wait_seconds == 1.0 and training.progress == 1.0
    assert training.budget_spent(4) and training.steps == 4
    training.end_training()
    assert capsys.readouterr().out.count("\rstep 0000") == 4


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), -float("inf"), 100.5])
def test_a_diverged_loss_fails_fast(tmp_path, monkeypatch, capsys, loss):
    training = started_run(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        training.end_step(12, loss, 1.0, 0.0, 1.0)
    assert exit_info.value.code == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FAIL: training diverged at step 12")
    training.end_step(13, 99.0, 1.0, 0.0, 1.0)  # a finite loss goes on


def test_a_constant_that_cannot_build_the_model_is_one_line_and_exit_2(capsys):
    run.require_constant("DEPTH", 3, "a whole number, 1 or more", True)
    with pytest.raises(SystemExit) as exit_info:
        run.require_constant("DEPTH", 0, "a whole number, 1 or more", False)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: DEPTH = 0 cannot build the model: it must be a whole number, 1 or more\n"


def test_a_lost_peer_is_one_line_of_its_own_even_after_an_engine_s_unfinished_line(capsys):
    """MLX's ring threads print socket errors in two writes; ours must not be glued to one."""
    def peer_lost():
        sys.stderr.write("[ring] Sending to socket 4 failed with errno 32")
        raise RuntimeError("[ring] connection to a peer was lost\nmore detail")
    with pytest.raises(SystemExit) as exit_info:
        run.run_main(peer_lost, "cpu", 0, 2, lambda: 1000)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["[ring] Sending to socket 4 failed with errno 32",
                     "error: rank 0 of 2: [ring] connection to a peer was lost "
                     "(if another rank failed first, its output says why)"]


@pytest.mark.parametrize("rank, teardown_runs", [(0, True), (1, False)])
def test_a_finished_rank_other_than_0_exits_0_with_its_output_and_without_the_teardown(rank, teardown_runs):
    """The interpreter's teardown (here an atexit line) is where an engine's threads can abort a
    finished rank; rank 0 still has its report to finish and ends normally."""
    program = ("import atexit, sys\n"
               "from backends import run\n"
               "atexit.register(lambda: print('teardown'))\n"
               "run.run_main(lambda: print('trained'), 'cpu', int(sys.argv[1]), 2, lambda: 1000)\n"
               "print('returned')\n")
    result = subprocess.run([sys.executable, "-c", program, str(rank)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("trained\nreturned\nteardown\n" if teardown_runs else "trained\n")


def test_a_runs_folder_that_cannot_hold_the_record_is_refused_and_a_missing_one_left_absent(tmp_path, capsys):
    run.check_record_writable(tmp_path / "new" / "runs")
    assert not (tmp_path / "new" / "runs").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        run.check_record_writable(tmp_path / "file")
    assert exit_info.value.code == 2
    line = capsys.readouterr().err
    assert line.startswith(f"error: cannot write the run's record in {tmp_path / 'file'}/ (") and line.count("\n") == 1


def test_a_run_not_started_by_the_runner_watches_nothing():
    assert run.end_with_runner({}) is None
    assert run.end_with_runner({run.RUNNER_PID_ENV: "not a pid"}) is None


@pytest.mark.parametrize("error, expected", [
    (MemoryError(), True), (RuntimeError("CUDA out of memory. Tried to allocate"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"), True),
    (RuntimeError("shape mismatch"), False)])
def test_out_of_memory_is_recognised_in_each_framework_s_words(error, expected):
    assert run.is_out_of_memory(error) is expected


# Real smoke runs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_a_record_that_cannot_be_written_stops_the_run_before_the_first_step(tiny_dataset, tmp_path, script):
    runs_file = tmp_path / "runs"
    runs_file.write_text("not a folder")
    result = run_script(REPO_ROOT / script, script_env(tiny_dataset, script, AUTORESEARCH_TIME_BUDGET="60",
                                                        AUTORESEARCH_RUNS_DIR=str(runs_file)))
    assert result.returncode == 2
    assert "step 0" not in result.stdout  # found out before any training
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write the run's record in {runs_file}/")


@pytest.mark.parametrize("script", SCRIPTS)
def test_depth_zero_is_one_line_naming_the_constant_and_exit_2(tiny_dataset, tmp_path, script):
    source = (REPO_ROOT / script).read_text()
    assert '\nDEPTH = SUGGESTED["depth"] ' in source
    (tmp_path / script).write_text(source.replace('\nDEPTH = SUGGESTED["depth"] ', "\nDEPTH = 0 "))
    result = run_script(tmp_path / script, script_env(tiny_dataset, script,
                                                      AUTORESEARCH_RUNS_DIR=str(tmp_path / "runs")), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: DEPTH = 0 cannot build the model: it must be a whole number, 1 or more\n"


def start_training(tiny_dataset, tmp_path, script, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(script_env(tiny_dataset, script, AUTORESEARCH_TIME_BUDGET="120",
                          AUTORESEARCH_RUNS_DIR=str(tmp_path / "runs")), PYTHONPATH=str(REPO_ROOT))
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, str(REPO_ROOT / script)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_until_a_step(stream):
    """Read the progress output until the first step line (the steps end in '\\r', not '\\n')."""
    seen = b""
    while b"\rstep 00000" not in seen:
        chunk = stream.read1(4096)
        assert chunk, f"the run ended before its first step: {seen[-500:]!r}"
        seen += chunk


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigterm_says_what_ctrl_c_says_and_exits_143(tiny_dataset, tmp_path, script):
    process = start_training(tiny_dataset, tmp_path, script)
    read_until_a_step(process.stdout)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted at step ") and lines[0].endswith(": nothing recorded")
    assert not (tmp_path / "runs").exists()


RUNNER_STAND_IN = """
import os, subprocess, sys, time
log = open(sys.argv[2], "wb")
env = dict(os.environ, AUTORESEARCH_RUNNER_PID=str(os.getpid()))
child = subprocess.Popen([sys.executable, sys.argv[1]], env=env, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
print(child.pid, flush=True)
while b"step 00000" not in open(sys.argv[2], "rb").read():
    time.sleep(0.05)
print("training", flush=True)
child.wait()
"""


@pytest.mark.slow
def test_the_training_ends_when_the_runner_that_started_it_is_killed(tiny_dataset, tmp_path):
    # The runner's stand-in starts the training in its own process group, as tools/experiment.py
    # does, and is then killed with SIGKILL: nothing of it can clean up.
    log = tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(script_env(tiny_dataset, "train.py", AUTORESEARCH_TIME_BUDGET="120",
                          AUTORESEARCH_RUNS_DIR=str(tmp_path / "runs")), PYTHONPATH=str(REPO_ROOT))
    runner = subprocess.Popen([sys.executable, "-c", RUNNER_STAND_IN, str(REPO_ROOT / "train.py"), str(log)],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
    training = psutil.Process(int(runner.stdout.readline()))
    assert runner.stdout.readline() == "training\n"
    runner.kill()
    runner.wait()
    training.wait(timeout=30)  # raises psutil.TimeoutExpired if the training trained on
    assert "nothing recorded" in log.read_text(errors="replace").splitlines()[-1]
    assert not (tmp_path / "runs").exists()
