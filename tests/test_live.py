"""tools/live.py: the live page's server, without a browser (tests/test_live_browser.py drives one).

Each test serves a generated night from a temporary folder on a free port of 127.0.0.1 and reads
the page and its state as the page's script does.
"""

import fcntl
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from tools import live, scheduler

HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
KIND = "standard 300s/standard/pystdlib/cpu/cpu/x1"
NIGHT = [  # commit, val_bpb, status, description
    ("aaaaaaa", 1.300, "keep", "baseline"), ("aaaaaaa", 1.310, "keep", "baseline [run 2]"),
    ("aaaaaaa", 1.290, "keep", "baseline [run 3]"),
    ("bbbbbbb", 1.250, "keep", "matrix lr 0.05"), ("bbbbbbb", 1.260, "keep", "matrix lr 0.05 [run 2]"),
    ("ccccccc", 0.0, "crash", "depth 24 [crash: exit code 1: out of memory]"),
    ("ddddddd", 1.400, "discard", "softcap 5"),
]


def row_line(commit, val_bpb, status, description, kind=KIND):
    return f"{commit}\t{val_bpb:.6f}\t2.0\t{status}\t{description} [{kind}]\n"


def write_night(folder, night=NIGHT):
    (folder / "results.tsv").write_text(HEADER + "".join(row_line(*row) for row in night))


