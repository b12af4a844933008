"""backends/: backend detection, hardware description, peak FLOPS, per-tier defaults, device helpers.

Everything machine-specific is injected (probes, recorded Apple command outputs, fake CUDA
devices), so every branch runs on a 2-core Linux box. Tests that look at the real machine say so in
their name (`this_machine`); the CUDA one is skipped where torch sees no GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import backends
from backends import apple, flops, gpu_specs, hardware, summary, tiers
from backends.hardware import BackendUnavailable, detect_backend

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "apple"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No backend/profile overrides from the caller's shell, and a private cache directory."""
    monkeypatch.delenv("AUTORESEARCH_BACKEND", raising=False)
    monkeypatch.delenv("AUTORESEARCH_PROFILE", raising=False)
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path / "cache"))


def fake_probes(mlx=None, torch=True, cuda=False, mps=False):
    """Probes answering as a machine with exactly these frameworks and devices would."""
    return {"mlx": lambda: mlx, "torch": lambda: torch, "cuda": lambda: cuda, "mps": lambda: mps}


MAC = dict(system="Darwin", machine="arm64")
LINUX = dict(system="Linux", machine="x86_64")


# ---------------------------------------------------------------------------
# detect_backend

@pytest.mark.parametrize("where, probes, expected", [
    (MAC, fake_probes(mlx="metal", mps=True), "mlx"),
    (MAC, fake_probes(mlx=None, mps=True), "mps"),
    (MAC, fake_probes(mlx="cpu", mps=True), "mps"),
    (MAC, fake_probes(mlx=None, mps=False), "cpu"),
    (MAC, fake_probes(mlx="metal", torch=False), "mlx"),
    (LINUX, fake_probes(mlx="cpu", cuda=True), "cuda"),
    (LINUX, fake_probes(mlx="cpu", cuda=False), "cpu"),
    (dict(system="Darwin", machine="x86_64"), fake_probes(mps=False), "cpu"),
])
def test_auto_picks_the_best_usable_backend(where, probes, expected):
    assert detect_backend("auto", probes=probes, **where) == expected


def test_auto_never_picks_mlx_on_linux_and_names_the_fix_without_torch():
    with pytest.raises(BackendUnavailable, match=r"torch is not installed; run `uv sync`, or set AUTORESEARCH_BACKEND=mlx"):
        detect_backend("auto", probes=fake_probes(mlx="cpu", torch=False), **LINUX)


@pytest.mark.parametrize("name, where, probes", [
    ("mlx", MAC, fake_probes(mlx="metal")),
    ("mlx", LINUX, fake_probes(mlx="cpu")),
    ("mps", MAC, fake_probes(mps=True)),
    ("cuda", LINUX, fake_probes(cuda=True)),
    ("cpu", LINUX, fake_probes(cuda=True)),
    ("cpu", MAC, fake_probes(mlx="metal", mps=True)),
])
def test_a_request_that_can_run_is_returned_as_is(name, where, probes):
    assert detect_backend(name, probes=probes, **where) == name


@pytest.mark.parametrize("name, where, probes, message", [
    ("cuda", LINUX, fake_probes(cuda=False),
     "AUTORESEARCH_BACKEND=cuda but torch sees no CUDA device; unset it or set AUTORESEARCH_BACKEND=cpu"),
    ("mps", LINUX, fake_probes(),
     "AUTORESEARCH_BACKEND=mps but torch sees no MPS device (it needs macOS on Apple Silicon); "
     "unset it or set AUTORESEARCH_BACKEND=cpu"),
    ("mlx", LINUX, fake_probes(mlx=None),
     "AUTORESEARCH_BACKEND=mlx but mlx is not installed; run `uv sync` (mlx[cpu] on Linux; MLX has no "
     "build for other systems) or unset AUTORESEARCH_BACKEND"),
    ("mlx", MAC, fake_probes(mlx=None, mps=True),
     "AUTORESEARCH_BACKEND=mlx but mlx is not installed; run `uv sync` or set AUTORESEARCH_BACKEND=mps"),
    ("mlx", MAC, fake_probes(mlx="cpu"),
     "AUTORESEARCH_BACKEND=mlx but MLX sees no Metal GPU (virtual machine?); set AUTORESEARCH_BACKEND=cpu"),
    ("cpu", LINUX, fake_probes(torch=False),
     "AUTORESEARCH_BACKEND=cpu but torch is not installed; run `uv sync`"),
    ("cuda", LINUX, fake_probes(torch=False),
     "AUTORESEARCH_BACKEND=cuda but torch is not installed; run `uv sync`"),
    ("tpu", LINUX, fake_probes(),
     "AUTORESEARCH_BACKEND='tpu' is not a backend; set it to one of auto, mlx, mps, cuda, cpu or unset it"),
])
def test_an_impossible_request_fails_with_one_line_naming_the_fix(name, where, probes, message):
    with pytest.raises(BackendUnavailable) as caught:
        detect_backend(name, probes=probes, **where)
    assert str(caught.value) == message
    assert isinstance(caught.value, RuntimeError)


def test_the_request_comes_from_the_environment_and_ignores_case_and_spaces(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_BACKEND", " CUDA ")
    assert detect_backend(probes=fake_probes(cuda=True), **LINUX) == "cuda"
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "")
    assert detect_backend(probes=fake_probes(cuda=True), **LINUX) == "cuda"


