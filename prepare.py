"""The locked harness: the constants, the tokenizer, the dataloader and the one evaluator.

Every experiment is judged by this file, so the agent never edits it (its hash is recorded with
each result, together with dataset_builders.py and backends/). It is two things:

- a library both training scripts import: the constants, get_tokenizer(), make_dataloader() and
  evaluate_bpb(). Everything is numpy; each script moves the arrays to its own framework.
- a command, `uv run prepare.py --dataset NAME`, that builds a dataset folder once (parquet
  shards with a `text` column, a BPE tokenizer trained on the train split only, and a token cache
  per shard so that training never waits on tokenization) and makes it the active dataset. How
  each dataset is downloaded or converted, and the folder's layout, are in dataset_builders.py.

Datasets: climbmix (default, downloaded), tinystories (downloaded), pystdlib (this interpreter's
standard library: offline), local (--source DIR). cache_root()/active_dataset names the dataset
prepared last; AUTORESEARCH_DATASET overrides it.
"""

import argparse
import bisect
import contextlib
import json
import math
import os
import signal
import sys
from pathlib import Path

import numpy as np

from dataset_builders import (_DAMAGED_PICKLE_ERRORS, _atomic_write_bytes, ACTIVE_DATASET_FILE, CLIMBMIX_DEFAULT_SHARDS, DATASET_FORMAT,
                              DATASETS, DEFAULT_CACHE_ROOT, DOWNLOAD_URL_ENV, VAL_SHARD, DataError, Tokenizer,
                              _check_dataset_name, _human, _out_of_space, _prepare_command, _read_dataset_info,
                              _read_token_cache, _shard_document_count, _shard_texts, _split_shards,
                              _stale_token_caches, _tokenize_shards, build_dataset, cache_root,
                              end_progress_line)

# ---------------------------------------------------------------------------------------------
# Constants every experiment shares

MAX_SEQ_LEN = 2048          # context length of every training row and every evaluation row
STANDARD_TIME_BUDGET = 300  # seconds of training in a standard (comparable) run
VOCAB_SIZE = 8192           # BPE vocabulary including the special tokens (SPECIAL_TOKENS, BOS first)

SMOKE_EVAL_TOKENS = 4 * MAX_SEQ_LEN  # evaluation budget under AUTORESEARCH_PROFILE=smoke


def _read_time_budget():
    """TIME_BUDGET from AUTORESEARCH_TIME_BUDGET (any other value than the standard one is labelled
    non-standard, and the runner never compares such a result with standard ones)."""
    value = os.environ.get("AUTORESEARCH_TIME_BUDGET", "").strip()
    if not value:
        return float(STANDARD_TIME_BUDGET), True
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"AUTORESEARCH_TIME_BUDGET={value!r} is not a number of seconds") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"AUTORESEARCH_TIME_BUDGET={value!r} must be a positive number of seconds")
    return seconds, seconds == STANDARD_TIME_BUDGET


try:
    TIME_BUDGET, TIME_BUDGET_IS_STANDARD = _read_time_budget()
except ValueError as time_budget_error:
    if __name__ != "__main__":
        raise  # each training script ends with its own one-line error
    sys.exit(f"prepare.py: {time_budget_error}")


def _profile():
    profile = os.environ.get("AUTORESEARCH_PROFILE", "").strip().lower() or "standard"
    if profile not in ("smoke", "standard"):
        raise ValueError(f"AUTORESEARCH_PROFILE={profile!r}: use smoke or standard")
    return profile


def is_standard_run():
    """True when the result may be compared with other standard results."""
    return TIME_BUDGET_IS_STANDARD and _profile() != "smoke"


# ---------------------------------------------------------------------------------------------
# The active dataset and its tokenizer


