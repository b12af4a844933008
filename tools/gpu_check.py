"""The GPU figures of issue 17 in one command per device call: FlexAttention against the dense
mask on CUDA (kernels, then train.py's MFU both ways), then MLX on the GPU through mlx[cuda].

    uv run tools/gpu_check.py --stage             # here (PyPI reachable): fill .gpu_check/
    python3 tools/gpu_check.py --part torch --out $OUT   # device call 1, carry [".gpu_check"]
    uv run tools/gpu_check.py --stage-second      # here: swap in the second wheel part
    python3 tools/gpu_check.py --part mlx --deadline 300 --out $OUT   # device call 2, within 30 s
    uv run tools/gpu_check.py --dry-run           # on a CPU: every step at toy sizes, both parts

A device machine reaches no network and holds torch but neither this kit's dataset nor mlx, so
--stage copies the active prepared dataset and downloads the mlx and mlx-cuda-13 wheels into
.gpu_check/ (git-ignored). mlx-cuda-13 (~90 MB) is more than one call carries (64 MiB), so it
travels in two parts: the torch call stashes the first on the machine (outside the repository,
which is laid anew each call; it lasts while the machine stays warm, 30 s after a call), and
the mlx call brings the second and joins them. If the machine went back in between, the
mlx_install step says so: then `--stage` again, a call of `--part stash` (seconds), then
`--stage-second` and the mlx call.

Every step runs as its own subprocess with its own timeout; a failing step is recorded and the
next one runs. After each step the figures so far are written to --out (default
results/gpu_check; pass $OUT on the device) as gpu_check_<part>.json and .md, with every step's
output in gpu_check_<part>.log.

Steps, torch part: machine, dataset (rebuilds the token cache the copy invalidated),
flex_kernels (compiled FlexAttention against SDPA with the dense mask and against causal flash:
errors and forward + backward time of one layer at the H100 tier's shapes), bench_flex and
bench_mask (tools/bench.py --backend cuda --seconds N --repeats 1: train.py as it is, then with
torch_ops.FLEX_DEVICES = (), the dense mask of before; the "after" runs first in case time runs out).
mlx part: mlx_dataset (the token cache again: each call lays .gpu_check anew), mlx_install,
mlx_smoke (train_mlx.py, smoke profile, 10 s), mlx_run (train_mlx.py, N s), parity (same
weights: train.py's model on CUDA, FlexAttention and dense mask, against train_mlx.py's on the
GPU: logits, loss, gradients), mlx_windows (mx.fast.scaled_dot_product_attention forward +
backward with mask "causal", a boolean window mask and no mask).
"""

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
STAGE_DIR = REPO_ROOT / ".gpu_check"           # carried to the device (git-ignored)
DOWNLOAD_DIR = REPO_ROOT / ".gpu_check_download"  # the whole wheels, here only (git-ignored)
STASH_DIR = Path("/tmp/gpu_check_stash")       # on the device: outlives a call while it stays warm
MLX_VERSION = "0.32.4"                         # = uv.lock's mlx
WHEEL_PLATFORM = ("3.12", "manylinux_2_35_x86_64")  # the device's python3 (KINDS.md)
CARRY_LIMIT = 64 * 2**20
PART_BYTES = 44 * 2**20  # two parts, each fits one call beside the dataset and the repository
FLEX_CONSTANT = "from backends import torch_ops  # noqa: E402"
DEFAULT_SECONDS = 60


# ---------------------------------------------------------------------------------------------
# The steps. Each returns a dict of figures; dry_run picks toy sizes on whatever device there is.