def test_real_probes_pick_a_known_backend_on_this_machine():
    assert detect_backend() in hardware.BACKENDS


# ---------------------------------------------------------------------------
# Apple parsing (recorded command outputs, one per generation and tier)

# slug: chip, generation, tier, GPU cores, memory GB, CPU cores, performance cores
APPLE_CHIPS = {
    "m1": ("Apple M1", "M1", "base", 8, 16, 8, None),
    "m1_pro": ("Apple M1 Pro", "M1", "Pro", 16, 16, 10, 8),
    "m1_max": ("Apple M1 Max", "M1", "Max", 32, 64, 10, 8),
    "m1_ultra": ("Apple M1 Ultra", "M1", "Ultra", 64, 128, 20, 16),
    "m2": ("Apple M2", "M2", "base", 10, 24, 8, 4),
    "m2_pro": ("Apple M2 Pro", "M2", "Pro", 19, 32, 12, 8),
    "m2_max": ("Apple M2 Max", "M2", "Max", 38, 96, 12, 8),
    "m2_ultra": ("Apple M2 Ultra", "M2", "Ultra", 76, 192, 24, 16),
    "m3": ("Apple M3", "M3", "base", 10, 8, 8, 4),
    "m3_pro": ("Apple M3 Pro", "M3", "Pro", 18, 18, 12, 6),
    "m3_max": ("Apple M3 Max", "M3", "Max", 40, 128, 16, 12),
    "m3_ultra": ("Apple M3 Ultra", "M3", "Ultra", 80, 512, 32, 24),
    "m4": ("Apple M4", "M4", "base", 10, 16, 10, 4),
    "m4_pro": ("Apple M4 Pro", "M4", "Pro", 20, 48, 14, 10),
    "m4_max": ("Apple M4 Max", "M4", "Max", 40, 128, 16, 12),
    "m5": ("Apple M5", "M5", "base", 10, 16, 10, 4),
    "m7_max_hypothetical": ("Apple M7 Max", "M7", "Max", 60, 256, 20, 14),
}


def apple_fixture(slug):
    """parse_apple_info() of a recorded sysctl + system_profiler pair."""
    return apple.parse_apple_info((FIXTURES / f"{slug}.sysctl.txt").read_text(),
                                  (FIXTURES / f"{slug}.system_profiler.txt").read_text())


def apple_info(slug):
    """A full hardware-info dict for a Mac with this recorded chip (as get_hardware_info builds it)."""
    return hardware.read_hardware_info(**MAC, apple_reader=lambda: apple_fixture(slug),
                                       cuda_reader=lambda: None)


def test_every_fixture_has_an_expected_row():
    slugs = {p.name.split(".")[0] for p in FIXTURES.glob("*.sysctl.txt")}
    assert slugs == set(APPLE_CHIPS)


@pytest.mark.parametrize("slug", sorted(APPLE_CHIPS))
def test_apple_outputs_parse_to_chip_generation_tier_cores_and_memory(slug):
    chip, generation, tier, gpu_cores, memory_gb, cpu_cores, perf_cores = APPLE_CHIPS[slug]
    parsed = apple_fixture(slug)
    assert (parsed["chip"], parsed["generation"], parsed["tier"]) == (chip, generation, tier)
    assert parsed["gpu_cores"] == gpu_cores
    assert parsed["memory_gb"] == memory_gb
    assert parsed["cpu_cores"] == cpu_cores
    assert parsed["perf_cores"] == perf_cores


@pytest.mark.parametrize("brand, expected", [
    ("Apple M9 Extreme", ("M9", "Extreme")),
    ("Apple M2 (Virtual)", ("M2", "base")),
    ("Apple M10 Ultra", ("M10", "Ultra")),
    ("Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz", (None, None)),
    ("", (None, None)),
])
def test_chip_names_beyond_the_fixtures_parse_gracefully(brand, expected):
    assert apple.parse_chip_name(brand) == expected


def test_missing_apple_outputs_give_none_instead_of_failing():
    parsed = apple.parse_apple_info("", "")
    assert all(value is None for value in parsed.values())


def test_apple_info_overrides_host_values_with_the_macs_own():
    info = apple_info("m4_max")
    assert (info["os"], info["arch"], info["kind"]) == ("Darwin", "arm64", "apple")
    assert (info["chip"], info["cpu_model"], info["generation"], info["tier"]) == (
        "Apple M4 Max", "Apple M4 Max", "M4", "Max")
    assert (info["gpu_cores"], info["memory_gb"], info["cpu_cores"]) == (40, 128, 16)


# ---------------------------------------------------------------------------
# NVIDIA and Linux CPU description

H100_DEVICE = {"name": "NVIDIA H100 80GB HBM3", "sm_count": 132, "memory_bytes": 85_045_870_592,
               "capability": (9, 0), "count": 8}


