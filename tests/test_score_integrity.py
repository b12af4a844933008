"""Edits of a training script that fake its score are never kept: each real smoke run goes through
tools/experiment.py on a temporary git repository holding the real kit, and ends as a crash row
that says why the score was refused (crash rows never enter the pooled sigma).

The edits: a fake val_bpb written into the record (with a summary to match), an evaluation over
fewer tokens, a printed val_bpb that differs from the record. A loss function that scales the nats
cannot reach the score at all: the evaluator computes the nats from the model's logits (the last
test shows the score unchanged)."""

import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from test_experiment import HEADER, KIT, RUNNER, commit_kit, git, rows

BASELINE_VALUE = 9.0  # far worse than any smoke run: a score the runner took would be a keep

FAKE_RECORD = '''
import json as _json
from pathlib import Path as _Path
from backends.report import format_summary as _format_summary, write_run_json as _write_run_json
_fields = _json.loads(_Path("runs/last_run.json").read_text())
_fields["val_bpb"] = 0.5
print(_format_summary(_fields), flush=True)
_write_run_json(_fields)
'''
PRINTED_ONLY = '''
import json as _json
from pathlib import Path as _Path
from backends.report import format_summary as _format_summary
print(_format_summary(dict(_json.loads(_Path("runs/last_run.json").read_text()), val_bpb=0.5)))
'''
FEWER_TOKENS = '''
prepare.eval_token_budget = lambda backend=None: prepare.MAX_SEQ_LEN
'''
MAIN_GUARD = '\nif __name__ == "__main__":\n'


def fewer_tokens(source):
    return source.replace(MAIN_GUARD, "\n" + FEWER_TOKENS + MAIN_GUARD, 1)


EDITS = {
    "fake-val-bpb-in-the-record": (lambda source: source + FAKE_RECORD, "the record's val_bpb 0.500000 is not"),
    "evaluation-over-fewer-tokens": (fewer_tokens, "the evaluation scored 2,"),
    "printed-val-bpb-differs": (lambda source: source + PRINTED_ONLY, "run.log's summary says val_bpb 0.5"),
}


def make_real_kit(root):
    root.mkdir()
    for name in ("train.py", "train_mlx.py", "prepare.py", "dataset_builders.py"):
        shutil.copy(KIT / name, root / name)
    shutil.copytree(KIT / "backends", root / "backends", ignore=shutil.ignore_patterns("__pycache__"))
    return commit_kit(root)


def kind_tag(repo, env):
    """The kind tag the runner gives runs started in repo with env."""
    code = (f"import sys; sys.path[:0] = [{str(KIT / 'tools')!r}, {str(KIT)!r}]; import experiment; "
            f"print(experiment.expected_kind().tag())")
    return subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.fixture(scope="module", params=["torch", "mlx"])
def kit(request, tiny_dataset, tmp_path_factory):
    """A committed real kit with six fabricated baseline rows of BASELINE_VALUE for one script."""
    import os
    framework = request.param
    repo = make_real_kit(tmp_path_factory.mktemp(f"integrity_{framework}") / "kit")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(tiny_dataset.env, AUTORESEARCH_BACKEND="cpu" if framework == "torch" else "mlx",
               AUTORESEARCH_TIME_BUDGET="1", AUTORESEARCH_TRAIN_CMD=f"{sys.executable} "
               f"{'train.py' if framework == 'torch' else 'train_mlx.py'}",
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    env.pop("PYTHONPATH", None)
    tag = kind_tag(repo, env)
    commit = git(repo, "rev-parse", "HEAD")[:7]
    baseline = [f"{commit}\t{BASELINE_VALUE + 0.01 * (i % 3):.6f}\t0.1\tkeep\tbaseline"
                f"{f' [run {i + 1}]' if i else ''} {tag}" for i in range(6)]
    (repo / "results.tsv").write_text("\n".join([HEADER, *baseline]) + "\n")
    script = "train.py" if framework == "torch" else "train_mlx.py"
    return repo, env, script


@pytest.mark.slow
@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edit_that_fakes_the_score_is_refused_as_a_crash(kit, edit):
    repo, env, script = kit
    change, reason = EDITS[edit]
    before = (repo / script).read_text()
    edited = change(before)
    assert edited != before
    (repo / script).write_text(edited)
    done = subprocess.run([sys.executable, str(RUNNER), "run", f"fake score: {edit}", "--script", script,
                           "--max-disturbance", "1", "--max-load-change", "1"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    last = rows(repo)[-1]
    assert last[3] == "crash", last
    assert f"[crash: score refused: {reason}" in last[4], last[4]
    assert [row for row in rows(repo) if row[3] == "keep"] == rows(repo)[:6]  # the baseline only
    assert (repo / script).read_text() == before  # the edit was reverted with its crash


def test_a_loss_that_scales_the_nats_does_not_reach_the_score(tiny_env):
    import torch

    import prepare
    import train

    tokenizer = prepare.get_tokenizer()
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=1,
                                      n_head=1, n_kv_head=1, n_embd=32, window_pattern="L"))
    model.eval()

    def logits(inputs):
        with torch.inference_mode():
            return model(torch.from_numpy(inputs))

    from backends.torch_ops import target_nats
    honest = prepare.evaluate_bpb(logits, tokenizer, 2, target_nats=target_nats)
    original_loss = model.loss.forward
    model.loss.forward = lambda *args, **kwargs: 0.9 * original_loss(*args, **kwargs)
    scaled = prepare.evaluate_bpb(logits, tokenizer, 2, target_nats=target_nats)
    assert scaled == honest
    assert math.isfinite(honest["val_bpb"]) and np.isclose(
        honest["val_bpb"], honest["eval_nats"] / (math.log(2) * honest["eval_bytes"]))
