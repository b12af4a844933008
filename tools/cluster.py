"""The scheduler of parallel experiments: one Ray driver per checkout that runs queued runs on slots.

    uv run tools/cluster.py serve [--workers N] [--address auto|HOST:PORT]

`uv run tools/experiment.py submit` starts it on demand (detached, its output in
.autoresearch/parallel/scheduler.log); nobody needs to call it by hand. It only runs: it takes
runs from the queue (tools/scheduler.py), trains each on a free slot from its own tree, and writes
the finished record. It never touches results.tsv or the branch; `experiment.py wait` judges.

Slots, one experiment each:
- a CUDA box: one per GPU (Ray's GPU resource, so each run sees one GPU in CUDA_VISIBLE_DEVICES);
- a cluster of machines started with `ray start ... --resources '{"experiment_slot": 1}'`: one
  per machine that declares it (a Mac: its whole GPU);
- `--workers N` on the embedded local cluster: N CPU slices of cores/N threads each
  (OMP_NUM_THREADS and AUTORESEARCH_THREADS in the run's environment).
Without --address the scheduler starts an embedded local Ray; `--address auto` joins the cluster
that `ray start --head` runs on this machine, an address joins that head.

Each run, on its node: checks that the dataset description (dataset.json in the cache) and the
harness hash (prepare.py, dataset_builders.py, backends/) match the driver's, else the run is refused (not the idea's
fault); checks out the candidate commit in a git worktree when the checkout is on that node, else
unpacks a `git archive` of it; trains with the driver's AUTORESEARCH_* settings but its own cache
(AUTORESEARCH_CACHE_DIR of the node's environment); trains through tools/training_run.py (same
timeout, budget and load checks as `run`); returns the outcome with run.log, which the scheduler keeps under runs/<run>/.
A worker process killed or a node lost mid-run: the run is retried once, then recorded as a crash.
"""

import argparse
import contextlib
import fcntl
import hashlib
import io
import os
import shlex
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from backends.report import harness_hash
from tools import ledger, scheduler
from tools.kind import expected_kind
from tools.runner_state import Refused, refuse
from tools.training_run import LOG_FILE, RunPlan, execute

SCHEDULER_LOCK = scheduler.PARALLEL_DIR / "scheduler.lock"
SCHEDULER_LOG = scheduler.PARALLEL_DIR / "scheduler.log"
TREES_DIR = scheduler.PARALLEL_DIR / "trees"
CLUSTER_FILE = scheduler.PARALLEL_DIR / "cluster.json"  # --workers/--address of the last start
SLOT_RESOURCE = "experiment_slot"
OBJECT_STORE_BYTES = 100 * 1024 ** 2  # runs pass a log and a small archive: keep Ray's store small
IDLE_EXIT_SECONDS = 600  # the scheduler leaves when nothing was queued or running this long
POLL_SECONDS = 0.5
LOST_RETRIES = 1  # a run whose worker or node died is retried this many times
INSTALL_HINT = "Ray is not installed: run `uv sync --group parallel` (parallel experiments need it)"


def import_ray():
    """Ray, or one line naming the command that installs it."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # workers use this venv, not a new `uv run`
    try:
        import ray
    except ImportError:
        refuse(INSTALL_HINT)  # a set-up refusal like every other: one line, exit 2
    return ray


def dataset_fingerprint(dataset):
    """sha256 of the dataset's description in this machine's cache; 'missing' when absent."""
    root = Path(os.environ.get("AUTORESEARCH_CACHE_DIR") or "~/.cache/autoresearch").expanduser()
    description = root / dataset / "dataset.json"
    return hashlib.sha256(description.read_bytes()).hexdigest()[:12] if description.exists() else "missing"


def scheduler_running():
    """True when a scheduler holds this checkout's scheduler lock."""
    return scheduler.lock_is_held(SCHEDULER_LOCK)