def test_a_cuda_machine_is_described_by_its_gpu():
    info = hardware.read_hardware_info(**LINUX, cuda_reader=lambda: H100_DEVICE)
    assert info["kind"] == "nvidia"
    assert (info["chip"], info["gpu_name"], info["generation"]) == (
        "NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "Hopper")
    assert (info["sm_count"], info["gpu_count"]) == (132, 8)
    assert info["gpu_memory_gb"] == pytest.approx(79.2, abs=0.05)
    assert info["cpu_cores"] >= 1 and info["memory_gb"] > 0


def test_a_machine_without_cuda_is_described_by_its_cpu():
    info = hardware.read_hardware_info(**LINUX, cuda_reader=lambda: None)
    assert info["kind"] == "cpu"
    assert info["chip"] == info["cpu_model"]
    assert info["generation"] is None and info["gpu_cores"] is None
    assert 1 <= info["cpu_cores"] <= info["cpu_threads"]


@pytest.mark.parametrize("capability, name", [
    ((7, 0), "Volta"), ((7, 5), "Turing"), ((8, 0), "Ampere"), ((8, 6), "Ampere"), ((8, 9), "Ada"),
    ((9, 0), "Hopper"), ((10, 0), "Blackwell"), ((12, 0), "Blackwell"), ((15, 2), "sm_152"),
])
def test_compute_capability_names_the_architecture(capability, name):
    assert hardware.nvidia_architecture(*capability) == name


def test_cpuinfo_model_name_is_read_and_missing_on_arm():
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n"
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"
    assert hardware.parse_cpuinfo_model(x86) == "AMD EPYC 7B13 64-Core Processor"
    assert hardware.parse_cpuinfo_model(arm) is None


def test_hardware_info_of_this_machine_has_every_contract_key_and_is_read_once():
    info = backends.get_hardware_info()
    for key in ("os", "arch", "kind", "chip", "generation", "tier", "gpu_cores", "memory_gb", "cpu_cores"):
        assert key in info
    assert info["kind"] in ("apple", "nvidia", "cpu")
    info["chip"] = "changed by a caller"
    reads = hardware._cached_hardware_info.cache_info().misses
    assert backends.get_hardware_info()["chip"] != "changed by a caller"
    assert hardware._cached_hardware_info.cache_info().misses == reads


# ---------------------------------------------------------------------------
# peak_flops

@pytest.mark.parametrize("slug, tflops", [
    ("m1", 2.6), ("m1_max", 10.4), ("m2", 3.58), ("m2_max", 13.6), ("m3_max", 14.12),
    ("m4", 3.76), ("m4_max", 15.04), ("m5", 15.05),
])
def test_apple_peak_is_gpu_cores_times_the_generations_per_core_rate(slug, tflops):
    for dtype in ("bf16", "fp32"):  # M1-M4 run both at the same rate
        assert backends.peak_flops(apple_info(slug), "mlx", dtype=dtype) == pytest.approx(tflops * 1e12, rel=0.01)
        assert backends.peak_flops(apple_info(slug), "mps", dtype=dtype) == pytest.approx(tflops * 1e12, rel=0.01)


def test_a_future_apple_generation_uses_the_newest_per_core_rate_and_says_so():
    value, how = backends.peak_flops_and_source(apple_info("m7_max_hypothetical"), "mlx", dtype="bf16")
    assert value == pytest.approx(60 * gpu_specs.APPLE_FLOPS_PER_GPU_CORE["M5"])
    assert "M7 is not" in how


def test_an_unknown_apple_core_count_assumes_the_tiers_common_configuration():
    info = {**apple_info("m2_pro"), "gpu_cores": None}
    value, how = backends.peak_flops_and_source(info, "mlx", dtype="bf16")
    assert value == pytest.approx(16 * gpu_specs.APPLE_FLOPS_PER_GPU_CORE["M2"])
    assert how.startswith("estimated:")


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989), ("NVIDIA B200", 2250),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A10", 125),
    ("NVIDIA L4", 121), ("NVIDIA L40", 181), ("NVIDIA L40S", 362), ("NVIDIA A40", 149.7),
    ("NVIDIA GeForce RTX 3090", 71), ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 5090", 209.5), ("Tesla V100-SXM2-16GB", 125), ("Tesla T4", 65),
    ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 3090 Ti", None), ("NVIDIA GeForce RTX 4090 D", None),
    ("NVIDIA RTX A2000", None),
])
def test_nvidia_table_matches_torch_device_names(name, tflops):
    expected = None if tflops is None else pytest.approx(tflops * 1e12)
    assert gpu_specs.nvidia_gpu_flops(name) == expected


def fake_measurement(calls, bf16=2e12, fp32=1e12):
    """A stand-in for measure_matmul_flops that records its calls."""
    def measure(library, device_name, *, device="cpu", sizes=None, cache_root=None, recalibrate=False):
        calls.append((library, device_name, device))
        return {"bf16": bf16, "fp32": fp32, "bf16_size": 2048, "fp32_size": 2048, "threads": 2,
                "library": f"{library} 0.0", "measurements": 1, "cached": False}
    return measure


def test_a_known_gpu_comes_from_the_table_without_measuring(monkeypatch):
    calls = []
    monkeypatch.setattr(flops, "measure_matmul_flops", fake_measurement(calls))
    info = hardware.read_hardware_info(**LINUX, cuda_reader=lambda: H100_DEVICE)
    value, how = backends.peak_flops_and_source(info, "cuda")
    assert value == 989e12 and how.startswith("table:")
    assert calls == []


def test_an_unknown_gpu_is_measured_on_the_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(flops, "measure_matmul_flops", fake_measurement(calls))
    device = {**H100_DEVICE, "name": "NVIDIA X999"}
    info = hardware.read_hardware_info(**LINUX, cuda_reader=lambda: device)
    value, how = backends.peak_flops_and_source(info, "cuda")
    assert calls == [("torch", "NVIDIA X999", "cuda")]
    assert value == 2e12 and how.startswith("measured:")


