"""backends/report.py: the context both training scripts attach to a result (run_context) and how
the timing fields print in the summary and come back from it."""

import shutil

import prepare
from backends.report import (
    CONTEXT_KEYS,
    LOCKED_PATHS,
    RUN_EXTRA_KEYS,
    SUMMARY_KEYS,
    TIMING_KEYS,
    format_summary,
    harness_hash,
    parse_summary,
    run_context,
)


def test_run_context_names_dataset_budgets_harness_and_profile_in_summary_order(tiny_env):
    context = run_context(world_size=2)
    assert list(context) == list(CONTEXT_KEYS + RUN_EXTRA_KEYS)
    assert context == {"dataset": "local", "eval_tokens": 4 * prepare.MAX_SEQ_LEN,
                       "time_budget": prepare.TIME_BUDGET, "harness": harness_hash(),
                       "standard": False, "profile": "smoke", "world_size": 2}


def test_the_harness_hash_covers_every_locked_file_and_nothing_else(tmp_path):
    assert LOCKED_PATHS == ("prepare.py", "dataset_builders.py", "backends")
    for name in ("prepare.py", "dataset_builders.py", "train.py"):
        shutil.copy(prepare.__file__.replace("prepare.py", name), tmp_path / name)
    shutil.copytree(prepare.__file__.replace("prepare.py", "backends"), tmp_path / "backends",
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert harness_hash(tmp_path) == harness_hash()
    hashes = {harness_hash(tmp_path)}
    for name in ("prepare.py", "dataset_builders.py", "backends/report.py"):
        with open(tmp_path / name, "a") as file:
            file.write("# an edit\n")
        hashes.add(harness_hash(tmp_path))
    assert len(hashes) == 4, "each locked file changes the hash"
    (tmp_path / "train.py").write_text("# the agent's script is not the harness\n")
    (tmp_path / "backends" / "notes.txt").write_text("not python\n")
    assert harness_hash(tmp_path) in hashes


def test_a_standard_profile_run_is_standard_only_at_the_standard_budget(tiny_env, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "standard")
    context = run_context()
    assert context["profile"] == "standard" and context["world_size"] == 1
    assert context["standard"] is (prepare.TIME_BUDGET == prepare.STANDARD_TIME_BUDGET)


def test_timing_fields_print_with_fixed_decimals_after_the_context_and_parse_back():
    fields = {key: 1 for key in SUMMARY_KEYS + CONTEXT_KEYS}
    fields.update(standard=False, profile="smoke", world_size=1, startup_seconds=3.14159,
                  untimed_seconds=20.0, train_tokens_per_second=2999.7, data_wait_percent=0.0123,
                  eval_seconds=4.5, eval_tokens_per_second=15872.4)
    lines = format_summary(fields).splitlines()
    timing_lines = {line.split(":")[0]: line.split(":")[1].strip() for line in lines[-len(TIMING_KEYS):]}
    assert timing_lines == {"startup_seconds": "3.14", "untimed_seconds": "20.00",
                            "train_tokens_per_second": "3000", "data_wait_percent": "0.01",
                            "eval_seconds": "4.50", "eval_tokens_per_second": "15872"}
    parsed = parse_summary(format_summary(fields))
    assert parsed["startup_seconds"] == 3.14 and parsed["train_tokens_per_second"] == 3000
