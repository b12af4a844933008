"""Data-parallel training on the frameworks' own engines: the plumbing both training scripts share.

Every rank holds the whole model, trains on its own slice of each global batch (prepare's
make_dataloader(rank=, world_size=)), and replaces its gradients by their mean over the ranks
before the optimizer step, so all ranks apply the same update and stay identical.

    train.py under torchrun (torch.distributed: gloo on CPU, nccl on CUDA):
        uv run torchrun --nproc_per_node 2 train.py
        ranks = torchrun_ranks(backend)          # at import: RANK, WORLD_SIZE, ... from torchrun
        init_torch(backend, ranks)               # in main(): process group, GPU or share of cores
        check_same_run_torch(__file__, dataset, device)   # same script, harness and data everywhere
        broadcast_torch_parameters(model)        # rank 0's initial weights everywhere
        average_torch_gradients(model.parameters())
        finish_torch()
    train_mlx.py under mlx.launch (mx.distributed: ring over TCP, or jaccl over Thunderbolt):
        uv run mlx.launch -n 2 --python .venv/bin/python train_mlx.py
        group = init_mlx()                       # size 1 without mlx.launch
        check_same_run_mlx(__file__, dataset, group)
        broadcast_mlx_parameters(model, group)
        grads = average_mlx_gradients(grads, group)

Without a launcher a process is rank 0 of 1 and every function here does nothing, so
single-process runs are unchanged. A rank whose peer exits gets an error from the engine within
seconds; a peer that hangs, or whose machine drops off the network, is caught by the process
group timeout (torch) and by Watchdog (both scripts; MLX's collectives have no timeout).
torch and mlx are imported inside functions, like the rest of backends/.
"""

import datetime
import hashlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

from backends.hardware import get_hardware_info
from backends.report import harness_hash

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# A training step that takes longer than this means a rank is stuck: long enough for a first
# step that compiles (minutes on a CPU), short enough to free the machines well before morning.
STALL_TIMEOUT_S = 600
MLX_COMMAND = "uv run mlx.launch --hostfile hosts.json --python .venv/bin/python train_mlx.py"
DIFFERENT_RUNS = ("the ranks run different experiments (training script, prepare.py/backends or "
                  "dataset differ between machines): give every machine the same checkout and "
                  "prepared dataset, e.g. rsync the repository before each run")


class DistributedError(RuntimeError):
    """A launcher set-up that cannot train; the message is one line naming the fix."""


def run_fingerprint(script, dataset):
    """Four numbers that change when the training script, the locked harness (prepare.py,
    backends/) or the dataset name change: ranks must agree on them before training together."""
    digest = hashlib.sha256(Path(script).read_bytes())
    digest.update(harness_hash().encode())
    digest.update(dataset.encode())
    raw = digest.digest()
    return [int.from_bytes(raw[i:i + 3], "big") for i in range(0, 12, 3)]  # 24 bits: exact in int32