@pytest.mark.parametrize("backend, library", [("cpu", "torch"), ("mlx", "mlx")])
def test_cpu_backends_measure_with_their_own_library(monkeypatch, backend, library):
    calls = []
    monkeypatch.setattr(flops, "measure_matmul_flops", fake_measurement(calls))
    info = hardware.read_hardware_info(**LINUX, cuda_reader=lambda: None)
    assert backends.peak_flops(info, backend, dtype="bf16") == 2e12
    assert calls == [(library, info["cpu_model"], "cpu")]


def test_a_cpu_without_fast_bf16_reports_its_fp32_peak(monkeypatch):
    monkeypatch.setattr(flops, "measure_matmul_flops", fake_measurement([], bf16=0.05e12, fp32=0.2e12))
    info = hardware.read_hardware_info(**LINUX, cuda_reader=lambda: None)
    assert backends.peak_flops(info, "cpu") == 0.2e12


# ---------------------------------------------------------------------------
# compute dtype and threads

@pytest.mark.parametrize("bf16, fp32, dtype", [
    (1.5e12, 0.38e12, "bf16"),   # AVX-512 bf16 / AMX: ~4x fp32
    (0.003e12, 0.05e12, "fp32"),  # AVX2 only: bf16 emulated, 17x slower
    (0.45e12, 0.40e12, "fp32"),   # bf16 12% faster: less than BF16_MIN_SPEEDUP, not worth it
])
@pytest.mark.parametrize("backend", ["cpu", "mlx"])
def test_a_cpu_trains_in_the_dtype_its_calibration_measured_faster(monkeypatch, backend, bf16, fp32, dtype):
    calls = []
    monkeypatch.setattr(flops, "measure_matmul_flops", fake_measurement(calls, bf16=bf16, fp32=fp32))
    info = hardware.read_hardware_info(**LINUX, cuda_reader=lambda: None)
    precision = backends.choose_compute_dtype(info, backend)
    assert (precision["dtype"], precision["bf16"], precision["fp32"]) == (dtype, bf16, fp32)
    assert f"bf16 {bf16 / 1e12:.3f} / fp32 {fp32 / 1e12:.3f} TFLOP/s" in precision["how"]
    value, how = backends.peak_flops_and_source(info, backend, dtype=dtype)
    assert value == {"bf16": bf16, "fp32": fp32}[dtype] and f" {dtype} matmul " in how
    assert calls[0][0] == ("mlx" if backend == "mlx" else "torch")


@pytest.mark.parametrize("name, capability, dtype", [
    ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16"), ("NVIDIA GeForce RTX 4090", (8, 9), "bf16"),
    ("Tesla V100-SXM2-16GB", (7, 0), "fp32"), ("Tesla T4", (7, 5), "fp32"),
])
def test_a_gpu_trains_in_bf16_only_from_sm80_and_its_fp32_peak_is_measured(monkeypatch, name, capability, dtype):
    calls = []
    monkeypatch.setattr(flops, "measure_matmul_flops", fake_measurement(calls, bf16=9e12, fp32=14e12))
    device = {**H100_DEVICE, "name": name, "capability": capability}
    info = hardware.read_hardware_info(**LINUX, cuda_reader=lambda: device)
    precision = backends.choose_compute_dtype(info, "cuda")
    assert precision["dtype"] == dtype and f"compute capability {capability[0]}.{capability[1]}" in precision["how"]
    assert calls == []  # the capability decides; nothing is timed
    if dtype == "bf16":
        assert backends.peak_flops(info, "cuda", dtype="bf16") == gpu_specs.nvidia_gpu_flops(name)
    # fp32 has no table: it is measured on the GPU (torch), whatever the GPU.
    assert backends.peak_flops(info, "cuda", dtype="fp32") == 14e12
    assert calls == [("torch", name, "cuda")]


@pytest.mark.parametrize("bf16, dtype", [(2.6e12, "bf16"), (0.9e12, "fp32")])  # a tie keeps bf16
@pytest.mark.parametrize("backend", ["mlx", "mps"])
def test_an_apple_gpu_times_both_dtypes_at_the_default_models_shape(monkeypatch, backend, bf16, dtype):
    calls = []

    def fake_timing(library, device, shape):
        calls.append((library, device, shape))
        return {"bf16": bf16, "fp32": 2.6e12}
    monkeypatch.setattr(flops, "time_dtypes_at_shape", fake_timing)
    info = apple_info("m1")
    precision = backends.choose_compute_dtype(info, backend)
    assert precision["dtype"] == dtype
    # The base tier: 8 rows of 2048 tokens through depth 4 x 64 = 256 channels and the MLP's 1024.
    assert calls == [("mlx" if backend == "mlx" else "torch", backend, (8 * 2048, 256, 1024))]
    assert backends.peak_flops(info, backend, dtype=dtype) == pytest.approx(2.6e12)  # the table


def test_a_timed_matmul_at_a_shape_rates_both_dtypes():
    rates = flops.time_dtypes_at_shape("torch", "cpu", (64, 32, 48))
    assert sorted(rates) == ["bf16", "fp32"] and all(rate > 0 for rate in rates.values())


def test_an_unknown_compute_dtype_is_refused_with_the_choices():
    info = hardware.read_hardware_info(**LINUX, cuda_reader=lambda: None)
    with pytest.raises(ValueError, match="'fp16' is not one of bf16, fp32"):
        backends.peak_flops(info, "cpu", dtype="fp16")