def active_dataset():
    """AUTORESEARCH_DATASET, else the dataset `prepare.py` built last."""
    name = os.environ.get("AUTORESEARCH_DATASET", "").strip()
    if name:
        return _check_dataset_name(name, "AUTORESEARCH_DATASET")
    recorded = cache_root() / ACTIVE_DATASET_FILE
    if recorded.is_file():
        name = recorded.read_bytes().decode("utf-8", errors="replace").strip()
        if name not in DATASETS:
            readable = name.isprintable() and "\ufffd" not in name  # no undecodable bytes
            shown = repr(name[:40]) if readable else "binary data"
            raise DataError(f"{recorded} names no dataset ({shown}): run "
                            "`uv run prepare.py --dataset NAME` to rewrite it, or set "
                            "AUTORESEARCH_DATASET")
        return name
    raise DataError(
        f"no dataset prepared in {cache_root()}: run `uv run prepare.py --dataset pystdlib` "
        "(offline) or `uv run prepare.py` (downloads climbmix)"
    )


def dataset_dir(name=None):
    name = active_dataset() if name is None else _check_dataset_name(name, "dataset_dir")
    return cache_root() / name


def _tokenizer_dir(name=None):
    return dataset_dir(name) / "tokenizer"


def get_tokenizer(name=None):
    """The tokenizer of the active dataset (or of dataset `name`). It also checks what the final
    evaluation will need (token_bytes.npy, a readable val shard), so that a damaged dataset
    stops a run before training rather than after it."""
    directory = _tokenizer_dir(name)
    name = directory.parent.name
    if not (directory / "tokenizer.pkl").exists():
        raise DataError(f"no tokenizer for dataset {name!r} in {directory}: "
                        f"run `{_prepare_command(name)}`")
    try:
        tokenizer = Tokenizer.from_directory(directory)
    except _DAMAGED_PICKLE_ERRORS as error:
        raise DataError(f"{directory / 'tokenizer.pkl'} is corrupt ({error}): "
                        f"run `{_prepare_command(name)}`") from None
    _token_bytes_for(tokenizer, name)
    val = directory.parent / VAL_SHARD
    if not val.exists() or not _shard_document_count(val, name):
        raise DataError(f"no validation documents in {val}: run `{_prepare_command(name)}`")
    return tokenizer


def get_token_bytes(name=None):
    """int32 [vocab]: UTF-8 byte length of each token id, 0 for special tokens."""
    path = _tokenizer_dir(name) / "token_bytes.npy"
    name = path.parent.parent.name
    if not path.exists():
        raise DataError(f"no {path.name} for dataset {name!r}: run `{_prepare_command(name)}`")
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path} is corrupt ({error}): run `{_prepare_command(name)}`") from None


def _token_bytes_for(tokenizer, name=None):
    """get_token_bytes(name), checked against the tokenizer it must describe."""
    token_bytes = get_token_bytes(name)
    if len(token_bytes) != tokenizer.get_vocab_size():
        name = _tokenizer_dir(name).parent.name
        raise DataError(f"token_bytes.npy has {len(token_bytes)} entries but the tokenizer has "
                        f"{tokenizer.get_vocab_size()}: run `{_prepare_command(name)}`")
    return token_bytes


# ---------------------------------------------------------------------------------------------
# Dataloader: BOS-aligned best-fit packing


def _document_stream(shards, tokenizer, name):
    """Endless (tokens, epoch): every document of the shards in order, BOS first; the epoch goes
    up each time the stream starts over. Uses the token cache, else tokenizes on the fly."""
    bos = tokenizer.get_bos_token_id()
    epoch = 1
    while True:
        for shard in shards:
            cache = _read_token_cache(shard, tokenizer)
            if cache is not None:
                tokens, offsets = cache["tokens"], cache["offsets"]
                for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
                    yield tokens[start:end], epoch
                continue
            for texts in _shard_texts(shard, name):
                for ids in tokenizer.encode(texts, prepend=bos):
                    yield np.array(ids, dtype=np.int64), epoch
        epoch += 1


