"""backends/machine_speed.py: the fixed probe of the machine's speed and the run's record of it.
Rates are checked on a fake clock (no timing is judged here), and the real probe for its keys."""

import math

import pytest

from backends import machine_speed


class FakeClock:
    """perf_counter that moves only when the fake work says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def work(self, seconds):
        def step(*args):
            self.now += seconds
        return step


def test_rates_are_fixed_work_over_the_median_timing(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(machine_speed.time, "perf_counter", clock)
    calls = {"matmul": 0}

    def matmul():
        calls["matmul"] += 1
        clock.now += 0.01

    gflops, gb_per_s = machine_speed._rates(matmul, clock.work(0.002), lambda: None, 512, 32 * 2 ** 20)
    # one warm-up product, then PROBE_REPEATS timings of MATMULS_PER_TIMING products each
    assert calls["matmul"] == 1 + machine_speed.PROBE_REPEATS * machine_speed.MATMULS_PER_TIMING
    assert gflops == pytest.approx(2 * 512 ** 3 * 4 / 0.04 / 1e9)
    # each timing: COPIES_PER_TIMING copies, each reading and writing 32 MiB in 2 ms
    assert gb_per_s == pytest.approx(2 * 32 * 2 ** 20 / 0.002 / 1e9)


def test_a_slow_outlier_timing_does_not_move_the_median(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(machine_speed.time, "perf_counter", clock)
    copies = machine_speed.COPIES_PER_TIMING
    interrupted = machine_speed.PROBE_REPEATS // 2  # one timing's copies take 500 times longer
    durations = iter([0.001] + [0.5 if timing == interrupted else 0.001
                                for timing in range(machine_speed.PROBE_REPEATS) for _ in range(copies)])

    def copy():
        clock.now += next(durations)

    _, gb_per_s = machine_speed._rates(clock.work(0.01), copy, lambda: None, 512, 10 ** 9)
    assert gb_per_s == pytest.approx(2.0 / 0.001)
    assert next(durations, None) is None  # the warm-up and every timed copy ran


def test_speed_index_is_the_geometric_mean_of_compute_and_memory():
    assert machine_speed.speed_index(100.0, 25.0) == pytest.approx(50.0)
    assert machine_speed.speed_index(90.0, 25.0) / 50.0 == pytest.approx(math.sqrt(0.9))


def test_summary_is_the_geometric_mean_of_each_rate_and_the_move_from_first_to_last_probe():
    probes = [{"speed_index": 40.0, "matmul_gflops": 80.0, "memory_gb_per_s": 20.0, "probe_seconds": 0.1},
              None,  # a probe that failed is left out
              {"speed_index": 44.1, "matmul_gflops": 90.0, "memory_gb_per_s": 21.6, "probe_seconds": 0.12}]
    record = machine_speed.summarize(probes)
    assert record["machine_speed"] == pytest.approx(42.0, abs=1e-4)
    assert record["machine_speed_change"] == pytest.approx(0.1025)
    assert record["machine_speed_probes"] == [40.0, 44.1]
    assert record["probe_matmul_gflops"] == pytest.approx(math.sqrt(80.0 * 90.0), abs=1e-3)
    assert record["probe_memory_gb_per_s"] == pytest.approx(math.sqrt(20.0 * 21.6), abs=1e-3)
    assert record["probe_matmul_series"] == [80.0, 90.0] and record["probe_memory_series"] == [20.0, 21.6]
    assert record["probe_seconds"] == pytest.approx(0.22)
    assert machine_speed.summarize([None, probes[2]])["machine_speed_change"] == 0.0
    assert machine_speed.summarize([None]) is None and machine_speed.summarize([]) is None


@pytest.mark.parametrize("device", ["cpu", "numpy"])  # torch's threads (torch runs), numpy's (MLX on a CPU)
def test_measure_on_the_cpu_returns_positive_rates_and_its_own_cost(device):
    result = machine_speed.measure(device)
    assert set(result) == {"matmul_gflops", "memory_gb_per_s", "speed_index", "probe_seconds", "device"}
    assert result["device"] == device
    assert result["matmul_gflops"] > 0 and result["memory_gb_per_s"] > 0 and result["probe_seconds"] > 0
    assert result["speed_index"] == pytest.approx(
        machine_speed.speed_index(result["matmul_gflops"], result["memory_gb_per_s"]), rel=1e-3)


def test_the_mlx_probe_measures_on_mlx_s_default_device(monkeypatch):
    pytest.importorskip("mlx.core")
    # Smaller shapes than a Mac's GPU gets: MLX's CPU BLAS on Linux is slow, and only the path is checked.
    monkeypatch.setitem(machine_speed.MATMUL_SIZE, "mlx", 64)
    monkeypatch.setitem(machine_speed.COPY_MB, "mlx", 1)
    result = machine_speed.measure("mlx")
    assert result["device"] == "mlx" and result["matmul_gflops"] > 0 and result["memory_gb_per_s"] > 0


def test_measure_refuses_an_unknown_device():
    with pytest.raises(ValueError, match="use cpu, numpy, cuda, mps or mlx"):
        machine_speed.measure("tpu")


def test_a_runs_speed_leaves_out_the_probes_that_landed_on_a_moment_of_other_work():
    # Twenty probes near 100 and two that caught another process: 45 and 150.
    indexes = [100.0, 101.0, 99.0, 45.0, *([100.0] * 16), 150.0, 100.0]
    probes = [{"speed_index": i, "matmul_gflops": 2 * i, "memory_gb_per_s": i / 2, "probe_seconds": 0.05}
              for i in indexes]
    record = machine_speed.summarize(probes)
    # int(0.1 * 22) = 2 probes left out at each end: 45 and 99 below, 150 and 101 above.
    assert record["machine_speed"] == pytest.approx(100.0, abs=1e-4)
    assert record["probe_matmul_gflops"] == pytest.approx(200.0, abs=1e-3)  # each rate trimmed the same way
    assert record["probe_memory_gb_per_s"] == pytest.approx(50.0, abs=1e-3)
    assert record["machine_speed_probes"] == indexes  # the record keeps every probe
