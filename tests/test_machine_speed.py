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
    assert gb_per_s == pytest.approx(2 * 32 * 2 ** 20 / 0.002 / 1e9)


def test_a_slow_outlier_timing_does_not_move_the_median(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(machine_speed.time, "perf_counter", clock)
    durations = iter([0.001] + [0.001, 0.001, 0.5, 0.001, 0.001])  # warm-up, then one interrupted copy

    def copy():
        clock.now += next(durations)

    _, gb_per_s = machine_speed._rates(clock.work(0.01), copy, lambda: None, 512, 10 ** 9)
    assert gb_per_s == pytest.approx(2.0 / 0.001)


def test_speed_index_is_the_geometric_mean_of_compute_and_memory():
    assert machine_speed.speed_index(100.0, 25.0) == pytest.approx(50.0)
    assert machine_speed.speed_index(90.0, 25.0) / 50.0 == pytest.approx(math.sqrt(0.9))


def test_combine_records_the_geometric_mean_and_the_change_during_the_run():
    before, after = {"speed_index": 40.0}, {"speed_index": 44.1}
    record = machine_speed.combine(before, after)
    assert record["machine_speed"] == pytest.approx(42.0, abs=1e-4)
    assert record["machine_speed_change"] == pytest.approx(0.1025)
    assert record["machine_speed_before"] is before and record["machine_speed_after"] is after
    assert machine_speed.combine(None, after)["machine_speed"] == 44.1
    assert machine_speed.combine(None, after)["machine_speed_change"] is None
    assert machine_speed.combine(None, None) is None


def test_measure_on_the_cpu_returns_positive_rates_and_its_own_cost():
    result = machine_speed.measure("cpu")
    assert set(result) == {"matmul_gflops", "memory_gb_per_s", "speed_index", "probe_seconds", "device"}
    assert result["device"] == "cpu"
    assert result["matmul_gflops"] > 0 and result["memory_gb_per_s"] > 0 and result["probe_seconds"] > 0
    assert result["speed_index"] == pytest.approx(
        machine_speed.speed_index(result["matmul_gflops"], result["memory_gb_per_s"]), rel=1e-3)


def test_measure_refuses_an_unknown_device():
    with pytest.raises(ValueError, match="use cpu, cuda or mps"):
        machine_speed.measure("tpu")
