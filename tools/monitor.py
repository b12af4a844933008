"""How much of the machine other work used while a training run ran: the runner's own measurement.

A run that shared its cores (or its GPU) with other work is slower, trains fewer steps and scores
worse for reasons that have nothing to do with the idea, so it is not evidence. The training script
is what the agent edits, so the measurement happens here, outside it:

- CPU: the whole machine's busy time (psutil: user, nice, system, irq, softirq and steal, which is
  other virtual machines on the same host) minus the CPU time of the run's process tree
  (getrusage of the runner's waited-for children) and of the runner itself, as a share of
  wall time x logical CPUs.
- CUDA: processes on the GPU that are not part of the run, sampled with nvidia-smi while it runs
  (only where nvidia-smi exists; costs one call every SAMPLE_SECONDS).
"""

import os
import resource
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

import psutil

DISTURBED_SHARE = 0.10  # default limit on other work's share of the CPU during a run
SAMPLE_SECONDS = 10.0
BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")


@dataclass(frozen=True)
class Load:
    """Other work during one run: its share of the CPU and any foreign GPU processes."""
    other_cpu_share: float
    other_cpu_seconds: float
    wall_seconds: float
    gpu_strangers: tuple = ()

    def disturbance(self, max_share):
        """Why the run is not evidence, or None."""
        if self.gpu_strangers:
            return f"disturbed: {len(self.gpu_strangers)} other process(es) on the GPU (pid {self.gpu_strangers[0]})"
        if self.other_cpu_share > max_share:
            return (f"disturbed: other processes used {100 * self.other_cpu_share:.0f}% of the CPU "
                    f"(limit {100 * max_share:g}%)")
        return None


def busy_seconds(times):
    return sum(getattr(times, name, 0.0) for name in BUSY_FIELDS)


def own_seconds(usage):
    return usage.ru_utime + usage.ru_stime


def gpu_processes():
    """PIDs nvidia-smi lists as compute processes, or () when there is no nvidia-smi. With
    CUDA_VISIBLE_DEVICES set (a parallel slot: one GPU each), only those on the visible GPUs."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return ()
    try:
        out = subprocess.run([tool, "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        mine = None
        if visible:
            gpus = subprocess.run([tool, "--query-gpu=index,uuid", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=10).stdout
            wanted = {v.strip() for v in visible.split(",")}
            mine = {uuid.strip() for index, _, uuid in (line.partition(",") for line in gpus.splitlines())
                    if index.strip() in wanted or uuid.strip() in wanted}
    except (OSError, subprocess.TimeoutExpired):
        return ()
    found = []
    for line in out.splitlines():
        pid, _, uuid = line.partition(",")
        if pid.strip().isdigit() and (mine is None or uuid.strip() in mine):
            found.append(int(pid))
    return tuple(found)


def process_tree(pid):
    try:
        root = psutil.Process(pid)
        return {pid, *(child.pid for child in root.children(recursive=True))}
    except psutil.Error:
        return {pid}


class LoadMonitor:
    """start() before the training process starts, watch(pid) once it runs, finish() after it is
    reaped; finish() returns the Load."""

    def __init__(self, watch_gpu=None):
        self.watch_gpu = shutil.which("nvidia-smi") is not None if watch_gpu is None else watch_gpu
        self.strangers = []
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        self.started = time.monotonic()
        self.cpu_start = busy_seconds(psutil.cpu_times())
        self.children_start = own_seconds(resource.getrusage(resource.RUSAGE_CHILDREN))
        self.self_start = own_seconds(resource.getrusage(resource.RUSAGE_SELF))
        return self

    def watch(self, pid):
        if self.watch_gpu:
            self._thread = threading.Thread(target=self._sample_gpu, args=(pid,), daemon=True)
            self._thread.start()

    def _sample_gpu(self, pid):
        while not self._stop.wait(SAMPLE_SECONDS):
            ours = process_tree(pid)
            for other in gpu_processes():
                if other not in ours and other != os.getpid() and other not in self.strangers:
                    self.strangers.append(other)

    def finish(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        wall = max(time.monotonic() - self.started, 1e-9)
        busy = busy_seconds(psutil.cpu_times()) - self.cpu_start
        ours = (own_seconds(resource.getrusage(resource.RUSAGE_CHILDREN)) - self.children_start
                + own_seconds(resource.getrusage(resource.RUSAGE_SELF)) - self.self_start)
        other = max(0.0, busy - ours)
        return Load(other / (wall * (psutil.cpu_count() or 1)), other, wall, tuple(self.strangers))
