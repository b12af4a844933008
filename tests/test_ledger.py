"""tools/ledger.py: results.tsv rows, their tags and kinds, and the checks before a run."""


import pytest

from tools import ledger

KIND = ledger.Kind(300.0, "standard", "pystdlib", "cpu", "cpu", 1, True)
SMOKE = ledger.Kind(10.0, "smoke", "local", "cpu", "smoke", 2, False)


def test_descriptions_end_with_run_number_note_and_kind_and_parse_back():
    text = ledger.describe("wider\tmlp", KIND, run=3, note="disturbed: other processes used 41% of the CPU")
    assert text == ("wider mlp [run 3] [disturbed: other processes used 41% of the CPU] "
                    "[standard 300s/standard/pystdlib/cpu/cpu/x1]")
    assert ledger.row_kind(text) == str(KIND) == "standard 300s/standard/pystdlib/cpu/cpu/x1"
    assert ledger.row_kind(ledger.describe("x", SMOKE)) == "non-standard 10s/smoke/local/cpu/smoke/x2"


def test_old_rows_parse_as_legacy_kinds():
    assert ledger.row_kind("baseline") == "legacy"
    assert ledger.row_kind("short [non-standard, 60s budget]") == "legacy 60s"


def test_disturbed_and_over_budget_rows_and_crashes_are_not_evidence():
    header = ledger.HEADER + "\n"
    rows = ledger.parse(header + "\n".join([
        ledger.format_row("abc1234", 1.3, 2.0, "keep", ledger.describe("a", KIND)),
        ledger.format_row("abc1234", 1.5, 2.0, "discard", ledger.describe("a", KIND, 2, "disturbed: busy")),
        ledger.format_row("abc1234", 1.0, 2.0, "discard", ledger.describe("a", KIND, 3, "over budget: slow")),
        ledger.format_row("abc1234", 0.0, 0.0, "crash", ledger.describe("a", KIND, 4)),
        ledger.format_row("abc1234", 1.31, 2.0, "keep", ledger.describe("a", KIND, 5)),
    ]))
    assert ledger.values_of(rows, "abc1234", str(KIND)) == [1.3, 1.31]
    assert ledger.next_run_number(rows, "abc1234", str(KIND)) == 6


@pytest.mark.parametrize("text, problem", [("", "does not start with the header"),
                                           (ledger.HEADER + "\nabc1234\t1.0\t2.0\tmaybe\tx\n", "line 2"),
                                           (ledger.HEADER + "\nabc1234\tabc\t2.0\tkeep\tx\n", "line 2")])
def test_malformed_files_name_the_problem(text, problem):
    with pytest.raises(ledger.LedgerError, match=problem):
        ledger.parse(text)


def test_check_ready_notices_a_missing_file_and_rows_lost_since_the_runner_wrote_them(tmp_path):
    results, mirror = tmp_path / "results.tsv", tmp_path / "mirror.tsv"
    row = ledger.format_row("abc1234", 1.3, 2.0, "keep", ledger.describe("a", KIND))
    ledger.append([row], results, mirror)
    assert ledger.check_ready(results, mirror)[0].val_bpb == 1.3
    results.write_text(ledger.HEADER + "\n")
    with pytest.raises(ledger.LedgerError, match=f"lost 1 row.*cp {mirror} {results}"):
        ledger.check_ready(results, mirror)
    results.unlink()
    with pytest.raises(ledger.LedgerError, match="is missing"):
        ledger.check_ready(results, mirror)


def test_append_writes_whole_rows_after_a_file_without_a_final_newline(tmp_path):
    results, mirror = tmp_path / "results.tsv", tmp_path / "mirror.tsv"
    results.write_text(ledger.HEADER)
    ledger.append(["abc1234\t1.000000\t1.0\tkeep\tx", "abc1234\t1.100000\t1.0\tkeep\ty"], results, mirror)
    assert results.read_text().splitlines() == [ledger.HEADER, "abc1234\t1.000000\t1.0\tkeep\tx",
                                                "abc1234\t1.100000\t1.0\tkeep\ty"]
    assert mirror.read_text() == results.read_text()


def test_check_ready_names_an_edited_row_as_changed_and_a_deleted_one_as_lost(tmp_path):
    results, mirror = tmp_path / "results.tsv", tmp_path / "mirror.tsv"
    first = ledger.format_row("abc1234", 1.3, 2.0, "keep", ledger.describe("a", KIND))
    second = ledger.format_row("def5678", 1.4, 2.0, "discard", ledger.describe("b", KIND))
    ledger.append([first, second], results, mirror)
    results.write_text(ledger.HEADER + "\n" + first + "\n" + second.replace("1.400000", "1.200000") + "\n")
    with pytest.raises(ledger.LedgerError, match=r"1 row\(s\) the runner wrote that were changed \(first: "
                                                 r"`def5678 1.400000 .*` now reads `def5678 1.200000 ") as changed:
        ledger.check_ready(results, mirror)
    assert "lost" not in str(changed.value)
    results.write_text(ledger.HEADER + "\n" + first + "\n")
    with pytest.raises(ledger.LedgerError, match=r"lost 1 row\(s\) the runner wrote \(first: def5678 b") as lost:
        ledger.check_ready(results, mirror)
    assert "changed" not in str(lost.value)


def test_parse_line_is_the_check_every_reader_applies():
    assert ledger.parse_line("abc1234\t1.5\t2.0\tkeep\tidea").commit == "abc1234"
    for bad in ("zzzzzzz\t1.5\t2.0\tkeep\tidea", "abc1234\t1.5\t2.0\tKEEP\tidea", "abc1234\t1.5\t2.0\tkeep"):
        with pytest.raises(ValueError):
            ledger.parse_line(bad)