@pytest.fixture
def night(tmp_path, monkeypatch):
    """A folder holding a night's results.tsv, made the current directory (as for the real command)."""
    write_night(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def page(night):
    """The base URL of a live server on a free port, serving `night`."""
    server = live.start("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def get(url, method="GET"):
    """(status, headers, body) of one request; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def state(page):
    status, headers, body = get(f"{page}/state.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    return json.loads(body)


def test_the_page_is_one_self_contained_document_that_polls_the_state(page):
    status, headers, body = get(f"{page}/")
    text = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "fetch(\"state.json\"" in text and "const POLL_MS = 2000;" in text
    assert "http://" not in text and "https://" not in text and "<link" not in text and " src=" not in text
    assert "default-src 'none'" in headers["Content-Security-Policy"]  # the browser fetches nothing else


def test_the_state_holds_the_best_its_runs_sigma_and_the_counts(page):
    results = state(page)["results"]
    assert results["kind"] == KIND and results["rows"] == 7 and results["unreadable"] == 0
    assert results["best"] == {"commit": "bbbbbbb", "mean": pytest.approx(1.255), "runs": 2,
                               "values": [1.25, 1.26], "description": "matrix lr 0.05"}
    # pooled over the baseline's three runs and the best's two, as experiment.py status pools it
    assert results["sigma"]["value"] == pytest.approx(((0.0002 + 0.00005) / 3) ** 0.5)
    assert results["sigma"]["runs"] == 5
    assert results["counts"] == {"keep": 5, "discard": 1, "crash": 1}
    newest = results["last"][0]
    assert (newest["index"], newest["commit"], newest["status"]) == (7, "ddddddd", "discard")
    assert newest["vs_best"] == pytest.approx(0.145)
    crash = results["last"][1]
    assert crash["notes"] == ["crash: exit code 1: out of memory"] and crash["vs_best"] is None


def test_the_chart_marks_kept_discarded_baseline_and_crashed_runs_and_the_running_best(page):
    chart = state(page)["chart"]
    assert chart.startswith("<svg") and chart.endswith("</svg>")
    assert chart.count('class="baseline"') == 3 and chart.count('class="rerun"') == 1
    assert chart.count('class="kept"') == 1 and chart.count('class="crash"') == 1
    assert chart.count('class="discarded"') + chart.count('class="off-scale"') == 1
    assert chart.count('class="best-line"') == 1 and "running best 1.250000" in chart
    assert "#6 ccccccc crash: depth 24" in chart


def test_an_appended_row_shows_in_the_next_state(page, night):
    before = state(page)
    with open(night / "results.tsv", "a") as results:
        results.write(row_line("eeeeeee", 1.200, "keep", "warmdown 0.6"))
    after = state(page)
    assert after["results"]["rows"] == before["results"]["rows"] + 1
    assert after["results"]["best"]["commit"] == "eeeeeee" and after["results"]["best"]["mean"] == 1.2
    assert after["chart"].count('class="kept"') == 2


@pytest.mark.parametrize("damage", ["garbage", "half a row", "binary", "empty", "deleted", "other kind only"])
def test_a_damaged_or_rewritten_results_file_still_gets_a_page(page, night, damage):
    path = night / "results.tsv"
    if damage == "garbage":
        path.write_text("this is not\ta results file\n\t\t\t\n")
    elif damage == "half a row":
        path.write_text(path.read_text() + "fffffff\t1.2")
    elif damage == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif damage == "empty":
        path.write_text("")
    elif damage == "deleted":
        path.unlink()
    else:
        path.write_text(HEADER + row_line("aaaaaaa", 1.3, "keep", "baseline", kind="legacy"))
    assert get(f"{page}/")[0] == 200
    results = state(page)["results"]
    if damage == "half a row":
        assert results["rows"] == 7 and results["unreadable"] == 1
    elif damage == "deleted":
        assert results["rows"] == 0 and "results.tsv not found" in results["note"]
    elif damage == "other kind only":
        assert results["kind"] == "legacy" and results["best"]["mean"] == 1.3
    else:
        assert results["rows"] == 0 and results["best"] is None


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_every_method_that_could_change_something_is_refused_with_405(page, night, method):
    before = (night / "results.tsv").read_text()
    for path in ("/", "/state.json"):
        status, headers, body = get(f"{page}{path}", method)
        assert status == 405 and headers["Allow"] == "GET, HEAD" and b"read-only" in body
    assert (night / "results.tsv").read_text() == before
    assert sorted(p.name for p in night.iterdir()) == ["results.tsv"]  # and nothing was written


def test_an_unknown_path_is_404(page):
    assert get(f"{page}/results.tsv")[0] == 404


def test_the_run_in_progress_shows_its_step_loss_and_elapsed_budget_without_taking_the_lock(
        page, night, monkeypatch):
    state_dir = night / ".autoresearch"
    state_dir.mkdir()
    lock = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held as the runner holds it
    os.write(lock, f"pid {os.getpid()}: run 'wider mlp', since 01:02:03".encode())
    (state_dir / "state.json").write_text(json.dumps({
        "last_verdict": "DISCARD  1.400000 (mean of 1; t -9.1) ddddddd softcap 5",
        "in_progress": {"commit": "f" * 40, "description": "wider mlp", "pending": [{}]}}))
    (night / "run.log").write_text("compiling\nstep 00011 (3.3%) | loss 6.5000 | remaining 290s   "
                                   "\rstep 00012 (4.0%) | loss 6.1234 | lrm 1.00 | mfu 3.1% | remaining 288s   ")

    def no_lock(*args):
        raise AssertionError("the live page tried the runner's lock")

    monkeypatch.setattr(fcntl, "flock", no_lock)
    try:
        shown = state(page)
    finally:
        os.close(lock)
    running = shown["running"]
    assert running["holder"].startswith(f"pid {os.getpid()}: run 'wider mlp'")
    assert (running["commit"], running["description"], running["runs_done"]) == ("fffffff", "wider mlp", 1)
    assert running["progress"] == {"step": 12, "percent": 4.0, "loss": "6.1234", "remaining": 288.0}
    assert (running["budget"], running["elapsed"]) == (300.0, 12.0)
    assert shown["verdicts"] == ["DISCARD  1.400000 (mean of 1; t -9.1) ddddddd softcap 5"]


def test_a_lock_file_left_by_a_finished_runner_is_no_run_in_progress(page, night):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (night / ".autoresearch").mkdir()
    (night / ".autoresearch" / "lock").write_text(f"pid {finished.stdout.strip()}: run 'old', since 00:00:00")
    assert state(page)["running"] is None


def test_the_server_remembers_each_new_verdict_line_newest_first(page, night):
    (night / ".autoresearch").mkdir()
    for line in ("KEEP     1.25 b", "KEEP     1.25 b", "DISCARD  1.40 d"):
        (night / ".autoresearch" / "state.json").write_text(json.dumps({"last_verdict": line}))
        shown = state(page)
    assert shown["verdicts"] == ["DISCARD  1.40 d", "KEEP     1.25 b"] and shown["last_verdict"] == "DISCARD  1.40 d"


def test_parallel_slots_and_queue_are_shown_from_the_schedulers_files(page, night):
    scheduler.save_candidates({"next": 3, "candidates": {"c1": {"description": "rope base 20000"},
                                                         "c2": {"description": "no value embeddings"}}})
    scheduler.claim({"run": "c1-1", "candidate": "c1", "commit": "1" * 40, "purpose": "judge"}, 0)
    scheduler.enqueue({"run": "c2-1", "candidate": "c2", "commit": "2" * 40, "purpose": "judge"})
    parallel = state(page)["parallel"]
    assert parallel["scheduler"] is False and parallel["unjudged"] == 0
    assert [(s["slot"], s["commit"], s["description"], s["purpose"]) for s in parallel["slots"]] == [
        (0, "1111111", "rope base 20000", "judge")]
    assert [(q["run"], q["description"]) for q in parallel["queued"]] == [("c2-1", "no value embeddings")]


def test_no_parallel_section_without_the_schedulers_folder(page):
    assert state(page)["parallel"] is None


def test_the_machines_load_is_reported(page):
    load = state(page)["load"]
    assert 0 <= load["cpu_percent"] <= 100 and load["threads"] >= 1 and len(load["load_average"]) == 3
    assert load["memory_gib"] > 0


def test_a_part_that_fails_to_read_is_one_line_in_errors_not_a_failed_page(page, monkeypatch):
    def broken():
        raise PermissionError("psutil says no")

    monkeypatch.setattr(live, "load_part", broken)
    shown = state(page)
    assert shown["load"] is None and shown["errors"] == ["load: PermissionError: psutil says no"]
    assert shown["results"]["rows"] == 7


def test_a_busy_port_is_refused_with_one_line(night):
    taken = live.start("127.0.0.1", 0)
    try:
        with pytest.raises(SystemExit, match=r"cannot serve on 127\.0\.0\.1:\d+ .*pick another with --port N"):
            live.serve("127.0.0.1", taken.server_address[1])
    finally:
        taken.server_close()