class _BestFitPacker:
    """Upstream's packing rule, except that nothing is dropped. To fill a row: top the buffer up
    to buffer_size documents, place the largest buffered document that fits the space left; when
    none fits, crop the shortest one to fill the row exactly, and its rest goes back to the buffer
    behind a BOS, as a document of its own. Ties go to the document buffered first. The buffer is
    kept sorted by (length, arrival) so each choice is a binary search.

    Upstream drops the rest. With rows of 512 tokens that would train on 9% of pystdlib's tokens
    (the first 513 of each file, again every 43 steps of 16,384 tokens), and on 27% at 2048."""

    def __init__(self, documents, row_len, buffer_size, bos):
        self.documents, self.row_len, self.buffer_size = documents, row_len, buffer_size
        self.bos = bos       # put in front of a cropped document's rest
        self.keys = []       # sorted (length, arrival) of the buffered documents
        self.buffered = {}   # arrival -> (tokens, epoch)
        self.arrivals = 0
        self.epoch = 1       # the latest pass over the split that a placed document came from

    def fill(self, row):
        position = 0
        while position < self.row_len:
            while len(self.keys) < self.buffer_size:
                self._buffer(*next(self.documents))
            space = self.row_len - position
            fitting = bisect.bisect_right(self.keys, (space, math.inf))
            if fitting:
                index = bisect.bisect_left(self.keys, (self.keys[fitting - 1][0], -1))
            else:
                index = 0
            length, arrival = self.keys.pop(index)
            tokens, epoch = self.buffered.pop(arrival)
            take = min(length, space)
            row[position:position + take] = tokens[:take]
            position += take
            self.epoch = max(self.epoch, epoch)
            if take < length:
                self._buffer(np.concatenate(([self.bos], tokens[take:])), epoch)

    def _buffer(self, tokens, epoch):
        bisect.insort(self.keys, (len(tokens), self.arrivals))
        self.buffered[self.arrivals] = (tokens, epoch)
        self.arrivals += 1


def make_dataloader(tokenizer, B, T, split, *, rank=0, world_size=1, buffer_size=1000):
    """Endless (inputs int64 [B, T], targets int64 [B, T], epoch) from the active dataset.

    Rows of T+1 tokens are packed from the split's documents (BOS-aligned best fit, no padding,
    every token of the split once per epoch; _BestFitPacker) in a stream that depends on neither
    B nor world_size: each step takes the next B*world_size rows and this rank gets rows
    [rank*B, (rank+1)*B). inputs = row[:-1], targets = row[1:].
    epoch: the latest pass over the split (1, 2, ...) that any document placed so far came from.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if B < 1 or T < 1 or buffer_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad loader shape: B={B} T={T} buffer_size={buffer_size} "
                         f"rank={rank} world_size={world_size}")
    name = active_dataset()
    directory = dataset_dir(name)
    built = _read_dataset_info(directory).get("format")
    if built != DATASET_FORMAT:
        raise DataError(f"dataset {name!r} in {directory} was built by another version of "
                        f"prepare.py (format {built}, this one reads {DATASET_FORMAT}): run "
                        f"`{_prepare_command(name)}`")
    shards = _split_shards(directory, split)
    documents = sum(_shard_document_count(shard, name) for shard in shards)
    if not documents:
        raise DataError(f"no {split} documents for dataset {name!r} in {directory}: "
                        f"run `{_prepare_command(name)}`")
    stale = _stale_token_caches(shards, tokenizer) if tokenizer.fingerprint else []
    if stale:
        # Without its cache a shard is tokenized on the fly, so slowly that the step waits on it.
        names = ", ".join(shard.name for shard in stale)
        print(f"warning: the token cache of {names} is missing or damaged: rebuilding it",
              file=sys.stderr)
        try:
            _tokenize_shards(stale, name, tokenizer)
        except OSError as error:
            print(f"warning: cannot rebuild it ({error}): tokenizing on the fly, slower; run "
                  f"`{_prepare_command(name)}`", file=sys.stderr)
    # A buffer larger than the split would hold several copies of each document (the stream
    # wraps to fill it), so a small split (e.g. pystdlib's val) is buffered exactly once.
    buffer_size = min(buffer_size, documents)
    packer = _BestFitPacker(_document_stream(shards, tokenizer, name), T + 1, buffer_size,
                            tokenizer.get_bos_token_id())

    def batches():
        while True:
            rows = np.empty((B * world_size, T + 1), dtype=np.int64)
            for row in rows:
                packer.fill(row)
            mine = rows[rank * B:(rank + 1) * B]
            inputs, targets = np.ascontiguousarray(mine[:, :-1]), np.ascontiguousarray(mine[:, 1:])
            yield inputs, targets, packer.epoch

    return batches()


# ---------------------------------------------------------------------------------------------
# Evaluation: bits per byte on the start of the validation split


def eval_token_budget(backend=None):
    """Tokens every evaluation covers: fixed per hardware tier (a multiple of MAX_SEQ_LEN). The
    tier is that of `backend`, the one that trains (default: the one detect_backend() picks):
    MLX on a CUDA machine trains and evaluates on the CPU tier, not the GPU's."""
    if _profile() == "smoke":
        return SMOKE_EVAL_TOKENS
    import backends

    tokens = int(backends.eval_tokens(backends.get_hardware_info(), backend))
    if tokens <= 0 or tokens % MAX_SEQ_LEN:
        raise ValueError(f"backends.eval_tokens gave {tokens}: "
                         f"not a positive multiple of {MAX_SEQ_LEN}")
    return tokens