@pytest.mark.parametrize("rates, threads", [
    ({1: 3e9, 2: 2e9}, 1), ({1: 3e9, 2: 2.4e9}, 1),  # one thread 1.5x, 1.25x faster: it trains
    ({1: 3e9, 2: 2.6e9}, 2),                         # 1.15x: within the probe's noise, all cores
    ({1: 3e9, 2: 5e9}, 2), ({1: 3e9, 2: 3e9}, 2), ({1: 3e9}, 1),  # a one-core machine
])
def test_one_thread_trains_only_where_it_multiplies_the_models_matrices_faster(monkeypatch, rates, threads):
    shapes = []

    def fake_rates(shape, dtype):
        shapes.append((shape, dtype))
        return rates
    monkeypatch.setattr(flops, "_thread_rates", fake_rates)
    assert backends.fastest_cpu_threads(2 * 128, 64, "fp32") == threads
    assert backends.fastest_cpu_threads(32 * 512, 256, "bf16") == threads
    # The probe keeps the model's width but at most THREAD_PROBE_ROWS rows.
    assert shapes == [((256, 64, 256), "fp32"), ((flops.THREAD_PROBE_ROWS, 256, 1024), "bf16")]


def test_the_thread_probe_times_one_and_all_threads_and_leaves_the_count_and_the_rng_as_they_were():
    import torch
    before = torch.get_num_threads()
    torch.manual_seed(42)
    expected = torch.rand(4)
    torch.manual_seed(42)
    rates = flops._thread_rates((64, 32, 128), "fp32")
    assert sorted(rates) == sorted({1, before}) and all(rate > 0 for rate in rates.values())
    assert torch.get_num_threads() == before
    assert torch.equal(torch.rand(4), expected)  # a seeded run draws the same weights after a probe


def test_a_busy_spell_during_one_round_of_the_thread_probe_does_not_take_a_thread_away(monkeypatch):
    import torch
    if torch.get_num_threads() < 2:
        pytest.skip("needs at least two CPU threads")
    # Rounds of (one thread, all threads): another process held a core during the first round's
    # all-thread timings, so that round alone would pick one thread.
    timed = iter([3e9, 1e9, 3e9, 5e9, 2.9e9, 4.8e9])
    monkeypatch.setattr(flops, "_timed_rate", lambda product, flop, repeats=flops.REPEATS: next(timed))
    rates = flops._thread_rates((64, 32, 128), "fp32")
    assert rates == {1: 3e9, torch.get_num_threads(): 5e9}
    monkeypatch.setattr(flops, "_thread_rates", lambda shape, dtype: rates)
    assert backends.fastest_cpu_threads(2 * 128, 64, "fp32") == torch.get_num_threads()


def test_peak_flops_rejects_unknown_backends_and_mps_off_a_mac():
    info = hardware.read_hardware_info(**LINUX, cuda_reader=lambda: None)
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        backends.peak_flops(info, "tpu")
    with pytest.raises(ValueError, match="needs an Apple Silicon Mac"):
        backends.peak_flops(info, "mps")


def timed_matmul_rate(monkeypatch, seconds_per_n):
    """_matmul_rate over the sizes of seconds_per_n, with each n x n product taking that long."""
    monkeypatch.setattr(flops, "_seconds", lambda product: seconds_per_n[product.n])

    def make_product(n):
        product = lambda: None  # noqa: E731
        product.n = n
        return product
    return flops._matmul_rate(make_product, tuple(seconds_per_n))


def test_matrix_growth_stops_before_a_product_would_take_too_long(monkeypatch):
    rate, n = timed_matmul_rate(monkeypatch, {256: 0.001, 512: 0.008, 1024: 0.064, 2048: 0.512})
    assert n == 1024  # 8 x 0.064 s > MAX_PRODUCT_S: 2048 would take half a second a product
    assert rate == pytest.approx(2 * 1024**3 / 0.064)


def test_the_peak_is_the_best_rate_over_the_sizes_not_the_largest_sizes(monkeypatch):
    # 1024 is the fastest size; 2048 is still timed (8 x 0.016 s is within MAX_PRODUCT_S).
    rate, n = timed_matmul_rate(monkeypatch, {256: 0.001, 512: 0.004, 1024: 0.016, 2048: 0.150})
    assert (rate, n) == (pytest.approx(2 * 1024**3 / 0.016), 1024)


@pytest.mark.parametrize("library", ["torch", "mlx"])
def test_calibration_on_this_machine_measures_once_then_reads_the_cache(library, tmp_path):
    first = flops.measure_matmul_flops(library, "test cpu", sizes=(32, 64), cache_root=tmp_path)
    assert first["bf16"] > 0 and first["fp32"] > 0 and first["cached"] is False
    assert first["bf16_size"] in (32, 64)
    second = flops.measure_matmul_flops(library, "test cpu", sizes=(32, 64), cache_root=tmp_path)
    assert second["cached"] is True
    assert (second["bf16"], second["fp32"]) == (first["bf16"], first["fp32"])
    assert (tmp_path / "calibration.json").exists()


