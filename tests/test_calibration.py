"""backends/flops.py: the measured CPU peak behind MFU survives a busy machine. The cache keeps the
best of its measurements (a new one can only raise it), an untrusted entry is measured again once
it is old, and recalibrate measures on request. Timings are replaced by fixed rates, so nothing
here depends on how loaded the machine is."""

import json

import pytest

import backends
from backends import flops, hardware

BUSY, IDLE, NOISY = 255e9, 775e9, 100e9  # bf16 FLOP/s: measured under load, idle, under heavy load


@pytest.fixture
def rates(monkeypatch):
    """A list of the bf16 rates the next measurements report (fp32 at a quarter of each); a
    measurement with none left fails the test."""
    bf16_rates = []
    timings = []  # _matmul_rate is called for bf16, then for fp32

    def fake_rate(make_product, sizes):
        if not timings:
            if not bf16_rates:
                pytest.fail("measured more often than expected")
            rate = bf16_rates.pop(0)
            timings.extend([rate, rate / 4])
        return timings.pop(0), max(sizes)
    monkeypatch.setattr(flops, "_matmul_rate", fake_rate)
    return bf16_rates


def measure(tmp_path, **options):
    return flops.measure_matmul_flops("torch", "test cpu", cache_root=tmp_path, **options)


def age_cache(tmp_path, seconds):
    path = tmp_path / flops.CALIBRATION_FILE
    cache = json.loads(path.read_text())
    for record in cache.values():
        record["measured_at"] -= seconds
    path.write_text(json.dumps(cache))


def test_a_new_measurement_can_only_raise_the_cached_peak(rates, tmp_path):
    rates.extend([BUSY, IDLE, NOISY])
    assert measure(tmp_path)["bf16"] == BUSY
    raised = measure(tmp_path, recalibrate=True)
    assert (raised["bf16"], raised["fp32"], raised["measurements"]) == (IDLE, IDLE / 4, 2)
    kept = measure(tmp_path, recalibrate=True)
    assert (kept["bf16"], kept["fp32"], kept["measurements"]) == (IDLE, IDLE / 4, 3)
    assert kept["cached"] is False and rates == []
    assert measure(tmp_path)["bf16"] == IDLE


def test_an_untrusted_peak_is_measured_again_once_it_is_old_until_it_is_trusted(rates, tmp_path):
    rates.extend([BUSY, IDLE, NOISY])
    measure(tmp_path)
    assert measure(tmp_path)["cached"] is True  # a young measurement is read back
    for expected_count in (2, 3):
        age_cache(tmp_path, flops.REMEASURE_AFTER_S + 1)
        again = measure(tmp_path)
        assert again["cached"] is False and again["measurements"] == expected_count
    assert again["bf16"] == IDLE and rates == []
    age_cache(tmp_path, 10 * flops.REMEASURE_AFTER_S)
    trusted = measure(tmp_path)  # the best of CALIBRATION_MEASUREMENTS: read however old
    assert trusted["cached"] is True and trusted["bf16"] == IDLE


def test_an_entry_from_before_the_count_is_measured_again_and_keeps_the_better_rate(rates, tmp_path):
    rates.append(IDLE)
    measure(tmp_path)
    cache = json.loads((tmp_path / flops.CALIBRATION_FILE).read_text())
    key, record = next(iter(cache.items()))
    old_format = {k: v for k, v in record.items() if k not in ("measurements", "measured_at")}
    old_format["bf16"] = BUSY
    (tmp_path / flops.CALIBRATION_FILE).write_text(json.dumps({key: old_format}))
    rates.append(IDLE)
    merged = measure(tmp_path)
    assert (merged["bf16"], merged["measurements"], merged["cached"]) == (IDLE, 2, False)


def test_peak_flops_recalibrates_on_request_and_says_of_how_many(rates, monkeypatch, tmp_path):
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path))
    info = hardware.read_hardware_info(system="Linux", machine="x86_64", cuda_reader=lambda: None)
    rates.extend([BUSY, IDLE])
    assert backends.peak_flops(info, "cpu") == BUSY
    value, how = backends.peak_flops_and_source(info, "cpu", recalibrate=True)
    assert value == IDLE and "best of 2" in how
    assert backends.peak_flops(info, "cpu") == IDLE


def test_a_calibration_is_kept_per_library_device_and_thread_count(rates, tmp_path):
    import torch

    threads_before = torch.get_num_threads()
    rates.extend([IDLE, BUSY, NOISY])
    try:
        torch.set_num_threads(2)
        assert measure(tmp_path)["bf16"] == IDLE
        torch.set_num_threads(1)
        one_thread = measure(tmp_path)  # not the 2-thread entry: measured anew
        assert (one_thread["bf16"], one_thread["threads"], one_thread["cached"]) == (BUSY, 1, False)
        other_device = flops.measure_matmul_flops("torch", "another cpu", cache_root=tmp_path)
        assert other_device["bf16"] == NOISY and rates == []
        torch.set_num_threads(2)
        assert measure(tmp_path)["bf16"] == IDLE  # each entry is read back as it was measured
    finally:
        torch.set_num_threads(threads_before)
    keys = sorted(json.loads((tmp_path / flops.CALIBRATION_FILE).read_text()))
    version = f"torch {torch.__version__}"
    assert keys == sorted([flops.calibration_key(version, "cpu", "test cpu", 2, flops.CPU_SIZES),
                           flops.calibration_key(version, "cpu", "test cpu", 1, flops.CPU_SIZES),
                           flops.calibration_key(version, "cpu", "another cpu", 1, flops.CPU_SIZES)])