class Ranks(NamedTuple):
    """Where this process sits among the ranks torchrun started (one process: the defaults)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


# ---------------------------------------------------------------------------------------------
# PyTorch (torchrun)

def torchrun_ranks(backend, environ=None):
    """This process's Ranks from torchrun's environment variables, or Ranks() when torchrun did
    not start it. Raises DistributedError for a launch that cannot work (MPS, mlx.launch, bad
    values)."""
    environ = os.environ if environ is None else environ
    present = [name for name in TORCHRUN_ENV if name in environ]
    if not present:
        if "MLX_RANK" in environ:
            raise DistributedError("train.py was started by mlx.launch, which only MLX can join: "
                                   "run train_mlx.py under mlx.launch, or train.py under torchrun")
        return Ranks()
    missing = [name for name in TORCHRUN_ENV if name not in environ]
    if missing:
        raise DistributedError(f"{', '.join(present)} set but {', '.join(missing)} not: start the "
                               f"script with torchrun, or unset them for a single-process run")
    try:
        ranks = Ranks(*(int(environ[name]) for name in TORCHRUN_ENV))
    except ValueError:
        values = ", ".join(f"{name}={environ[name]!r}" for name in TORCHRUN_ENV)
        raise DistributedError(f"torchrun variables are not integers ({values}): start the script "
                               f"with torchrun, or unset them") from None
    if not (0 <= ranks.rank < ranks.world_size and 0 <= ranks.local_rank < ranks.local_world_size
            and ranks.local_world_size <= ranks.world_size):
        raise DistributedError(f"inconsistent torchrun variables {ranks}: start the script with "
                               f"torchrun, or unset them")
    if ranks.world_size > 1 and backend == "mps":
        raise DistributedError(f"PyTorch cannot train on MPS from several processes; to train "
                               f"across Macs use MLX's engine: {MLX_COMMAND}")
    return ranks


def threads_per_rank(local_world_size, cpu_cores=None):
    """CPU threads for each of local_world_size ranks sharing this machine's cores."""
    cpu_cores = cpu_cores or get_hardware_info()["cpu_cores"]
    return max(1, cpu_cores // local_world_size)


def init_torch(backend, ranks, timeout_s=None):
    """Join torchrun's process group: nccl with one GPU per local rank on CUDA, gloo on the CPU
    with the cores divided between the local ranks (torchrun's default is one thread each).
    Nothing to do for one process."""
    if ranks.world_size == 1:
        return
    import torch
    import torch.distributed as dist

    if backend == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise DistributedError(f"torchrun started {ranks.local_world_size} processes on this "
                                   f"machine but it has {torch.cuda.device_count()} GPUs: pass "
                                   f"--nproc_per_node {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(ranks.local_rank)
    else:
        torch.set_num_threads(threads_per_rank(ranks.local_world_size))
    timeout = datetime.timedelta(seconds=timeout_s or STALL_TIMEOUT_S)
    dist.init_process_group("nccl" if backend == "cuda" else "gloo", timeout=timeout)


def check_same_run_torch(script, dataset, device):
    """Raise DistributedError on every rank unless all of them run the same experiment."""
    if _torch_world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    highest = torch.tensor(run_fingerprint(script, dataset), dtype=torch.int64, device=device)
    lowest = highest.clone()
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    if not torch.equal(highest, lowest):
        raise DistributedError(DIFFERENT_RUNS)


def finish_torch():
    """Leave the process group after the last collective of the run, all ranks together: the
    barrier keeps a rank from closing its connections while a peer still uses them."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _torch_world_size():
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _torch_all_sum_(tensors):
    """Sum each tensor over the ranks, in place, with one all-reduce of a flat copy."""
    import torch
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    torch._foreach_copy_(tensors, [part.view_as(t) for part, t in
                                   zip(flat.split([t.numel() for t in tensors]), tensors)])


def broadcast_torch_parameters(model):
    """Give every rank rank 0's parameters, so training starts from one model everywhere."""
    import torch

    world_size = _torch_world_size()
    if world_size == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        params = list(model.parameters())
        if dist.get_rank() != 0:
            torch._foreach_zero_(params)
        _torch_all_sum_(params)


def average_torch_gradients(parameters):
    """Replace every parameter's gradient by its mean over the ranks (the twin of
    mlx.nn.average_gradients). Every rank's backward pass must have given the same parameters a
    gradient."""
    world_size = _torch_world_size()
    if world_size == 1:
        return
    import torch

    grads = [p.grad for p in parameters if p.grad is not None]
    _torch_all_sum_(grads)
    torch._foreach_div_(grads, world_size)


# ---------------------------------------------------------------------------------------------
# MLX (mlx.launch)

def init_mlx(environ=None):
    """The mx.distributed group of the ranks mlx.launch started (ring over TCP, jaccl where it is
    set up), or a group of one without mlx.launch. Raises DistributedError under torchrun, whose
    processes MLX cannot join."""
    environ = os.environ if environ is None else environ
    if "MLX_RANK" not in environ and environ.get("WORLD_SIZE", "1") != "1":
        raise DistributedError("train_mlx.py was started by torchrun, which only PyTorch can join: "
                               f"run it under mlx.launch ({MLX_COMMAND}), or use train.py with a "
                               f"torch backend under torchrun")
    import mlx.core as mx

    return mx.distributed.init()


def check_same_run_mlx(script, dataset, group):
    """Raise DistributedError on every rank unless all of them run the same experiment."""
    if group.size() == 1:
        return
    import mlx.core as mx

    mine = mx.array(run_fingerprint(script, dataset), dtype=mx.int32)
    highest = mx.distributed.all_max(mine, group=group)
    lowest = mx.distributed.all_min(mine, group=group)
    if not mx.array_equal(highest, lowest).item():
        raise DistributedError(DIFFERENT_RUNS)


def _mlx_all_sum(arrays, group):
    """The sums over the ranks of a list of arrays, with one all_sum of a flat concatenation."""
    import mlx.core as mx

    flat = mx.distributed.all_sum(mx.concatenate([a.reshape(-1) for a in arrays]), group=group)
    offsets = [0]
    for a in arrays[:-1]:
        offsets.append(offsets[-1] + a.size)
    return [part.reshape(a.shape) for part, a in zip(mx.split(flat, offsets[1:]), arrays)]


def _map_leaves(tree, function):
    """tree with its arrays replaced by function(list of arrays), structure and names kept
    (tree_unflatten would turn dicts with numeric keys, such as value_embeds, into lists)."""
    from mlx.utils import tree_flatten, tree_map_with_path

    names, arrays = zip(*tree_flatten(tree))
    by_name = dict(zip(names, function(list(arrays))))
    return tree_map_with_path(lambda name, _: by_name[name], tree)


def broadcast_mlx_parameters(model, group):
    """Give every rank rank 0's parameters, so training starts from one model everywhere."""
    import mlx.core as mx

    if group.size() == 1:
        return
    keep = group.rank() == 0
    model.update(_map_leaves(model.parameters(), lambda arrays: _mlx_all_sum(
        [a if keep else mx.zeros_like(a) for a in arrays], group)))
    mx.eval(model.parameters())


def average_mlx_gradients(grads, group):
    """grads (the tree from nn.value_and_grad) averaged over the ranks; works inside mx.compile."""
    if group.size() == 1:
        return grads
    size = group.size()
    return _map_leaves(grads, lambda arrays: [s / size for s in _mlx_all_sum(arrays, group)])


# ---------------------------------------------------------------------------------------------
# Both

class Watchdog:
    """Stops this rank when no training step has finished for timeout_s seconds.

    A peer that exits closes its sockets and the engines raise at once, but one that hangs, or
    whose machine drops off the network, would keep the others waiting in a collective forever
    (MLX's have no timeout). The collectives release the GIL while they wait, so this thread
    still runs. Does nothing for one process.
    """

    def __init__(self, rank, world_size, timeout_s=None):
        self.rank, self.world_size = rank, world_size
        self.timeout_s = timeout_s or STALL_TIMEOUT_S
        self._last_beat = time.monotonic()
        self._stopped = threading.Event()
        if world_size > 1:
            threading.Thread(target=self._watch, name="distributed-watchdog", daemon=True).start()

    def beat(self):
        """A step finished: restart the countdown."""
        self._last_beat = time.monotonic()

    def stop(self):
        """Training is over (the rest of the run needs no other rank)."""
        self._stopped.set()

    def _watch(self):
        while not self._stopped.wait(min(1.0, self.timeout_s / 10)):
            if time.monotonic() - self._last_beat > self.timeout_s:
                print(f"error: rank {self.rank} of {self.world_size}: no training step finished "
                      f"in {self.timeout_s:g} s, so another rank is stuck or unreachable; stopping "
                      f"(the first rank to fail says why in its output)",
                      file=sys.stderr, flush=True)
                os._exit(1)