def test_a_corrupt_calibration_cache_is_measured_again_and_forgotten_on_request(tmp_path):
    (tmp_path / "calibration.json").write_text("{not json")
    record = flops.measure_matmul_flops("torch", "test cpu", sizes=(32,), cache_root=tmp_path)
    assert record["cached"] is False
    assert flops.forget_calibration(tmp_path) is True
    assert not (tmp_path / "calibration.json").exists()
    assert flops.forget_calibration(tmp_path) is False


def test_the_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path))
    assert flops.cache_dir() == tmp_path
    monkeypatch.delenv("AUTORESEARCH_CACHE_DIR")
    assert flops.cache_dir() == Path.home() / ".cache" / "autoresearch"


# ---------------------------------------------------------------------------
# suggest_hyperparameters / eval_tokens

def nvidia_info(name, memory_gb, capability=(8, 0)):
    device = {"name": name, "sm_count": 100, "memory_bytes": memory_gb * 2**30,
              "capability": capability, "count": 1}
    return hardware.read_hardware_info(**LINUX, cuda_reader=lambda: device)


CPU_INFO = hardware.read_hardware_info(**LINUX, cuda_reader=lambda: None)


def test_the_smoke_profile_is_tiny_whatever_the_hardware(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "Smoke")
    for info, backend in ((apple_info("m2_ultra"), "mlx"), (nvidia_info("NVIDIA H100 PCIe", 80), "cuda"),
                          (CPU_INFO, "cpu")):
        config = backends.suggest_hyperparameters(info, backend)
        assert config == {"tier": "smoke", "depth": 2, "aspect_ratio": 32, "head_dim": 32, "seq_len": 128,
                          "window_pattern": "SL", "device_batch_size": 2, "total_batch_size": 512,
                          "eval_tokens": 4 * 2048, "eval_batch_size": 2}
        assert config["depth"] * config["aspect_ratio"] == 64  # model dim 64
        assert backends.eval_tokens(info, backend) == 4 * 2048


def test_an_unknown_profile_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "fast")
    with pytest.raises(ValueError, match="AUTORESEARCH_PROFILE='fast' is not a profile; set it to smoke or standard"):
        backends.suggest_hyperparameters(CPU_INFO, "cpu")


@pytest.mark.parametrize("slug, tier, device_batch", [
    ("m1", "apple-base", 8), ("m3", "apple-base", 4), ("m2_pro", "apple-pro", 8),
    ("m4_max", "apple-max", 8), ("m1_ultra", "apple-ultra", 16), ("m7_max_hypothetical", "apple-max", 8),
])
def test_apple_tiers_follow_the_chip_tier_and_small_memory_halves_batches(slug, tier, device_batch):
    config = backends.suggest_hyperparameters(apple_info(slug), "mlx")
    assert config["tier"] == tier and config["device_batch_size"] == device_batch
    assert config["depth"] == 4  # every published Apple run converged on DEPTH=4
    assert backends.suggest_hyperparameters(apple_info(slug), "mps") == config


def test_the_m4_max_gets_the_published_overnight_winner_and_mlx_port_eval_budget():
    config = backends.suggest_hyperparameters(apple_info("m4_max"), "mlx")
    assert (config["depth"], config["total_batch_size"], config["eval_tokens"]) == (4, 2**14, 1_572_864)


@pytest.mark.parametrize("tier_word, gpu_cores, expected", [
    ("Extreme", 120, "apple-ultra"), ("Studio", 36, "apple-max"), ("Plus", 16, "apple-pro"), (None, None, "apple-base"),
])
def test_an_unknown_apple_tier_word_is_placed_by_gpu_cores(tier_word, gpu_cores, expected):
    info = {**apple_info("m5"), "tier": tier_word, "gpu_cores": gpu_cores}
    assert backends.suggest_hyperparameters(info, "mlx")["tier"] == expected


@pytest.mark.parametrize("name, memory_gb, capability, tier, device_batch", [
    ("NVIDIA H100 80GB HBM3", 80, (9, 0), "nvidia-h100", 128),
    ("NVIDIA H200", 141, (9, 0), "nvidia-h100", 128),
    ("NVIDIA Z300", 192, (10, 0), "nvidia-h100", 128),
    ("NVIDIA A100-SXM4-80GB", 80, (8, 0), "nvidia", 32),
    ("NVIDIA GeForce RTX 5090", 32, (12, 0), "nvidia", 32),
    ("Tesla T4", 15, (7, 5), "nvidia", 16),
])
def test_nvidia_tiers_split_h100_class_from_smaller_gpus(name, memory_gb, capability, tier, device_batch):
    config = backends.suggest_hyperparameters(nvidia_info(name, memory_gb, capability), "cuda")
    assert config["tier"] == tier and config["device_batch_size"] == device_batch


def test_the_h100_tier_is_upstream_autoresearch_defaults():
    config = backends.suggest_hyperparameters(nvidia_info("NVIDIA H100 80GB HBM3", 80, (9, 0)), "cuda")
    assert (config["depth"], config["aspect_ratio"], config["head_dim"], config["window_pattern"]) == (8, 64, 128, "SSSL")
    assert (config["total_batch_size"], config["device_batch_size"]) == (2**19, 128)
    assert config["eval_tokens"] == 20_971_520


