"""tools/monitor.py: the runner's own measurement of other work on the machine during a run."""

import os
import subprocess
import sys
import time

from tools import monitor
from tools.monitor import Load, LoadMonitor


def spin(seconds):
    return [sys.executable, "-c", f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"]


def test_the_run_s_own_cpu_is_not_counted_as_disturbance_but_a_stranger_s_is():
    alone = LoadMonitor(watch_gpu=False).start()
    own = subprocess.Popen(spin(0.8))
    alone.watch(own.pid)
    own.wait()
    quiet = alone.finish()
    stranger = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)  # the stranger must be running before the measured window opens
    try:
        busy = LoadMonitor(watch_gpu=False).start()
        own = subprocess.Popen(spin(0.8))
        busy.watch(own.pid)
        own.wait()
        loaded = busy.finish()
    finally:
        stranger.kill()
        stranger.wait()
    # A spinning stranger takes one logical CPU of the machine's: half of two cores.
    assert loaded.other_cpu_share > quiet.other_cpu_share + 0.2
    assert loaded.disturbance(0.1).startswith("disturbed: other processes used")


def test_disturbance_names_the_share_or_the_gpu_strangers():
    assert Load(0.05, 3.0, 60.0).disturbance(0.1) is None
    assert Load(0.25, 30.0, 60.0).disturbance(0.1) == "disturbed: other processes used 25% of the CPU (limit 10%)"
    assert Load(0.0, 0.0, 60.0, (4242,)).disturbance(0.1) == "disturbed: 1 other process(es) on the GPU (pid 4242)"


FAKE_NVIDIA_SMI = """#!/bin/sh
case "$1" in
  --query-compute-apps=*) printf '101, GPU-aaa\\n202, GPU-bbb\\n303, GPU-bbb\\n' ;;
  --query-gpu=*) printf '0, GPU-aaa\\n1, GPU-bbb\\n' ;;
esac
"""


def test_gpu_processes_are_only_those_on_the_visible_gpus_of_a_slot(tmp_path, monkeypatch):
    tool = tmp_path / "nvidia-smi"
    tool.write_text(FAKE_NVIDIA_SMI)
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert monitor.gpu_processes() == (101, 202, 303)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert monitor.gpu_processes() == (202, 303)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa")
    assert monitor.gpu_processes() == (101,)