def step_machine(dry_run):
    import torch
    figures = {"python": sys.version.split()[0], "torch": torch.__version__,
               "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                       gpu_memory_gb=round(props.total_memory / 2**30, 1))
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,clocks.max.sm,power.limit"
        smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        figures["nvidia_smi"] = smi.stdout.strip()
    return figures


def step_dataset(dry_run):
    import prepare
    started = time.perf_counter()
    prepare.build_token_cache(prepare.dataset_dir(), prepare.get_tokenizer())
    return {"dataset": prepare.active_dataset(), "cache_dir": str(prepare.cache_root()),
            "token_cache_seconds": time.perf_counter() - started}


def timed_ms(function, device, repeats):
    """Median milliseconds of function() after two warm-up calls, timed on the device's queue."""
    import statistics

    import torch
    for _ in range(2):
        function()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            function()
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def step_flex_kernels(dry_run):
    """One S layer's attention (window T/2) three ways: compiled FlexAttention, SDPA with the dense
    mask (the old path), and SDPA causal (what L layers run, flash): max errors against the dense
    mask in bf16, forward and backward, and the time of forward + backward of each."""
    import torch
    import torch.nn.functional as F

    from backends import torch_ops
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The H100 tier's attention: 4 heads of 128, rows of 2048, window 1024 (a quarter of its 128
    # rows per micro-step, to keep the step short). A CPU cannot run FlexAttention's backward.
    B, H, T, D = (2, 2, 256, 32) if dry_run else (32, 4, 2048, 128)
    backward = device == "cuda"
    window = T // 2
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, generator=generator)
               .requires_grad_(backward) for _ in range(3))
    dense = torch_ops.window_mask(T, window, device)
    block_mask = torch_ops.sliding_window_block_mask(T, window, torch.device(device))
    grad_out = torch.randn_like(q)
    paths = {
        "flex": lambda: torch_ops.flex_window_attention(q, k, v, window),
        "dense_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
        "causal_flash": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    figures = {"device": device, "shape_BHTD": [B, H, T, D], "window": window,
               "blocks_computed": int(block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()),
               "blocks_total": (T // 128) ** 2}
    with torch.set_grad_enabled(backward):
        outputs = {name: path() for name, path in paths.items()}
        figures["forward_max_error_bf16"] = (outputs["flex"] - outputs["dense_mask"]).abs().max().item()
        if backward:
            flex_grads = torch.autograd.grad(outputs["flex"], (q, k, v), grad_out)
            dense_grads = torch.autograd.grad(outputs["dense_mask"], (q, k, v), grad_out)
            figures["backward_max_relative_error_bf16"] = max(
                ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(flex_grads, dense_grads))
        for name, path in paths.items():
            def step(path=path):
                out = path()
                if backward:
                    torch.autograd.grad(out, (q, k, v), grad_out)
            label = f"{name}_ms_fwd_bwd" if backward else f"{name}_ms_fwd"
            figures[label] = timed_ms(step, device, 3 if dry_run else 10)
    return figures


def last_line(result):
    lines = (result.stdout + result.stderr).strip().splitlines()
    return lines[-1] if lines else "no output"


def bench(backend_args, output, script=None):
    command = [sys.executable, str(REPO_ROOT / "tools" / "bench.py"), *backend_args, "--repeats", "1",
               "-o", str(output)]
    if script is not None:
        command += ["--script", str(script)]
    result = subprocess.run(command, cwd=REPO_ROOT, text=True, capture_output=True)
    print(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"bench.py exit {result.returncode}: {last_line(result)}")
    report = json.loads(output.read_text())
    (backend, figures), = report["backends"].items()
    keep = ("train_tokens_per_second", "mfu_percent", "data_wait_percent", "untimed_seconds",
            "startup_seconds", "eval_tokens_per_second", "peak_memory_mb", "val_bpb", "num_steps",
            "peak_tflops", "peak_source")
    return {"backend": backend, "chip": report["machine"]["chip"], "commit": report["commit"],
            **{key: figures[key] for key in keep}}


def bench_args(dry_run, seconds):
    if dry_run:
        return ["--backend", "cpu", "--profile", "smoke", "--seconds", "2"]
    return ["--backend", "cuda", "--seconds", str(seconds)]


def step_bench_mask(dry_run, seconds):
    source = (REPO_ROOT / "train.py").read_text()
    if FLEX_CONSTANT not in source:
        raise RuntimeError(f"train.py has no line {FLEX_CONSTANT!r} to switch off: update FLEX_CONSTANT")
    with tempfile.TemporaryDirectory() as folder:
        variant = Path(folder) / "train.py"
        variant.write_text(source.replace(FLEX_CONSTANT, FLEX_CONSTANT + "\ntorch_ops.FLEX_DEVICES = ()"))
        return bench(bench_args(dry_run, seconds), Path(folder) / "bench.json", variant)


def step_bench_flex(dry_run, seconds):
    with tempfile.TemporaryDirectory() as folder:
        return bench(bench_args(dry_run, seconds), Path(folder) / "bench.json")


def step_mlx_install(dry_run):
    wheels = sorted(STAGE_DIR.glob("wheels/*.whl"))
    parts = {}
    for folder in (STAGE_DIR / "wheels", STASH_DIR):
        for part in folder.glob("*.part*"):
            parts.setdefault(part.name, part)
    figures = {"wheels": [w.name for w in wheels], "parts": sorted(parts)}
    if parts:
        sums = json.loads((STAGE_DIR / "wheels" / "parts.json").read_text())
        missing = sorted(set(sums["parts"]) - set(parts))
        if missing:
            raise RuntimeError(f"wheel parts {missing} are missing: the machine went back after the "
                               f"torch call; see tools/gpu_check.py's docstring for the calls")
        (STAGE_DIR / "joined").mkdir(exist_ok=True)
        joined = STAGE_DIR / "joined" / sums["wheel"]
        with open(joined, "wb") as out:
            for name in sums["parts"]:
                out.write(parts[name].read_bytes())
        if hashlib.sha256(joined.read_bytes()).hexdigest() != sums["sha256"]:
            raise RuntimeError(f"{sums['wheel']} joined from its parts has the wrong checksum")
        wheels.append(joined)
    if wheels and not dry_run:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--upgrade", "--target", str(STAGE_DIR / "site"),
                        *map(str, wheels)],
                       check=True, timeout=300)
    result = subprocess.run([sys.executable, "-c", "import mlx.core as mx, importlib.metadata as m; "
                             "print(m.version('mlx'), mx.default_device(), mx.cuda.is_available())"],
                            capture_output=True, text=True, env=step_env(for_mlx=True), timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"mlx does not import: {result.stderr.strip().splitlines()[-1]}")
    figures["mlx"] = result.stdout.strip()
    return figures


def run_train_mlx(profile, seconds):
    with tempfile.TemporaryDirectory() as runs_dir:
        env = dict(os.environ, AUTORESEARCH_PROFILE=profile, AUTORESEARCH_TIME_BUDGET=str(seconds),
                   AUTORESEARCH_RUNS_DIR=runs_dir, AUTORESEARCH_BACKEND="mlx")
        result = subprocess.run([sys.executable, str(REPO_ROOT / "train_mlx.py")], cwd=REPO_ROOT,
                                env=env, text=True, capture_output=True)
        print(result.stdout.replace("\r", "\n")[-3000:] + result.stderr[-3000:])
        if result.returncode != 0:
            raise RuntimeError(f"train_mlx.py exit {result.returncode}: {last_line(result)}")
        fields = json.loads((Path(runs_dir) / "last_run.json").read_text())
    keep = ("val_bpb", "train_tokens_per_second", "mfu_percent", "num_steps", "training_seconds",
            "untimed_seconds", "data_wait_percent", "peak_vram_mb", "chip", "depth")
    return {key: fields[key] for key in keep}


def step_mlx_smoke(dry_run):
    return run_train_mlx("smoke", 2 if dry_run else 10)


def step_mlx_run(dry_run, seconds):
    return run_train_mlx("smoke", 2) if dry_run else run_train_mlx("standard", seconds)


def step_parity(dry_run):
    """train.py's and train_mlx.py's models with the same fp32 weights, each on its GPU: the
    largest differences in logits, loss and gradients (relative to each gradient's largest)."""
    import mlx.core as mx
    import mlx.nn as mnn
    import numpy as np
    import torch
    from mlx.utils import tree_flatten, tree_map_with_path

    import train
    import train_mlx
    from backends import torch_ops
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = dict(sequence_len=256, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
                  window_pattern="SSSL")
    torch.manual_seed(0)
    torch_model = train.GPT(train.GPTConfig(**config)).to(device)
    with torch.no_grad():
        for param in torch_model.parameters():
            param.copy_(torch.randn_like(param) * 0.1)
    weights = {name: param.detach().cpu().numpy() for name, param in torch_model.named_parameters()}
    mlx_model = train_mlx.GPT(train_mlx.GPTConfig(**config))
    mlx_model.update(tree_map_with_path(lambda name, _: mx.array(weights[name]), mlx_model.parameters()))
    rng = np.random.default_rng(1)
    idx, targets = (rng.integers(0, config["vocab_size"], (4, 256)) for _ in range(2))
    loss_and_grad = mnn.value_and_grad(mlx_model, lambda model, x, y: model(x, y))
    mlx_loss, mlx_grads = loss_and_grad(mlx_model, mx.array(idx), mx.array(targets))
    mlx_grads = {name: np.array(g) for name, g in tree_flatten(mlx_grads)}
    mlx_logits = np.array(mlx_model(mx.array(idx)))
    figures = {"torch_device": device, "mlx_device": str(mx.default_device()),
               "mlx_loss": mlx_loss.item()}
    # A CPU has no FlexAttention backward: the dry run compares the dense mask path only.
    for flex in ([False] if device == "cpu" else [False, True]):
        torch_ops.FLEX_DEVICES = ("cuda",) if flex else ()
        if flex:  # FlexAttention runs inside compiled blocks only, as in train.py
            for block in torch_model.transformer.h:
                block.compile(dynamic=False)
        torch_model.zero_grad(set_to_none=True)
        x, y = torch.from_numpy(idx).to(device), torch.from_numpy(targets).to(device)
        loss = torch_model(x, y)
        loss.backward()
        with torch.no_grad():
            logits = torch_model(x).cpu().numpy()
        grad_error = max(float(np.abs(mlx_grads[name] - p.grad.cpu().numpy()).max()
                               / np.abs(p.grad.cpu().numpy()).max())
                         for name, p in torch_model.named_parameters())
        path = "flex" if flex else "dense_mask"
        figures[f"{path}_logits_max_error"] = float(np.abs(mlx_logits - logits).max())
        figures[f"{path}_loss_error"] = abs(mlx_loss.item() - loss.item())
        figures[f"{path}_grad_max_relative_error"] = grad_error
    return figures


def step_mlx_windows(dry_run):
    """mx.fast.scaled_dot_product_attention, forward + backward compiled as in training, for one
    S layer: mask "causal", a boolean window mask (T/2, what train_mlx.py passes) and no mask."""
    import mlx.core as mx
    B, H, T, D = (2, 2, 256, 32) if dry_run else (32, 4, 2048, 128)
    dtype = mx.bfloat16 if (mx.metal.is_available() or mx.cuda.is_available()) else mx.float32
    q, k, v = (mx.random.normal((B, H, T, D)).astype(dtype) for _ in range(3))
    pos = mx.arange(T)
    distance = pos[:, None] - pos[None, :]
    masks = {"causal": "causal", "window_mask": (distance >= 0) & (distance < T // 2), "no_mask": None}
    figures = {"device": str(mx.default_device()), "dtype": str(dtype), "shape_BHTD": [B, H, T, D]}
    for name, mask in masks.items():
        def loss(q, k, v, mask=mask):
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=mask).sum()
        grad = mx.compile(mx.grad(loss, argnums=(0, 1, 2)))
        for _ in range(2):
            mx.eval(grad(q, k, v))
        times = []
        for _ in range(3 if dry_run else 10):
            started = time.perf_counter()
            mx.eval(grad(q, k, v))
            times.append(1000 * (time.perf_counter() - started))
        figures[f"{name}_ms_fwd_bwd"] = sorted(times)[len(times) // 2]
    return figures


PARTS = {
    "torch": [("machine", step_machine, 60), ("dataset", step_dataset, 180),
              ("flex_kernels", step_flex_kernels, 300), ("bench_flex", step_bench_flex, None),
              ("bench_mask", step_bench_mask, None)],
    "mlx": [("mlx_dataset", step_dataset, 180), ("mlx_install", step_mlx_install, 300),
            ("mlx_smoke", step_mlx_smoke, 180), ("mlx_run", step_mlx_run, None),
            ("parity", step_parity, 240), ("mlx_windows", step_mlx_windows, 240)],
}
TAKES_SECONDS = {"bench_mask", "bench_flex", "mlx_run"}


# ---------------------------------------------------------------------------------------------
# Running the steps

def step_env(for_mlx=False):
    """The environment of a step: the staged dataset and the installed wheels, if present, and
    for MLX the loader's path to CUDA's libraries."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if (STAGE_DIR / "cache").is_dir():
        env["AUTORESEARCH_CACHE_DIR"] = str(STAGE_DIR / "cache")
    paths = [str(REPO_ROOT)] + ([str(STAGE_DIR / "site")] if (STAGE_DIR / "site").is_dir() else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
    # libmlx.so looks for CUDA's libraries beside itself (its RPATH); installed apart from them,
    # it finds torch's copies in this interpreter's site-packages through the loader's path.
    if for_mlx:
        libraries = sorted(str(lib) for root in site.getsitepackages()
                           for lib in Path(root).glob("nvidia/*/lib"))
        inherited = [os.environ["LD_LIBRARY_PATH"]] if os.environ.get("LD_LIBRARY_PATH") else []
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries + inherited)
        # Its kernels compile at run time (NVRTC) against the CUDA headers: the machine's toolkit.
        if "CUDA_HOME" not in env and Path("/usr/local/cuda/include").is_dir():
            env["CUDA_HOME"] = "/usr/local/cuda"
    return env


def run_step(name, args, log):
    """Run one step in a subprocess within its timeout; returns its record for the report."""
    function, timeout = next((f, t) for step, f, t in PARTS[args.part_of[name]] if step == name)
    timeout = timeout or (120 if args.dry_run else 2 * args.seconds + 240)
    remaining = int(args.ends_at - time.perf_counter())
    if remaining < 20:
        return {"ok": False, "error": "skipped: the call's --deadline left no time", "seconds": 0}
    timeout = min(timeout, remaining)
    with tempfile.TemporaryDirectory() as folder:
        result_file = Path(folder) / "result.json"
        command = [sys.executable, __file__, "--step", name, "--result", str(result_file),
                   "--seconds", str(args.seconds)] + (["--dry-run"] if args.dry_run else [])
        started = time.perf_counter()
        log.write(f"\n===== {name} (timeout {timeout} s) =====\n")
        log.flush()
        # A session of its own, so that a time-out ends the step's training runs with it.
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env=step_env(for_mlx=args.part_of[name] == "mlx"),
                                   start_new_session=True)
        try:
            process.wait(timeout=timeout)
            record = (json.loads(result_file.read_text()) if result_file.exists()
                      else {"ok": False, "error": f"exit {process.returncode} without a result"})
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            record = {"ok": False, "error": f"timed out after {timeout} s"}
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def write_report(out, part, report):
    (out / f"gpu_check_{part}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# gpu_check {part}{' (dry run)' if report['dry_run'] else ''}", "",
             f"{report['date']}, commit {report['commit']}", ""]
    for name, record in report["steps"].items():
        verdict = "ok" if record["ok"] else f"FAILED: {record['error']}"
        lines.append(f"## {name}: {verdict} ({record['seconds']} s)")
        for key, value in record.get("figures", {}).items():
            lines.append(f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}")
        lines.append("")
    (out / f"gpu_check_{part}.md").write_text("\n".join(lines))


def stash_wheel_parts():
    """Torch call: keep the wheel parts this call carried where the mlx call finds them."""
    STASH_DIR.mkdir(parents=True, exist_ok=True)
    for part in STAGE_DIR.glob("wheels/*.part*"):
        shutil.copy2(part, STASH_DIR / part.name)


def stage():
    """Fill .gpu_check/: the active dataset (no token cache: the copy's dates invalidate it) and the
    mlx wheels, mlx-cuda-13 in parts; wheels/ holds the first part, for the torch call."""
    import prepare
    cache = STAGE_DIR / "cache"
    source = prepare.dataset_dir()
    target = cache / source.name
    shutil.rmtree(STAGE_DIR / "wheels", ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("tokens"))
    (cache / "active_dataset").write_text(source.name + "\n")
    download = DOWNLOAD_DIR
    download.mkdir(parents=True, exist_ok=True)
    python_version, platform = WHEEL_PLATFORM
    # uv's environments come without pip: then uvx runs pip from PyPI.
    pip = [sys.executable, "-m", "pip"] if importlib.util.find_spec("pip") else ["uvx", "pip"]
    for name in (f"mlx=={MLX_VERSION}", f"mlx-cuda-13=={MLX_VERSION}"):
        subprocess.run([*pip, "download", "-q", "--no-deps",
                        "--only-binary=:all:", "--python-version", python_version,
                        "--implementation", "cp", "--platform", platform, "-d", str(download), name],
                       check=True)
    wheels = STAGE_DIR / "wheels"
    wheels.mkdir()
    shutil.copy2(next(download.glob("mlx-*.whl")), wheels)
    big = next(download.glob("mlx_cuda_13-*.whl"))
    data = big.read_bytes()
    names = [f"{big.name}.part{i}" for i in range(-(-len(data) // PART_BYTES))]
    (wheels / "parts.json").write_text(json.dumps(
        {"wheel": big.name, "sha256": hashlib.sha256(data).hexdigest(), "parts": names}))
    write_wheel_parts(names[:-1])
    size = sum(f.stat().st_size for f in STAGE_DIR.rglob("*") if f.is_file())
    print(f"staged {source.name} and {', '.join(names[:-1])} for the torch call "
          f"({size / 2**20:.0f} MiB of the {CARRY_LIMIT / 2**20:.0f} MiB a call carries)")


def write_wheel_parts(wanted):
    """Leave in .gpu_check/wheels exactly the parts of mlx-cuda-13 named in `wanted`."""
    big = next(DOWNLOAD_DIR.glob("mlx_cuda_13-*.whl"))
    names = json.loads((STAGE_DIR / "wheels" / "parts.json").read_text())["parts"]
    data = big.read_bytes()
    for i, name in enumerate(names):
        path = STAGE_DIR / "wheels" / name
        path.unlink(missing_ok=True)
        if name in wanted:
            path.write_bytes(data[i * PART_BYTES:(i + 1) * PART_BYTES])


def stage_second():
    """Swap the first part in .gpu_check/wheels for the last, which the mlx call carries."""
    names = json.loads((STAGE_DIR / "wheels" / "parts.json").read_text())["parts"]
    write_wheel_parts(names[-1:])
    print(f"staged {names[-1]} for the mlx call")


def git_commit():
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, text=True,
                            capture_output=True)
    return result.stdout.strip() or None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("torch", "mlx", "all", "stash"), default="all",
                        help="stash: only keep the carried wheel parts on the machine")
    parser.add_argument("--seconds", type=int, default=DEFAULT_SECONDS,
                        help=f"training budget of each benchmark and MLX run (default {DEFAULT_SECONDS})")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on any device")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "gpu_check")
    parser.add_argument("--stage", action="store_true", help="fill .gpu_check/ (needs PyPI)")
    parser.add_argument("--deadline", type=float, default=570,
                        help="seconds for all the steps of a call (a device call may run 600)")
    parser.add_argument("--stage-second", action="store_true",
                        help="swap in the wheel parts for the mlx call")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.part_of = {name: part for part, steps in PARTS.items() for name, _, _ in steps}
    if args.stage:
        return stage()
    if args.stage_second:
        return stage_second()
    if args.step:  # inside a step's subprocess
        function = next(f for steps in PARTS.values() for name, f, _ in steps if name == args.step)
        try:
            extra = (args.seconds,) if args.step in TAKES_SECONDS else ()
            record = {"ok": True, "figures": function(args.dry_run, *extra)}
        except Exception as error:  # noqa: BLE001  (any failure is this step's result)
            import traceback
            traceback.print_exc()
            record = {"ok": False, "error": f"{type(error).__name__}: {str(error).strip()[:300]}"}
        args.result.write_text(json.dumps(record, default=str))
        return None
    if args.part in ("torch", "stash") and not args.dry_run:
        stash_wheel_parts()
    if args.part == "stash":
        return None
    args.out.mkdir(parents=True, exist_ok=True)
    args.ends_at = time.perf_counter() + args.deadline
    parts = ["torch", "mlx"] if args.part == "all" else [args.part]
    for part in parts:
        report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git_commit(),
                  "dry_run": args.dry_run, "seconds": args.seconds, "steps": {}}
        with open(args.out / f"gpu_check_{part}.log", "w") as log:
            for name, _, _ in PARTS[part]:
                report["steps"][name] = run_step(name, args, log)
                write_report(args.out, part, report)
                print(f"{part}/{name}: {'ok' if report['steps'][name]['ok'] else 'FAILED'} "
                      f"({report['steps'][name]['seconds']} s)", flush=True)
    print(f"written: {args.out}")
    return None


if __name__ == "__main__":
    main()