@pytest.mark.parametrize("info, backend", [
    (CPU_INFO, "cpu"), (CPU_INFO, "mlx"), (apple_info("m4"), "cpu"),
    (hardware.read_hardware_info(**LINUX, cuda_reader=lambda: H100_DEVICE), "cpu"),
])
def test_cpu_training_gets_the_cpu_tier_with_a_small_eval_budget(info, backend):
    config = backends.suggest_hyperparameters(info, backend)
    assert config == tiers.CPU_TIER
    assert config["eval_tokens"] == 32 * 2048


@pytest.mark.parametrize("flops, size", [
    (0.05e12, (2, 96, 16, 2**13)), (0.195e12, (2, 96, 16, 2**13)),  # fp32: AVX2, one AVX-512 core
    (0.38e12, (2, 96, 16, 2**13)), (0.75e12, (2, 96, 16, 2**13)),   # fp32: two AVX-512 cores
    (0.76e12, (2, 96, 32, 2**14)), (1.5e12, (2, 96, 32, 2**14)), (20e12, (2, 96, 32, 2**14)),  # bf16, AMX
])
@pytest.mark.parametrize("backend", ["cpu", "mlx"])
def test_the_cpu_tier_is_sized_by_the_measured_peak_of_its_dtype(flops, size, backend):
    config = backends.suggest_hyperparameters(CPU_INFO, backend, flops=flops)
    sized = ("depth", "aspect_ratio", "device_batch_size", "total_batch_size")
    assert config["tier"] == "cpu" and tuple(config[key] for key in sized) == size
    assert {k: v for k, v in config.items() if k not in sized} == {
        k: v for k, v in tiers.CPU_TIER.items() if k not in sized}
    assert backends.eval_tokens(CPU_INFO, backend) == 32 * 2048  # evaluation does not follow the peak


def test_the_measured_peak_sizes_only_the_cpu_tier():
    h100 = nvidia_info("NVIDIA H100 80GB HBM3", 80, (9, 0))
    assert backends.suggest_hyperparameters(h100, "cuda", flops=0.1e12) == tiers.NVIDIA_H100
    assert backends.suggest_hyperparameters(apple_info("m4_max"), "mlx", flops=0.1e12) == tiers.APPLE_TIERS["Max"]


def test_the_backend_defaults_to_detection(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "cpu")
    assert backends.suggest_hyperparameters(apple_info("m4_max"))["tier"] == "cpu"
    assert backends.eval_tokens(apple_info("m4_max")) == 32 * 2048


ALL_CONFIGS = ([tiers.SMOKE, tiers.NVIDIA_H100, tiers.NVIDIA_SMALL, tiers.CPU_TIER]
               + [tiers.cpu_tier(threshold) for threshold, _ in tiers.CPU_TIER_BY_FLOPS]
               + list(tiers.APPLE_TIERS.values())
               + [tiers._halve_batches(c) for c in (tiers.NVIDIA_SMALL, *tiers.APPLE_TIERS.values())])


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: c["tier"])
def test_every_tier_has_the_contract_keys_and_divides_evenly(config):
    assert tuple(config) == tiers.KEYS
    assert config["eval_tokens"] % 2048 == 0
    assert (config["eval_tokens"] // 2048) % config["eval_batch_size"] == 0
    assert config["total_batch_size"] % (config["device_batch_size"] * config["seq_len"]) == 0
    assert (config["depth"] * config["aspect_ratio"]) % config["head_dim"] == 0
    assert config["window_pattern"] and set(config["window_pattern"]) <= {"S", "L"}


# ---------------------------------------------------------------------------
# sync and peak_memory_mb

def test_sync_runs_on_cpu_and_mlx_and_rejects_unknown_backends():
    backends.sync("cpu")
    backends.sync("mlx")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        backends.sync("gpu")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        backends.peak_memory_mb("gpu")


def test_max_rss_is_kib_on_linux_and_bytes_on_macos():
    assert hardware.max_rss_mb(2048, "Linux") == 2.0
    assert hardware.max_rss_mb(2 * 2**20, "Darwin") == 2.0


def test_cpu_peak_memory_rises_after_a_big_allocation():
    # Linux carries the parent's resident size into a child's ru_maxrss, so the child allocates
    # 256 MiB more than the gap between that inherited peak and what it really uses.
    code = ("import numpy as np, psutil, backends\n"
            "before = backends.peak_memory_mb('cpu')\n"
            "current = psutil.Process().memory_info().rss / 2**20\n"
            "block = np.ones(int(before - current + 256) * 2**20 // 8)\n"  # written, so resident
            "print(before, backends.peak_memory_mb('cpu'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split())
    assert after - before > 200


def test_mlx_peak_memory_rises_after_a_big_allocation():
    import mlx.core as mx
    mx.reset_peak_memory()
    before = backends.peak_memory_mb("mlx")
    block = mx.ones((64 * 2**20,), dtype=mx.float32)  # 256 MiB
    mx.eval(block)
    assert backends.peak_memory_mb("mlx") - before >= 255
    del block


def test_mps_peak_is_the_largest_allocation_seen_at_any_sync(monkeypatch):
    import torch
    samples = iter([100 * 2**20, 300 * 2**20, 50 * 2**20])
    monkeypatch.setattr(hardware, "_mps_peak_bytes", 0)
    monkeypatch.setattr(torch.mps, "synchronize", lambda: None)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: next(samples))
    backends.sync("mps")
    backends.sync("mps")
    assert backends.peak_memory_mb("mps") == 300.0  # the third sample (50 MiB) is lower


def test_cuda_helpers_call_torch_cuda(monkeypatch):
    import torch
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synced.append(True))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 1536 * 2**20)
    backends.sync("cuda")
    assert synced == [True]
    assert backends.peak_memory_mb("cuda") == 1536.0


