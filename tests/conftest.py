"""Shared fixtures: a tiny, real prepared dataset that any test can train or evaluate on.

tiny_dataset (built once per test run, in about a second)
    A dataset built by the real `prepare.prepare("local", ...)` from generated text, in its own
    temporary AUTORESEARCH_CACHE_DIR: several train shards, val.parquet, a small tokenizer
    (TINY_VOCAB_SIZE tokens, so models stay small) and the token cache. Treat it as read-only;
    copy `cache_dir` first if a test must damage it (see copied_dataset in test_prepare.py).
    Attributes:
        cache_dir   Path, the AUTORESEARCH_CACHE_DIR holding it
        name        "local", the dataset name
        source      Path of the generated text files it was built from
        vocab_size  the tokenizer's vocabulary size (<= TINY_VOCAB_SIZE)
        env         {AUTORESEARCH_CACHE_DIR, AUTORESEARCH_DATASET, AUTORESEARCH_PROFILE: "smoke"}:
                    add it to a subprocess environment to run a script on this dataset

tiny_env (function scope)
    Puts tiny_dataset.env into os.environ for the duration of one test and returns it, so that
    prepare.get_tokenizer(), make_dataloader() and evaluate_bpb() use the tiny dataset.
"""

import random
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent  # cwd for tests that run a script

TINY_VOCAB_SIZE = 512
TINY_DOCUMENTS = 400


def generated_documents(count, seed=0):
    """Deterministic text with words, numbers, punctuation and some non-ASCII characters, in
    documents from a few words to several thousand (longer than a 2048-token row)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "tre", "sun", "ve", "dor", "ax", "pil", "qu", "é", "ñu", "ø"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    documents = []
    for index in range(count):
        length = rng.choice([3, 20, 80, 200, 400, 800]) if index % 50 else 4000
        sentence, text = [], []
        for _ in range(length):
            sentence.append(rng.choice(words) if rng.random() > 0.1 else str(rng.randint(0, 99999)))
            if rng.random() < 0.12:
                text.append(" ".join(sentence).capitalize() + rng.choice([".", "!", "?", ", 中文."]))
                sentence = []
        text.append(" ".join(sentence))
        documents.append(("\n" if index % 3 else " ").join(text).strip() or "empty")
    return documents


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    import prepare

    root = tmp_path_factory.mktemp("tiny_dataset")
    source, cache_dir = root / "source", root / "cache"
    source.mkdir()
    for index, text in enumerate(generated_documents(TINY_DOCUMENTS)):
        (source / f"doc_{index:04d}.txt").write_text(text, encoding="utf-8")
    env = {"AUTORESEARCH_CACHE_DIR": str(cache_dir), "AUTORESEARCH_DATASET": "local",
           "AUTORESEARCH_PROFILE": "smoke"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTORESEARCH_CACHE_DIR", str(cache_dir))
        info = prepare.prepare("local", source=source, vocab_size=TINY_VOCAB_SIZE, shard_chars=100_000)
    return SimpleNamespace(cache_dir=cache_dir, name="local", source=source,
                           vocab_size=info["vocab_size"], env=env)


@pytest.fixture
def tiny_env(tiny_dataset, monkeypatch):
    for key, value in tiny_dataset.env.items():
        monkeypatch.setenv(key, value)
    return dict(tiny_dataset.env)


def write_calibration(cache_dir, library, bf16, fp32):
    """Make cache_dir/calibration.json hold a trusted calibration of this machine's CPU for
    library ("torch" or "mlx") at every thread count a run may use, with these FLOP/s, so a
    training script started on cache_dir takes them as measured: tests choose the machine."""
    import importlib.metadata
    import json
    import os
    import time

    from backends import flops, hardware

    if library == "torch":
        import torch
        version = f"torch {torch.__version__}"
    else:
        version = f"mlx {importlib.metadata.version('mlx')}"
    cpu_model = hardware.get_hardware_info()["cpu_model"]
    record = {"bf16": bf16, "fp32": fp32, "bf16_size": 1024, "fp32_size": 1024, "library": version,
              "measurements": flops.CALIBRATION_MEASUREMENTS, "measured_at": time.time()}
    cache = {flops.calibration_key(version, "cpu", cpu_model, threads, flops.CPU_SIZES):
             {**record, "threads": threads} for threads in range(1, 2 * (os.cpu_count() or 1) + 1)}
    (Path(cache_dir) / flops.CALIBRATION_FILE).write_text(json.dumps(cache))


@pytest.fixture
def calibrated_dataset(tiny_dataset, tmp_path):
    """A copy of tiny_dataset's cache (as `env`, like tiny_dataset.env) whose calibration the
    test writes with calibrated_dataset.calibrate(library, bf16, fp32)."""
    import shutil

    cache_dir = tmp_path / "calibrated_cache"
    shutil.copytree(tiny_dataset.cache_dir, cache_dir)
    env = {**tiny_dataset.env, "AUTORESEARCH_CACHE_DIR": str(cache_dir)}
    return SimpleNamespace(cache_dir=cache_dir, env=env, vocab_size=tiny_dataset.vocab_size,
                           calibrate=lambda library, bf16, fp32: write_calibration(cache_dir, library,
                                                                                   bf16, fp32))
