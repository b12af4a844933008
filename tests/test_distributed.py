"""Data-parallel training (backends/distributed.py and the scripts' use of it): two local ranks on
each engine (torchrun with gloo, mlx.launch with the ring backend) take exactly the steps one
process takes on the same global batch, rank 0 alone reports, and a rank that dies ends the others
with one clear line instead of a hang. The launched runs use tests/fixed_steps.py, which runs the
scripts' own main() for a fixed number of steps, or the scripts themselves."""

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from backends import distributed
from backends.report import (BUDGET_KEYS, CONTEXT_KEYS, EVAL_KEYS, MACHINE_KEYS, PRECISION_KEYS, RUN_EXTRA_KEYS, SUMMARY_KEYS,
                            TIMING_KEYS, parse_summary)

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXED_STEPS = REPO_ROOT / "tests" / "fixed_steps.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"
MLX_LAUNCH = Path(sys.executable).parent / "mlx.launch"
STEPS = 3
RUN_TIMEOUT = 240


# ---------------------------------------------------------------------------------------------
# Launcher environment and helpers (in-process)

TORCHRUN_VARS = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_without_a_launcher_a_process_is_rank_0_of_1():
    assert distributed.torchrun_ranks("cpu", {}) == distributed.Ranks(0, 1, 0, 1)
    assert distributed.torchrun_ranks("mps", {"PATH": "/bin"}).world_size == 1


def test_torchrun_variables_give_the_rank_and_world_size():
    assert distributed.torchrun_ranks("cuda", TORCHRUN_VARS) == distributed.Ranks(1, 4, 1, 2)


@pytest.mark.parametrize("variables, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK, LOCAL_WORLD_SIZE not"),
    ({**TORCHRUN_VARS, "RANK": "one"}, "not integers"),
    ({**TORCHRUN_VARS, "RANK": "4"}, "inconsistent"),
    ({**TORCHRUN_VARS, "LOCAL_WORLD_SIZE": "8"}, "inconsistent"),
])
def test_broken_torchrun_variables_are_one_line_naming_the_fix(variables, message):
    with pytest.raises(distributed.DistributedError, match=message) as error:
        distributed.torchrun_ranks("cpu", variables)
    assert "\n" not in str(error.value) and "torchrun" in str(error.value)


def test_mps_under_torchrun_says_it_is_unsupported_and_names_the_mlx_path():
    with pytest.raises(distributed.DistributedError) as error:
        distributed.torchrun_ranks("mps", TORCHRUN_VARS)
    message = str(error.value)
    assert "MPS" in message and "mlx.launch" in message and "train_mlx.py" in message
    one_process = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    assert distributed.torchrun_ranks("mps", one_process).world_size == 1


def test_each_launcher_only_starts_its_own_engine():
    with pytest.raises(distributed.DistributedError, match="train_mlx.py under mlx.launch"):
        distributed.torchrun_ranks("cpu", {"MLX_RANK": "0"})
    with pytest.raises(distributed.DistributedError, match="started by torchrun"):
        distributed.init_mlx(TORCHRUN_VARS)


def test_without_mlx_launch_the_mlx_group_is_one_process():
    group = distributed.init_mlx({})
    assert (group.rank(), group.size()) == (0, 1)


def test_local_ranks_share_the_cores():
    assert distributed.threads_per_rank(2, cpu_cores=2) == 1
    assert distributed.threads_per_rank(4, cpu_cores=16) == 4
    assert distributed.threads_per_rank(3, cpu_cores=2) == 1


def test_for_one_process_the_torch_helpers_change_nothing():
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    distributed.init_torch("cpu", distributed.Ranks())
    distributed.broadcast_torch_parameters(model)
    distributed.average_torch_gradients(model.parameters())
    distributed.finish_torch()
    for (weight, grad), p in zip(before, model.parameters()):
        assert torch.equal(weight, p) and torch.equal(grad, p.grad)
    assert not torch.distributed.is_initialized()


def test_for_one_process_the_mlx_helpers_change_nothing():
    group = distributed.init_mlx({})
    grads = {"value_embeds": {"1": {"weight": mx.ones((2, 2))}}, "h": [{"w": mx.zeros(3)}]}
    assert distributed.average_mlx_gradients(grads, group) is grads


def test_mlx_averaging_keeps_the_gradient_tree_and_its_names():
    # value_embeds has numeric string keys: mlx's tree_unflatten (used by nn.average_gradients)
    # would turn it into a list with empty slots; the optimizer looks gradients up by name.
    grads = {"value_embeds": {"1": {"weight": mx.ones((2, 2))},
                              "3": {"weight": mx.full((2,), 3.0)}},
             "h": [{"w": mx.arange(3)}]}
    doubled = distributed._map_leaves(grads, lambda arrays: [2 * a for a in arrays])
    assert set(doubled["value_embeds"]) == {"1", "3"} and isinstance(doubled["h"], list)
    np.testing.assert_array_equal(np.array(doubled["value_embeds"]["3"]["weight"]), [6.0, 6.0])
    np.testing.assert_array_equal(np.array(doubled["h"][0]["w"]), [0, 2, 4])