def test_cuda_peak_memory_rises_on_this_machines_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    before = backends.peak_memory_mb("cuda")
    block = torch.ones(64 * 2**20, device="cuda")  # 256 MiB
    backends.sync("cuda")
    assert backends.peak_memory_mb("cuda") - before >= 255
    del block


# ---------------------------------------------------------------------------
# Import hygiene and the summary

def test_importing_backends_imports_neither_torch_nor_mlx():
    code = "import sys, backends; print('torch' in sys.modules, any(m.startswith('mlx') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_hardware_lines_describe_apple_and_nvidia_machines():
    mac = summary.hardware_lines(apple_info("m4_max"))
    assert mac[0] == "os:      Darwin arm64"
    assert mac[1] == "chip:    Apple M4 Max (apple; generation M4, tier Max)"
    assert mac[2] == "cores:   16 CPU (12 performance + 4 efficiency), 40 GPU"
    assert mac[3] == "memory:  128.0 GB unified"
    gpu = summary.hardware_lines(hardware.read_hardware_info(**LINUX, cuda_reader=lambda: H100_DEVICE))
    assert gpu[1] == "chip:    NVIDIA H100 80GB HBM3 (nvidia; generation Hopper, tier -)"
    assert gpu[2].endswith("8 x GPU of 132 SMs and 79.2 GB")


def test_backend_lines_show_backend_peak_source_and_configuration():
    lines = summary.backend_lines("mlx", None, 15.04e12, "table: 40 GPU cores", tiers.APPLE_TIERS["Max"], "standard")
    assert lines == [
        "backend: mlx (AUTORESEARCH_BACKEND=auto)",
        "peak:    15.0 TFLOP/s, table: 40 GPU cores",
        "config:  apple-max (standard): depth 4, aspect_ratio 64, head_dim 128, window SSSL, batch 8 x 2048 "
        "of 16,384 tokens/step, eval 1,572,864 tokens in batches of 16",
    ]


def test_print_summary_on_this_machine_prints_eight_lines(monkeypatch, capsys):
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "cpu")
    monkeypatch.setattr(flops, "measure_matmul_flops", fake_measurement([], bf16=0.1e12, fp32=0.4e12))
    backends.print_summary()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["os", "chip", "cores", "memory", "backend", "dtype",
                                                       "peak", "config"]
    assert lines[4] == "backend: cpu (AUTORESEARCH_BACKEND=cpu)"
    assert lines[5] == "dtype:   fp32 (calibration on 2 CPU threads, bf16 0.100 / fp32 0.400 TFLOP/s)"
    assert lines[6].startswith("peak:    0.400 TFLOP/s, measured: torch 0.0 2048x2048 fp32 matmul on 2 CPU threads")


def test_python_m_backends_ends_a_bad_request_with_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "AUTORESEARCH_BACKEND": "tpu", "AUTORESEARCH_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "backends"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr == ("error: AUTORESEARCH_BACKEND='tpu' is not a backend; set it to one of auto, mlx, "
                          "mps, cuda, cpu or unset it\n")
    assert out.stdout.startswith("os:")


PAGE_FAULTS_OF_REALLOCATION = (
    "import ctypes, resource, sys, backends\n"
    "applied = backends.keep_freed_memory() if sys.argv[1] == 'keep' else None\n"
    "libc = ctypes.CDLL('libc.so.6')\n"
    "libc.malloc.restype = ctypes.c_void_p\n"
    "libc.free.argtypes = [ctypes.c_void_p]\n"
    "def use_and_free_a_block():\n"
    "    block = libc.malloc(128 * 2**20)\n"
    "    ctypes.memset(block, 1, 128 * 2**20)\n"
    "    libc.free(block)\n"
    "use_and_free_a_block()\n"
    "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "for _ in range(4):\n"
    "    use_and_free_a_block()\n"
    "print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc is Linux-only")
def test_kept_freed_memory_is_reused_without_page_faults_on_linux():
    def page_faults(mode):
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_REALLOCATION, mode], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True)
        applied, faults = out.stdout.split()
        return applied, int(faults)
    default_applied, default_faults = page_faults("default")
    kept_applied, kept_faults = page_faults("keep")
    # By default each 128 MiB block is a fresh mmap, faulted in again page by page (64 faults
    # even with 2 MiB transparent huge pages, 32,768 with 4 KiB pages); kept, it is reused.
    assert default_faults >= 4 * 64
    assert kept_applied == "True" and kept_faults < 64


def test_freed_memory_is_left_alone_off_linux():
    assert hardware.keep_freed_memory(system="Darwin") is False


def test_importing_backends_silences_only_torchs_no_cuda_runtime_notice():
    # torch.utils.cpp_extension logs the notice where a CUDA toolkit is installed without a GPU,
    # each time inductor compiles on the CPU; any other warning of that logger still shows.
    code = ("import logging, backends\n"
            "log = logging.getLogger('torch.utils.cpp_extension')\n"
            "log.warning(\"No CUDA runtime is found, using CUDA_HOME='/usr/local/cuda'\")\n"
            "log.warning('another warning')\n"
            "import torch.utils.cpp_extension\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "No CUDA runtime" not in done.stderr
    assert "another warning" in done.stderr
