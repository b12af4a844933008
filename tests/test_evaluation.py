"""prepare.evaluate_bpb and eval_split_counts: the model sees the validation inputs only, the
evaluator computes the nats from its logits in float64 sums over the targets that have bytes, the
score does not depend on the batch size, and the counts it reports are the split's."""

import math

import numpy as np
import pytest

import prepare


def val_rows(tokenizer, rows):
    inputs, targets, _ = next(prepare.make_dataloader(tokenizer, rows, prepare.MAX_SEQ_LEN, "val"))
    return inputs, targets


@pytest.fixture
def tokenizer(tiny_env):
    return prepare.get_tokenizer()


def bigram_logits(vocab):
    """A deterministic model: logits that depend on the input token only (and on nothing else)."""
    table = np.random.default_rng(0).standard_normal((vocab, vocab)) * 3

    def logits(inputs):
        return table[inputs].astype(np.float32)

    return logits, table


def test_uniform_logits_score_log_vocab_per_byte_of_the_targets_that_have_bytes(tokenizer):
    rows = prepare.eval_token_budget() // prepare.MAX_SEQ_LEN
    _, targets = val_rows(tokenizer, rows)
    token_bytes = prepare.get_token_bytes()[targets]
    counted = token_bytes > 0
    assert counted.sum() < targets.size  # BOS targets are present and must be left out
    vocab = tokenizer.get_vocab_size()
    result = prepare.evaluate_bpb(lambda inputs: np.zeros(inputs.shape + (vocab,)), tokenizer, 2)
    expected = math.log(vocab) * counted.sum() / (math.log(2) * token_bytes.sum())
    assert result["val_bpb"] == pytest.approx(expected, rel=1e-12)
    assert result["eval_scored_tokens"] == counted.sum() and result["eval_bytes"] == token_bytes.sum()
    assert result["eval_nats"] == pytest.approx(math.log(vocab) * counted.sum(), rel=1e-12)


def test_the_model_sees_inputs_only_and_the_score_is_its_log_softmax(tokenizer):
    vocab = tokenizer.get_vocab_size()
    logits_fn, table = bigram_logits(vocab)
    seen = []

    def model(*args):
        seen.append(len(args))
        return logits_fn(*args)

    result = prepare.evaluate_bpb(model, tokenizer, 3)
    assert set(seen) == {1}
    inputs, targets = val_rows(tokenizer, 4)
    log_softmax = table - np.log(np.exp(table).sum(-1, keepdims=True))
    nats = -log_softmax[inputs, targets]
    token_bytes = prepare.get_token_bytes()[targets]
    expected = nats[token_bytes > 0].sum() / (math.log(2) * token_bytes.sum())
    assert result["val_bpb"] == pytest.approx(expected, rel=1e-9)


def test_the_score_is_the_same_at_batch_1_and_8(tokenizer):
    logits_fn, _ = bigram_logits(tokenizer.get_vocab_size())
    one, eight = (prepare.evaluate_bpb(logits_fn, tokenizer, batch) for batch in (1, 8))
    assert abs(one["val_bpb"] - eight["val_bpb"]) < 1e-12
    assert one["eval_bytes"] == eight["eval_bytes"] and one["eval_scored_tokens"] == eight["eval_scored_tokens"]


def test_the_model_is_asked_for_at_most_a_batch_of_rows_at_a_time(tokenizer):
    vocab = tokenizer.get_vocab_size()
    asked = []

    def logits(inputs):
        asked.append(inputs.shape)
        return np.zeros(inputs.shape + (vocab,), dtype=np.float32)

    prepare.evaluate_bpb(logits, tokenizer, 3)
    assert asked == [(3, prepare.MAX_SEQ_LEN), (1, prepare.MAX_SEQ_LEN)]  # 4 rows of the smoke budget


def test_anything_but_logits_of_every_position_is_refused(tokenizer):
    with pytest.raises(ValueError, match=r"logits of shape \(2, 2048\), expected \(2, 2048, 'vocab'\)"):
        prepare.evaluate_bpb(lambda inputs: np.zeros(inputs.shape), tokenizer, 2)


def test_split_counts_are_what_an_evaluation_scores_and_are_cached(tokenizer):
    vocab = tokenizer.get_vocab_size()
    result = prepare.evaluate_bpb(lambda inputs: np.zeros(inputs.shape + (vocab,)), tokenizer, 4)
    counts = prepare.eval_split_counts()
    assert counts == {"eval_scored_tokens": result["eval_scored_tokens"], "eval_bytes": result["eval_bytes"]}
    cache = prepare.dataset_dir() / prepare.EVAL_COUNTS_FILE
    assert cache.exists()
    assert prepare.eval_split_counts() == counts


def test_split_counts_follow_the_budget(tokenizer, monkeypatch):
    smoke = prepare.eval_split_counts()
    monkeypatch.setattr(prepare, "eval_token_budget", lambda backend=None: prepare.MAX_SEQ_LEN)
    one_row = prepare.eval_split_counts()
    assert 0 < one_row["eval_scored_tokens"] < smoke["eval_scored_tokens"]
    assert 0 < one_row["eval_bytes"] < smoke["eval_bytes"]