def test_the_run_fingerprint_changes_with_the_script_and_the_dataset(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("DEPTH = 4\n")
    fingerprint = distributed.run_fingerprint(script, "local")
    assert fingerprint == distributed.run_fingerprint(script, "local")
    assert len(fingerprint) == 4 and all(0 <= part < 2**24 for part in fingerprint)
    assert distributed.run_fingerprint(script, "pystdlib") != fingerprint
    script.write_text("DEPTH = 6\n")
    assert distributed.run_fingerprint(script, "local") != fingerprint


def test_watchdog_stops_a_stalled_rank_with_one_line():
    code = ("import time\nfrom backends.distributed import Watchdog\n"
            "watchdog = Watchdog(1, 2, timeout_s=0.5)\n"
            "for _ in range(6):\n    time.sleep(0.2)\n    watchdog.beat()\n"
            "print('beats kept it alive', flush=True)\ntime.sleep(5)\nprint('not stopped')")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    assert result.stdout == "beats kept it alive\n"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: rank 1 of 2: no training step finished in 0.5 s")
    assert time.monotonic() - start < 5


def test_watchdog_of_a_single_process_starts_no_thread():
    threads = threading.active_count()
    watchdog = distributed.Watchdog(0, 1, timeout_s=0.01)
    time.sleep(0.05)
    assert threading.active_count() == threads
    watchdog.stop()


# ---------------------------------------------------------------------------------------------
# Launched runs


def free_ports(count):
    """Ports nothing listens on right now (bound then released, so another process could still
    take one; good enough on a test machine)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def by_hand_env(engine, tmp_path):
    """Environment variables that make two processes ranks 0 and 1 of one job without a launcher,
    the way torchrun (engine "torch") or mlx.launch's ring backend ("mlx") would."""
    if engine == "torch":
        port = free_ports(1)[0]
        return [{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
                 "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"} for r in (0, 1)]
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(2)]))
    return [{"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)} for r in (0, 1)]


def run_env(tiny_dataset, runs_dir, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(tiny_dataset.env, AUTORESEARCH_RUNS_DIR=str(runs_dir), PYTHONPATH=str(REPO_ROOT),
               **extra)
    return env


def run(command, env, timeout=RUN_TIMEOUT):
    result = subprocess.run([str(part) for part in command], cwd=REPO_ROOT, env=env,
                            capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(),
                                       result.stderr.decode())


def torchrun(*args):
    return [TORCHRUN, "--standalone", "--nproc_per_node", "2", *args]


def mlx_launch(*args):
    port = free_ports(1)[0]  # rank r listens on port + r
    return [MLX_LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", port,
            "--python", sys.executable, *args]


def check_rank_0_reported(result, runs_dir, backend, num_steps=None):
    """One header and one summary (rank 0's), world_size 2, one run JSON; returns the JSON."""
    output = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, output
    assert result.stdout.count(f"backend {backend} ") == 1, output
    assert result.stdout.count("\n---\n") == 1, output
    fields = parse_summary(result.stdout)
    assert fields["world_size"] == 2 and fields["backend"] == backend
    saved = json.loads((runs_dir / "last_run.json").read_text())
    assert list(saved) == list(SUMMARY_KEYS + CONTEXT_KEYS + RUN_EXTRA_KEYS + TIMING_KEYS + PRECISION_KEYS
                               + BUDGET_KEYS + EVAL_KEYS + MACHINE_KEYS)
    assert len(list(runs_dir.glob("run_*.json"))) == 1
    assert saved["world_size"] == 2 and 0 < saved["val_bpb"] < 20
    # Tokens count both ranks: every step consumed the whole TOTAL_BATCH_SIZE (512 in smoke).
    assert saved["total_tokens_M"] == pytest.approx(saved["num_steps"] * 512 / 1e6)
    assert saved["train_tokens_per_second"] > 0
    if num_steps is not None:
        assert saved["num_steps"] == num_steps
    return saved


def check_same_parameters(single_dir, launched_dir):
    single = np.load(single_dir / "rank0.npz")
    ranks = [np.load(launched_dir / f"rank{rank}.npz") for rank in (0, 1)]
    # The comparison means something only if training moved the weights: the output
    # projections start at zero.
    assert np.abs(single["transformer.h.0.mlp.c_proj.weight"]).max() > 1e-3
    for name in single.files:
        for rank in ranks:
            np.testing.assert_allclose(rank[name], single[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("script, backend", [("train", "cpu"), ("train_mlx", "mlx")])
def test_two_ranks_take_the_same_steps_as_one_process(script, backend, tiny_dataset, tmp_path):
    """Same global batch (smoke: 512 tokens = 2 micro-steps of 2 rows alone, or 1 of 2 rows on
    each rank), same fixed number of steps: every parameter of both ranks matches the single
    process's, and rank 0 alone reports."""
    extra = {"AUTORESEARCH_BACKEND": "cpu"} if script == "train" else {}
    single = run([sys.executable, FIXED_STEPS, script, STEPS, tmp_path / "single"],
                 run_env(tiny_dataset, tmp_path / "single_runs", **extra))
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-3000:]
    launch = torchrun if script == "train" else mlx_launch
    launched = run(launch(FIXED_STEPS, script, STEPS, tmp_path / "two"),
                   run_env(tiny_dataset, tmp_path / "two_runs", **extra))
    check_rank_0_reported(launched, tmp_path / "two_runs", backend, num_steps=STEPS)
    assert "x 2 ranks" in launched.stdout
    check_same_parameters(tmp_path / "single", tmp_path / "two")


@pytest.mark.slow
@pytest.mark.parametrize("script, backend", [("train", "cpu"), ("train_mlx", "mlx")])
def test_smoke_run_under_the_launcher_trains_together_and_rank_0_reports(script, backend,
                                                                           tiny_dataset, tmp_path):
    """The script itself under its launcher, stopping on the clock: the ranks agree on the time,
    so they stop at the same step (otherwise one would wait for the other and the run would not
    end)."""
    env = run_env(tiny_dataset, tmp_path, AUTORESEARCH_TIME_BUDGET="1",
                  **({"AUTORESEARCH_BACKEND": "cpu"} if script == "train" else {}))
    launch = torchrun if script == "train" else mlx_launch
    result = run(launch(REPO_ROOT / f"{script}.py"), env)
    saved = check_rank_0_reported(result, tmp_path, backend)
    assert saved["num_steps"] > 1 and saved["training_seconds"] >= 1.0
    assert "\rstep 00000" in result.stdout and "\rstep 00001" in result.stdout
    assert "\nstep" not in result.stdout  # one progress line, rewritten in place, by rank 0 alone


def read_until(process, text, timeout):
    """Read the process's stdout until text appears (progress lines end in '\r', not '\n')."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        assert process.poll() is None and time.monotonic() < deadline, seen.decode()[-2000:]
        if select.select([process.stdout], [], [], 1.0)[0]:
            seen += os.read(process.stdout.fileno(), 65536)
    return seen.decode()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train", "train_mlx"])
def test_a_rank_that_dies_stops_the_other_with_one_clear_line(script, tiny_dataset, tmp_path):
    """Two ranks started by hand, so no launcher tears the job down: rank 1 is killed mid-run
    (as an out-of-memory kill would), and rank 0, waiting for it in a collective, must end by
    itself with one line naming its rank instead of hanging."""
    rank_env = by_hand_env("torch" if script == "train" else "mlx", tmp_path)
    extra = {"AUTORESEARCH_BACKEND": "cpu"} if script == "train" else {}
    ranks = [subprocess.Popen([sys.executable, f"{script}.py"], cwd=REPO_ROOT,
                              env=run_env(tiny_dataset, tmp_path / "runs", **rank_env[r], **extra,
                                          AUTORESEARCH_TIME_BUDGET="60"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    try:
        read_until(ranks[0], "\rstep 00002", timeout=RUN_TIMEOUT)
        ranks[1].kill()
        killed = time.monotonic()
        _, rank_0_err = ranks[0].communicate(timeout=60)
        waited = time.monotonic() - killed
    finally:
        for process in ranks:
            process.kill()
            process.communicate()
    rank_0_err = rank_0_err.decode()
    assert waited < 30
    assert ranks[0].returncode == 2, rank_0_err[-3000:]
    errors = [line for line in rank_0_err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 0 of 2: "), rank_0_err[-3000:]
    assert "Traceback" not in rank_0_err
    assert not (tmp_path / "runs").exists()


CHECK_SAME_RUN = {
    "torch": ("import sys\nimport torch.distributed as dist\nfrom backends import distributed\n"
              "dist.init_process_group('gloo')\n"
              "distributed.check_same_run_torch(sys.argv[1], 'local', 'cpu')\nprint('same run')"),
    "mlx": ("import sys\nfrom backends import distributed\ngroup = distributed.init_mlx()\n"
            "distributed.check_same_run_mlx(sys.argv[1], 'local', group)\nprint('same run')"),
}


@pytest.mark.parametrize("engine", [pytest.param("torch", marks=pytest.mark.slow), "mlx"])
def test_ranks_with_different_training_scripts_refuse_to_train_together(engine, tmp_path):
    """Across machines each rank runs its own checkout: one edited on rank 0's machine only must
    not train beside a stale one. (Ranks that agree pass the same check in every launched run.)"""
    scripts = [tmp_path / "rank0_train.py", tmp_path / "rank1_train.py"]
    scripts[0].write_text("MATRIX_LR = 0.04\n")
    scripts[1].write_text("MATRIX_LR = 0.05\n")
    env = [{**os.environ, "PYTHONPATH": str(REPO_ROOT), **variables}
           for variables in by_hand_env(engine, tmp_path)]
    ranks = [subprocess.Popen([sys.executable, "-c", CHECK_SAME_RUN[engine], str(scripts[r])],
                              cwd=REPO_ROOT, env=env[r], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for process in ranks:
        out, err = process.communicate(timeout=60)
        assert process.returncode != 0 and out == "", err[-2000:]
        assert "DistributedError: the ranks run different experiments" in err
