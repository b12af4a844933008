"""What only a GPU measures, in one command: run it on an NVIDIA machine, keep the report.

    uv run tools/gpu_check.py --out DIR              # every step at full size (about 15 minutes)
    uv run tools/gpu_check.py --out DIR --seconds 30 # shorter training runs
    uv run tools/gpu_check.py --out DIR --dry-run    # every step at toy sizes, on any machine

Steps, in order (each in a subprocess of its own with its own timeout; a step that fails or
times out is recorded and the next one runs):

    machine        python, torch, the GPU (name, compute capability, memory), nvidia-smi's line
    flex_kernels   one S layer's attention (window T/2) three ways at the H100 tier's shapes:
                   compiled FlexAttention, SDPA with the dense mask, SDPA causal (flash); the
                   errors of FlexAttention against the dense mask, forward and backward, in bf16,
                   and the time of each
    bench_flex     tools/bench.py --backend cuda --seconds N: train.py as it is
    bench_mask     the same with torch_ops.FLEX_DEVICES = () (the dense mask instead of FlexAttention)
    mlx            whether MLX runs on this GPU (`uv pip install "mlx[cuda]"` installs it)
    mlx_smoke      train_mlx.py, smoke profile, 10 s
    mlx_run        train_mlx.py, standard profile, N s
    parity         train.py's and train_mlx.py's models with the same weights, each on the GPU:
                   the largest differences in logits, loss and gradients
    mlx_windows    mx.fast.scaled_dot_product_attention forward + backward with mask "causal",
                   a boolean window mask and no mask

The training steps use the active prepared dataset (`uv run prepare.py` first). After each
step the report so far is written to DIR: gpu_check.json (every figure), gpu_check.md (a table
of the steps) and gpu_check.log (every step's output).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FLEX_CONSTANT = "from backends import torch_ops"
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
        lines = source.splitlines(keepends=True)
        at = next(i for i, line in enumerate(lines) if line.startswith(FLEX_CONSTANT))
        variant.write_text("".join(lines[:at + 1]) + "torch_ops.FLEX_DEVICES = ()\n" + "".join(lines[at + 1:]))
        return bench(bench_args(dry_run, seconds), Path(folder) / "bench.json", variant)


def step_bench_flex(dry_run, seconds):
    with tempfile.TemporaryDirectory() as folder:
        return bench(bench_args(dry_run, seconds), Path(folder) / "bench.json")


def step_mlx(dry_run):
    """The installed MLX: its version, default device and whether it sees a CUDA GPU."""
    result = subprocess.run([sys.executable, "-c", "import mlx.core as mx, importlib.metadata as m; "
                             "print(m.version('mlx')); print(mx.default_device()); print(mx.cuda.is_available())"],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"mlx does not import ({last_line(result)}): install it with "
                           f"uv pip install 'mlx[cuda]'")
    version, device, cuda = result.stdout.split()[-3:]
    if cuda != "True" and not dry_run:
        raise RuntimeError(f"mlx {version} sees no CUDA GPU (device {device}): install it with "
                           f"uv pip install 'mlx[cuda]'")
    return {"mlx": version, "device": device, "cuda": cuda == "True"}


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


STEPS = [("machine", step_machine, 60), ("flex_kernels", step_flex_kernels, 300),
         ("bench_flex", step_bench_flex, None), ("bench_mask", step_bench_mask, None),
         ("mlx", step_mlx, 120), ("mlx_smoke", step_mlx_smoke, 180), ("mlx_run", step_mlx_run, None),
         ("parity", step_parity, 240), ("mlx_windows", step_mlx_windows, 240)]
TAKES_SECONDS = {"bench_mask", "bench_flex", "mlx_run"}


# ---------------------------------------------------------------------------------------------
# Running the steps

def step_timeout(name, dry_run, seconds):
    """A step's timeout: its own, or for a training step twice its budget plus start-up."""
    timeout = next(limit for step, _, limit in STEPS if step == name)
    return timeout or (120 if dry_run else 2 * seconds + 240)


def run_step(name, args, log):
    """Run one step in a subprocess within its timeout; returns its record for the report."""
    timeout = step_timeout(name, args.dry_run, args.seconds)
    with tempfile.TemporaryDirectory() as folder:
        result_file = Path(folder) / "result.json"
        command = [sys.executable, __file__, "--step", name, "--result", str(result_file),
                   "--seconds", str(args.seconds)] + (["--dry-run"] if args.dry_run else [])
        started = time.perf_counter()
        log.write(f"\n===== {name} (timeout {timeout} s) =====\n")
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # MLX compiles its CUDA kernels at run time (NVRTC) against the toolkit's headers.
        if "CUDA_HOME" not in env and Path("/usr/local/cuda/include").is_dir():
            env["CUDA_HOME"] = "/usr/local/cuda"
        # A process group of its own, so that a time-out ends the step's training runs with it.
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
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


def shown(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(out, report):
    """gpu_check.json (the report as it is) and gpu_check.md (one table row per step)."""
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# gpu_check{' (dry run)' if report['dry_run'] else ''}", "",
             f"{report['date']}, commit {report['commit']}, training steps of {report['seconds']} s", "",
             "| step | result | seconds | figures |", "| --- | --- | --- | --- |"]
    for name, record in report["steps"].items():
        result = "ok" if record["ok"] else f"FAILED: {record['error']}"
        figures = "; ".join(f"{key} {shown(value)}" for key, value in record.get("figures", {}).items())
        lines.append(f"| {name} | {result.replace('|', '/')} | {record['seconds']} | {figures.replace('|', '/')} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def git_commit():
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, text=True,
                            capture_output=True)
    return result.stdout.strip() or None


def run_inside_step(args):
    """The body of a step's subprocess: run the step, write its record."""
    function = next(f for name, f, _ in STEPS if name == args.step)
    try:
        extra = (args.seconds,) if args.step in TAKES_SECONDS else ()
        record = {"ok": True, "figures": function(args.dry_run, *extra)}
    except Exception as error:  # noqa: BLE001  (any failure is this step's result)
        import traceback
        traceback.print_exc()
        record = {"ok": False, "error": f"{type(error).__name__}: {str(error).strip()[:300]}"}
    args.result.write_text(json.dumps(record, default=str))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=False,
                        help="folder for gpu_check.json, gpu_check.md and gpu_check.log (created)")
    parser.add_argument("--seconds", type=int, default=DEFAULT_SECONDS,
                        help=f"training budget of each benchmark and MLX run (default {DEFAULT_SECONDS})")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on any device (minutes)")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        return run_inside_step(args)
    if args.out is None:
        parser.error("say where the report goes: --out DIR")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git_commit(),
              "dry_run": args.dry_run, "seconds": args.seconds, "steps": {}}
    with open(args.out / "gpu_check.log", "w") as log:
        for name, _, _ in STEPS:
            report["steps"][name] = run_step(name, args, log)
            write_report(args.out, report)
            record = report["steps"][name]
            print(f"{name}: {'ok' if record['ok'] else 'FAILED: ' + record['error']} ({record['seconds']} s)",
                  flush=True)
    print(f"written: {args.out}/gpu_check.md, gpu_check.json, gpu_check.log")
    return None


if __name__ == "__main__":
    main()