def start_scheduler(workers=None, address=None):
    """Start the detached scheduler of this checkout unless one runs; its output goes to the log."""
    if scheduler_running():
        return False
    import_ray()
    scheduler.PARALLEL_DIR.mkdir(parents=True, exist_ok=True)
    if workers or address:
        scheduler.write_json(CLUSTER_FILE, {"workers": workers, "address": address})
    else:  # a restart (wait found runs but no scheduler): the slots the first submit asked for
        saved = scheduler.read_json(CLUSTER_FILE) or {}
        workers, address = saved.get("workers"), saved.get("address")
    command = [sys.executable, str(Path(__file__).resolve()), "serve"]
    if workers:
        command += ["--workers", str(workers)]
    if address:
        command += ["--address", address]
    with open(SCHEDULER_LOG, "ab") as log:
        subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, env=dict(os.environ, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0"))
    return True


# ---------------------------------------------------------------------------------------------
# one run, on whatever node Ray picked

def run_on_node(request, origin, expected, archive):
    """Train one queued run on this node and return its record (called as a Ray task)."""
    import ray
    node = ray.get_runtime_context().get_node_id()
    record = dict(request, host=socket.gethostname(), node=node, started_at=time.time())
    os.environ.update(origin["env"])
    dataset = request["kind"]["dataset"]
    found = {"dataset": dataset_fingerprint(dataset)}
    local = Path(origin["root"]).is_dir() and origin["host"] == socket.gethostname()
    name = f"{request['run']}.{request.get('lost', 0)}"  # a retry after a lost worker gets a fresh tree
    tree = Path(origin["root"]) / TREES_DIR / name if local else Path(tempfile.mkdtemp(prefix="autoresearch-"))
    try:
        if local:
            with worktrees_locked(origin["root"]):
                subprocess.run(["git", "-C", origin["root"], "worktree", "prune"], capture_output=True)
                added = subprocess.run(["git", "-C", origin["root"], "worktree", "add", "--quiet", "--force",
                                        "--detach", str(tree), request["commit"]], capture_output=True, text=True)
            if added.returncode:
                return dict(record, refused=f"no tree for the run: git worktree add failed: {added.stderr.strip()}")
        else:
            tarfile.open(fileobj=io.BytesIO(archive)).extractall(tree)
        found["harness"] = harness_hash(tree)
        mismatch = [f"{key} {found[key]} here, {expected[key]} on the driver" for key in expected if found[key] != expected[key]]
        if mismatch:
            return dict(record, refused=f"{socket.gethostname()} does not match the driver: {'; '.join(mismatch)}")
        return dict(record, **train_in(tree, request, origin))
    finally:
        if local:
            with worktrees_locked(origin["root"]):
                subprocess.run(["git", "-C", origin["root"], "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
        else:
            subprocess.run(["rm", "-rf", str(tree)])


@contextlib.contextmanager
def worktrees_locked(root):
    """Add, prune and remove the runs' git worktrees of one checkout one slot at a time: a prune
    that runs while another slot adds its tree can delete .git/worktrees under that add."""
    lock = Path(root) / scheduler.PARALLEL_DIR / "worktrees.lock"
    with open(lock, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield


def train_in(tree, request, origin):
    """training_run.execute in the run's tree, with the driver's AUTORESEARCH_* settings; the kind
    of this slot comes from the tree's own harness (tools/kind.py asks it in the tree)."""
    import ray
    threads = request.get("threads") or node_slot_threads(ray)
    os.environ.update({"OMP_NUM_THREADS": str(threads), "AUTORESEARCH_THREADS": str(threads)})
    os.environ.pop("AUTORESEARCH_RUNS_DIR", None)
    # This node's kit environment, not `uv run` in the tree (which would build a venv per tree).
    if "AUTORESEARCH_TRAIN_CMD" not in origin["env"]:
        os.environ["AUTORESEARCH_TRAIN_CMD"] = f"{shlex.quote(sys.executable)} {shlex.quote(request['script'])}"
    os.chdir(tree)
    kind = ledger.Kind(**request["kind"])
    try:
        here = expected_kind(threads)
    except SystemExit:  # expected_kind refused: its one line is in the scheduler's log
        return {"refused": f"set-up error on {socket.gethostname()} (see {SCHEDULER_LOG})"}
    if here != kind:
        return {"refused": f"this slot ({threads} threads on {socket.gethostname()}) trains as kind {here}, "
                           f"the run was queued as kind {kind}: every slot of one scheduler must be that kind"}
    # The other slots' runs are expected work on this machine, not a disturbance of this one.
    limit = min(1.0, request["max_disturbance"] + request.get("other_slots_share", 0.0))
    started = time.time()
    try:
        run = execute(RunPlan(request["script"], kind, request["timeout"], limit))
    except Refused as error:
        return {"refused": str(error)}
    ended = time.time()
    log = Path(tree) / LOG_FILE
    return {"outcome": vars(run.outcome), "fields": run.fields, "note": run.note, "wall": run.wall,
            "val_bpb": run.val_bpb, "memory_gb": run.memory_gb, "threads": threads,
            "training_started_at": started, "training_finished_at": ended,
            "other_cpu_share": round(run.load.other_cpu_share, 4) if run.load else None,
            "log": log.read_text(errors="replace") if log.exists() else ""}


def node_slot_threads(ray):
    """Cores of this node per experiment slot on it."""
    node = ray.get_runtime_context().get_node_id()
    for entry in ray.nodes():
        if entry["NodeID"] == node:
            slots = entry["Resources"].get(SLOT_RESOURCE) or entry["Resources"].get("GPU") or 1
            return max(1, int(entry["Resources"].get("CPU", scheduler.machine_threads()) // slots))
    return 1


# ---------------------------------------------------------------------------------------------
# the scheduler loop

def task_options(ray):
    """Ray resources of one slot: a GPU when the cluster has GPUs, else an experiment slot."""
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 0}, int(resources["GPU"])
    return {"resources": {SLOT_RESOURCE: 1}, "num_cpus": 0}, int(resources.get(SLOT_RESOURCE, 0))


def lost_errors(ray):
    names = ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "ObjectLostError", "OwnerDiedError")
    return tuple(getattr(ray.exceptions, name) for name in names if hasattr(ray.exceptions, name))


def keep_run_files(record):
    """runs/<run>/run.log and result.json: the run's log and record, slot and host included."""
    folder = Path("runs") / record["run"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.log").write_text(record.pop("log", "") or "")
    scheduler.write_json(folder / "result.json", record)


def serve(args):
    ray = import_ray()
    scheduler.PARALLEL_DIR.mkdir(parents=True, exist_ok=True)
    lock = os.open(SCHEDULER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("a scheduler already runs for this checkout", flush=True)
        return
    os.ftruncate(lock, 0)
    os.write(lock, str(os.getpid()).encode())
    if args.address:
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    else:
        workers = args.workers or local_slots()
        ray.init(num_cpus=scheduler.machine_threads(), resources={SLOT_RESOURCE: workers}, object_store_memory=OBJECT_STORE_BYTES,
                 include_dashboard=False, log_to_driver=False)
    remote = ray.remote(max_retries=0)(run_on_node)
    root = str(Path.cwd())
    origin = {"root": root, "host": socket.gethostname(),
              "env": {k: v for k, v in os.environ.items()
                      if k.startswith(("AUTORESEARCH_", "FAKE_")) and k != "AUTORESEARCH_CACHE_DIR"}}
    # A run found in running/ belongs to a scheduler that died: it goes back to the queue.
    for record in scheduler.running():
        scheduler.enqueue({k: v for k, v in record.items() if k not in ("slot", "claimed_at")})
        (scheduler.RUNNING_DIR / f"{record['run']}.json").unlink(missing_ok=True)
    try:
        schedule(ray, remote, origin, root)
    except (KeyboardInterrupt, SystemExit):
        print("scheduler: stopped; its unfinished runs go back to the queue when a scheduler starts again", flush=True)


def schedule(ray, remote, origin, root):
    """Hand queued runs to free slots and write each finished record, until idle for long.
    The slots are counted afresh each round, so a machine that joins the cluster is used."""
    archives, shown = {}, None
    in_flight, idle_since = {}, time.monotonic()
    while True:
        options, slots = task_options(ray)
        if (options, slots) != shown:
            shown = (options, slots)
            print(f"scheduler {os.getpid()}: {slots} slot(s), each {options}" +
                  ("" if slots else f"; no node offers a GPU or {SLOT_RESOURCE}: see docs/distributed.md"), flush=True)
        for request in scheduler.queued():
            free = [s for s in range(slots) if s not in {r["slot"] for r in in_flight.values()}]
            if not free:
                break
            record = scheduler.claim(dict(request, other_slots_share=(slots - 1) / slots if "resources" in options else 0.0), free[0])
            if record["commit"] not in archives:
                tar = subprocess.run(["git", "archive", record["commit"]], capture_output=True, check=True).stdout
                archives[record["commit"]] = ray.put(tar)
            expected = {"dataset": dataset_fingerprint(record["kind"]["dataset"]), "harness": harness_hash(root)}
            ref = remote.options(**options).remote(record, origin, expected, archives[record["commit"]])
            in_flight[ref] = dict(record, expected=expected)
        if in_flight:
            idle_since = time.monotonic()
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_SECONDS)
        else:
            done = []
            if time.monotonic() - idle_since > IDLE_EXIT_SECONDS:
                print("scheduler: idle, leaving", flush=True)
                return
            time.sleep(POLL_SECONDS)
        for ref in done:
            record = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except lost_errors(ray) as error:
                lost = record.get("lost", 0) + 1
                reason = f"worker lost mid-run: {type(error).__name__}"
                if lost <= LOST_RETRIES:
                    print(f"scheduler: {record['run']} {reason}; retrying once", flush=True)
                    retry = dict(record, lost=lost)
                    retry_ref = remote.options(**options).remote(retry, origin, record["expected"], archives[record["commit"]])
                    in_flight[retry_ref] = retry
                    continue
                result = dict(record, outcome={"crash": f"{reason}, twice"}, val_bpb=0.0, memory_gb=0.0)
            except ray.exceptions.RayTaskError as error:
                result = dict(record, outcome={"crash": f"the run failed on its node: {str(error).splitlines()[-1]}"},
                              val_bpb=0.0, memory_gb=0.0)
            keep_run_files(result)
            scheduler.finish(result)


def local_slots():
    """Slots of the embedded cluster: one per CUDA GPU, else one (a Mac's GPU, or the whole CPU)."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return 1


def main():
    parser = argparse.ArgumentParser(
        description="Run queued experiments on Ray slots (experiment.py submit starts this; no need to call it).",
        epilog="environment: every AUTORESEARCH_* variable but AUTORESEARCH_CACHE_DIR is passed on to the runs; "
               "each node reads the dataset from its own AUTORESEARCH_CACHE_DIR (default ~/.cache/autoresearch).")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the scheduler of this checkout in the foreground")
    serve_parser.add_argument("--workers", type=int, default=None, help="CPU slices of the local cluster")
    serve_parser.add_argument("--address", default=None, help="join this Ray cluster (auto: the one on this machine)")
    args = parser.parse_args()
    serve(args)


if __name__ == "__main__":
    main()
