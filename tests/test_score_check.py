"""backends.report.score_problem: the runner takes a val_bpb only from a record of the locked
evaluation that scored the whole validation split and that run.log's summary agrees with."""

import math

from backends.report import format_summary, score_problem

EXPECTED = {"eval_scored_tokens": 8185, "eval_bytes": 34421}
NATS = 63781.25


def record(**changes):
    fields = {
        "val_bpb": NATS / (math.log(2) * EXPECTED["eval_bytes"]), "training_seconds": 2.0,
        "total_seconds": 20.0, "peak_vram_mb": 100.0, "mfu_percent": 1.0, "total_tokens_M": 0.0,
        "num_steps": 8, "num_params_M": 1.7, "depth": 2, "backend": "cpu", "chip": "fake",
        "dataset": "local", "eval_tokens": 8192, "time_budget": 2.0, "harness": "0" * 12,
        "eval_scored_tokens": EXPECTED["eval_scored_tokens"], "eval_bytes": EXPECTED["eval_bytes"],
        "eval_nats": NATS,
    }
    fields.update(changes)
    return fields


def log_of(fields):
    return "step 00001 | loss 9.0\rstep 00002 | loss 8.0\n" + format_summary(fields) + "\n"


def test_a_record_of_the_whole_split_that_the_log_agrees_with_is_taken():
    fields = record()
    assert score_problem(fields, log_of(fields), EXPECTED) is None


def test_no_record_is_refused():
    assert score_problem(None, log_of(record()), EXPECTED) == "no record of the evaluation in runs/last_run.json"


def test_a_record_without_the_evaluation_counts_is_refused():
    fields = record()
    del fields["eval_bytes"], fields["eval_nats"]
    assert score_problem(fields, log_of(fields), EXPECTED) == (
        "the record lacks eval_bytes, eval_nats: it was not written by the locked evaluation")


def test_an_evaluation_over_fewer_tokens_or_bytes_is_refused():
    fewer = record(eval_scored_tokens=2045)
    assert score_problem(fewer, log_of(fewer), EXPECTED) == (
        "the evaluation scored 2,045 tokens, the validation split holds 8,185")
    bytes_ = record(eval_bytes=34000, val_bpb=NATS / (math.log(2) * 34000))
    assert score_problem(bytes_, log_of(bytes_), EXPECTED) == (
        "the evaluation scored 34,000 bytes, the validation split holds 34,421")


def test_a_val_bpb_that_does_not_follow_from_the_nats_is_refused():
    faked = record(val_bpb=0.5)
    assert score_problem(faked, log_of(faked), EXPECTED) == (
        f"the record's val_bpb 0.500000 is not its evaluation's {record()['val_bpb']:.6f}")


def test_a_printed_summary_that_differs_from_the_record_is_refused():
    fields = record()
    printed = log_of(fields) + format_summary(dict(fields, val_bpb=0.5)) + "\n"
    assert score_problem(fields, printed, EXPECTED) == (
        f"run.log's summary says val_bpb 0.5, the record {fields['val_bpb']:.6f}")
    assert score_problem(fields, "step 00001 | loss 9.0\n", EXPECTED) == (
        "run.log holds no summary to check the record against")


def test_a_non_numeric_val_bpb_is_refused():
    fields = record(val_bpb="great")
    assert score_problem(fields, log_of(record()), EXPECTED) == "val_bpb is 'great'"
