"""The candidate state machine and run queue of parallel experiments, without Ray.

Finished runs are fed in by hand; the verdicts must be the ones the serial loop in
tools/verdict.py reaches on the same values, because the parallel judge replays them through it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import scheduler, verdict

KIT = Path(__file__).resolve().parent.parent

BEST = [1.300, 1.310, 1.290, 1.300, 1.305, 1.295]
WIN = verdict.Outcome(value=1.200)
LOSS = verdict.Outcome(value=1.450)


def test_a_candidate_with_no_finished_run_needs_one():
    assert scheduler.judge_step([], BEST, []) is None


def test_a_clear_win_needs_a_second_run_and_then_is_kept():
    assert scheduler.judge_step([WIN], BEST, []) is None
    result = scheduler.judge_step([WIN, verdict.Outcome(value=1.202)], BEST, [])
    assert result.status == "keep" and result.values == (1.200, 1.202)


def test_a_clear_loss_is_discarded_after_one_run():
    result = scheduler.judge_step([LOSS], BEST, [])
    assert result.status == "discard" and result.values == (1.450,)


def test_a_crash_ends_the_candidate_with_its_reason():
    result = scheduler.judge_step([verdict.Outcome(crash="exit code 1: FAIL")], BEST, [])
    assert (result.status, result.reason) == ("crash", "exit code 1: FAIL")


def test_disturbed_runs_are_rerun_until_the_void_limit():
    disturbed = verdict.Outcome(void="disturbed: other processes used 40% of the CPU")
    assert scheduler.judge_step([disturbed] * verdict.MAX_VOID_RUNS, BEST, []) is None
    assert scheduler.judge_step([disturbed] * (verdict.MAX_VOID_RUNS + 1), BEST, []).status == "void"


def test_replayed_verdicts_match_the_serial_loop_on_the_same_values():
    values = [1.296, 1.301, 1.299, 1.297]
    serial = verdict.judge_candidate(lambda attempt: verdict.Outcome(value=values[attempt - 1]), BEST)
    outcomes = []
    for value in values:
        outcomes.append(verdict.Outcome(value=value))
        replayed = scheduler.judge_step(outcomes, BEST, [])
        if replayed is not None:
            break
    assert replayed == serial


def test_a_new_best_is_confirmed_to_best_runs_in_parallel():
    kept = [1.200, 1.202]
    assert scheduler.confirm_runs_to_queue(kept, [], in_flight=0) == verdict.BEST_RUNS - 2
    assert scheduler.confirm_runs_to_queue(kept, [WIN], in_flight=3) == 0, "none while runs are in flight"
    done, values = scheduler.confirm_step(kept, [WIN] * 4)
    assert done and len(values) == verdict.BEST_RUNS


def test_a_disturbed_confirmation_is_replaced_by_one_more_run():
    kept = [1.200, 1.202]
    disturbed = verdict.Outcome(void="disturbed")
    outcomes = [WIN, WIN, WIN, disturbed]
    assert scheduler.confirm_step(kept, outcomes)[0] is False
    assert scheduler.confirm_runs_to_queue(kept, outcomes, in_flight=0) == 1


def test_a_crashing_confirmation_stops_the_confirmation():
    done, values = scheduler.confirm_step([1.200, 1.202], [verdict.Outcome(crash="exit code 1")])
    assert done and values == [1.200, 1.202]


def test_runs_move_from_queue_to_running_to_finished_to_judged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    book = scheduler.load_candidates()
    candidate = scheduler.new_candidate(book, "a" * 40, "b" * 40, "wider mlp", "train.py", {"dataset": "pystdlib"},
                                        {"timeout": 720, "max_disturbance": 0.1, "threshold": None})
    scheduler.request_run(candidate, "judge")
    scheduler.request_run(candidate, "judge")
    assert [r["run"] for r in scheduler.queued()] == ["c1-1", "c1-2"]
    assert scheduler.in_flight(candidate) == 2
    record = scheduler.claim(scheduler.queued()[0], slot=1)
    assert [r["run"] for r in scheduler.queued()] == ["c1-2"]
    assert [(r["run"], r["slot"]) for r in scheduler.running()] == [("c1-1", 1)]
    scheduler.finish(dict(record, outcome={"value": 1.2}))
    assert scheduler.running() == []
    (finished,) = scheduler.finished()
    assert finished["outcome"] == {"value": 1.2} and finished["timeout"] == 720
    scheduler.mark_judged(finished)
    assert scheduler.finished() == []
    assert (scheduler.JUDGED_DIR / "c1-1.json").exists()


def test_candidate_ids_count_up_and_survive_a_reload(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    book = scheduler.load_candidates()
    first = scheduler.new_candidate(book, "a" * 40, "b" * 40, "one", "train.py", {}, {})
    scheduler.save_candidates(book)
    book = scheduler.load_candidates()
    second = scheduler.new_candidate(book, "c" * 40, "b" * 40, "two", "train.py", {}, {})
    assert (first["id"], second["id"]) == ("c1", "c2")
    assert [c["id"] for c in scheduler.open_candidates(book)] == ["c1", "c2"]


def test_submit_without_ray_says_which_command_installs_it(tmp_path):
    fake = tmp_path / "no_ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    subprocess.run(["git", "init", "--quiet", str(tmp_path / "repo")], check=True)
    done = subprocess.run([sys.executable, str(KIT / "tools" / "experiment.py"), "submit", "an idea"],
                          cwd=tmp_path / "repo", capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(fake.parent)))
    assert done.returncode == 2
    assert done.stderr.strip() == "refusing to run: Ray is not installed: run `uv sync --group parallel` (parallel experiments need it)"


@pytest.mark.parametrize("command", ["submit", "wait"])
def test_parallel_commands_offer_their_cluster_options(command):
    done = subprocess.run([sys.executable, str(KIT / "tools" / "experiment.py"), command, "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "--workers" in done.stdout and "--address" in done.stdout