def _eval_batches(tokenizer, batch_size, backend):
    """(inputs, targets) int64 [rows, MAX_SEQ_LEN] over the first eval_token_budget(backend)
    tokens of the val split, batch_size rows at a time (the last batch may be shorter)."""
    rows_left = eval_token_budget(backend) // MAX_SEQ_LEN
    batches = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, "val")
    while rows_left > 0:
        inputs, targets, _ = next(batches)
        rows = min(batch_size, rows_left)
        yield inputs[:rows], targets[:rows]
        rows_left -= rows


def numpy_target_nats(logits, targets):
    """-log softmax(logits)[target] in float64 for numpy logits [rows, T, V] and targets [rows, T]."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(f"the model returned logits of shape {logits.shape}, expected "
                         f"{targets.shape + ('vocab',)}")
    top = logits.max(axis=-1, keepdims=True)
    log_sum_exp = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    return log_sum_exp - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def evaluate_bpb(logits_fn, tokenizer, batch_size, backend=None, target_nats=numpy_target_nats):
    """Validation bits per byte of a model over the first eval_token_budget(backend) tokens of
    the val split, in rows of MAX_SEQ_LEN.

    The model sees the inputs only: logits_fn(inputs int64 [rows, T]) returns its logits
    [rows, T, V] for at most batch_size rows at a time (memory stays one batch's logits), and
    target_nats(logits, targets) turns them into -log softmax(logits)[target], float64 numpy
    [rows, T] (the framework's version in backends: on the model's device). Whatever the model
    computes, what is scored is a real distribution over the next token. Targets whose token
    has no bytes (special tokens) count in neither sum. Returns {"val_bpb", "eval_scored_tokens",
    "eval_bytes", "eval_nats"}: the counts are what eval_split_counts() says the split holds."""
    token_bytes = _token_bytes_for(tokenizer)
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    for inputs, targets in _eval_batches(tokenizer, batch_size, backend):
        nats = np.asarray(target_nats(logits_fn(inputs), targets), dtype=np.float64)
        target_bytes = token_bytes[targets]
        counted = target_bytes > 0
        total_nats += float(nats[counted].sum())
        total_bytes += int(target_bytes[counted].sum())
        total_tokens += int(counted.sum())
    if total_bytes == 0:
        raise DataError("the validation tokens have no bytes to score")
    return {"val_bpb": total_nats / (math.log(2) * total_bytes), "eval_scored_tokens": total_tokens,
            "eval_bytes": total_bytes, "eval_nats": total_nats}


EVAL_COUNTS_FILE = "eval_counts.json"  # in the dataset folder: eval_split_counts() per budget


def eval_split_counts(backend=None):
    """{"eval_scored_tokens", "eval_bytes"} an evaluation of the active dataset at
    eval_token_budget(backend) must score: what the runner checks a run's record against.
    Counted once per budget and tokenizer, then read from EVAL_COUNTS_FILE."""
    tokenizer = get_tokenizer()
    directory = dataset_dir()
    tokenizer_file = _tokenizer_dir() / "tokenizer.pkl"
    key = (f"{eval_token_budget(backend)} {tokenizer_file.stat().st_mtime_ns} "
           f"{(directory / VAL_SHARD).stat().st_mtime_ns}")
    path = directory / EVAL_COUNTS_FILE
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), dict):
        return cached[key]
    token_bytes = _token_bytes_for(tokenizer)
    tokens = total_bytes = 0
    for _, targets in _eval_batches(tokenizer, 64, backend):
        target_bytes = token_bytes[targets]
        tokens += int((target_bytes > 0).sum())
        total_bytes += int(target_bytes.sum())
    counts = {"eval_scored_tokens": tokens, "eval_bytes": total_bytes}
    with contextlib.suppress(OSError):  # a read-only cache still answers, it only counts again
        _atomic_write_bytes(path, json.dumps({**(cached if isinstance(cached, dict) else {}),
                                              key: counts}).encode())
    return counts



# ---------------------------------------------------------------------------------------------
# The command


def prepare(name, *, vocab_size=VOCAB_SIZE, **options):
    """Build dataset `name` (dataset_builders.build_dataset: shards, a tokenizer of `vocab_size`
    tokens, the token cache; each step skipped when already up to date) and make it the active
    dataset. Options: source (local), num_shards (climbmix), shard_chars, stdlib_dir, base_url and
    the download options. Returns the dataset.json dict."""
    return build_dataset(name, vocab_size=vocab_size, **options)

class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, systemd, a scheduler) reached the command: stopped like Ctrl-C, exit 143."""


def _raise_terminated(signum, frame):
    raise Terminated


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Build a dataset and its tokenizer for train.py / train_mlx.py, and make it the "
                    "active dataset.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"""environment:
  AUTORESEARCH_CACHE_DIR     where the dataset folders go (default {DEFAULT_CACHE_ROOT})
  {DOWNLOAD_URL_ENV}  replaces the download host of climbmix and tinystories (a mirror)
  AUTORESEARCH_DATASET       not read here: it makes training use another prepared dataset than
                             the one prepared last""")
    parser.add_argument("--dataset", choices=DATASETS, default="climbmix",
                        help="climbmix (download, default), tinystories (download), "
                             "pystdlib (offline: this Python's standard library), local (--source)")
    parser.add_argument("--source", type=Path, help="with --dataset local: folder of "
                        ".txt/.md/.jsonl/.parquet files")
    parser.add_argument("--num-shards", type=int, help=f"with --dataset climbmix: training shards "
                        f"to download (default {CLIMBMIX_DEFAULT_SHARDS})")
    args = parser.parse_args(argv)
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        info = prepare(args.dataset, source=args.source, num_shards=args.num_shards)
    except DataError as error:
        end_progress_line()
        raise SystemExit(f"prepare.py: {error}") from None
    except KeyboardInterrupt as stop:
        end_progress_line()
        print("prepare.py: interrupted. Finished files are kept: run the same command again to "
              "resume.", file=sys.stderr)
        raise SystemExit(143 if isinstance(stop, Terminated) else 130) from None
    except OSError as error:
        end_progress_line()
        raise SystemExit(f"prepare.py: {_out_of_space(error) or error}") from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    print(f"dataset {info['dataset']} ready in {dataset_dir(info['dataset'])} "
          f"({info['seconds']:.1f}s), vocabulary {info['vocab_size']}")
    for split in ("train", "val"):
        figures = info[split]
        print(f"  {split:5s} {figures['docs']:>9,} docs {_human(figures['chars']):>7} chars "
              f"{_human(figures['tokens']):>7} tokens in {figures['shards']} shard(s)")
    if info["skipped"]:
        print(f"  skipped {len(info['skipped'])} unreadable or non-UTF-8 input(s), "
              f"e.g. {info['skipped'][0]}")
    print(f"  active dataset: {info['dataset']} (AUTORESEARCH_DATASET overrides)")


if __name__ == "__main__":
    main()
