"""The locked harness: constants, datasets, tokenizer, dataloader and the one evaluator.

Every experiment is judged by this file, so the agent never edits it (its hash is recorded with
each result). It has two halves:

- a command, `uv run prepare.py --dataset NAME`, that builds a dataset folder once: parquet shards
  with a `text` column, a BPE tokenizer trained on the train split only, and a token cache per
  shard so that training never waits on tokenization;
- a library both training scripts import: the constants, get_tokenizer(), make_dataloader() and
  evaluate_bpb(). Everything is numpy; each script moves the arrays to its own framework.

Datasets: climbmix (default, downloaded), tinystories (downloaded), pystdlib (this interpreter's
standard library: offline), local (--source DIR). Each has the same layout in cache_root()/<name>/:

    train_00000.parquet ...    training shards (`text` column)
    val.parquet                the pinned validation shard; the train loader never opens it
    tokenizer/tokenizer.pkl    pickled tiktoken.Encoding: BPE ranks + SPECIAL_TOKENS
    tokenizer/token_bytes.npy  UTF-8 byte length of every token id, 0 for special tokens
    tokenizer/train_split.key  the train shards and vocabulary size the tokenizer was trained on
    tokens/<shard>.npz         BOS-prefixed token ids per document, valid for one tokenizer+shard
    dataset.json               what was built, from where, how big it is, and its DATASET_FORMAT

Converted datasets (pystdlib, local, tinystories) are read file by file in an order hashed from
the file names, and each shard's documents (val.parquet's too) are shuffled with a seed taken
from the shard's name. In path order, a run would train on one package after another and be
evaluated on the val split's alphabetically first files (pystdlib: asyncio to encodings);
shuffled, both the stream and the evaluated start of val are fair samples, and still the same on
every machine.

cache_root()/active_dataset names the dataset prepared last; AUTORESEARCH_DATASET overrides it.
"""

import argparse
import bisect
import codecs
import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken

# ---------------------------------------------------------------------------------------------
# Constants every experiment shares

MAX_SEQ_LEN = 2048          # context length of every training row and every evaluation row
STANDARD_TIME_BUDGET = 300  # seconds of training in a standard (comparable) run
VOCAB_SIZE = 8192           # BPE vocabulary including the special tokens

# GPT-4's split pattern, except numbers split into groups of at most 2 digits (not 3): with a small
# vocabulary, 3-digit groups would spend ~1000 tokens on numbers alone.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ["<|bos|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>"]
BOS_TOKEN = SPECIAL_TOKENS[0]  # starts every document and every cropped document's rest, so every
                               # row begins at a BOS

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

# ---------------------------------------------------------------------------------------------
# Dataset sources and the on-disk layout

DATASETS = ("climbmix", "tinystories", "pystdlib", "local")
DEFAULT_CACHE_ROOT = Path.home() / ".cache" / "autoresearch"
ACTIVE_DATASET_FILE = "active_dataset"
VAL_SHARD = "val.parquet"
TRAIN_SHARD = "train_{:05d}.parquet"
LOCAL_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
LOCAL_DOC_CHARS = 100_000  # local: a longer text is a concatenation; it is cut into documents
                           # of at most this many chars, at line ends, and read 4 MB at a time
VAL_ONE_IN = 20            # pystdlib and local: about 1 document in 20 goes to validation
SHARD_CHARS = 50_000_000   # converted datasets: start a new train shard after this many chars
ROW_GROUP_DOCS = 1024      # documents per parquet row group (the loader reads one group at a time)
DATASET_FORMAT = 2         # dataset.json "format"; the loader refuses a folder of another format.
                           # 2: converted shards hold their documents in a seeded random order

TOKENIZER_MAX_CHARS = 1_000_000_000  # the tokenizer sees at most this much of the train split
TOKENIZER_DOC_CHARS = 10_000         # ... and at most this much of any one document
TOKENIZE_BATCH_CHARS = 4_000_000     # token cache: chars per encode call (its ids are Python ints)

CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_VAL_SHARD = 6542            # hub shards 0..6541 are train, 6542 is the pinned val shard
CLIMBMIX_DEFAULT_SHARDS = 10
TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"
TINYSTORIES_FILES = {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"}
TINYSTORIES_SEPARATOR = "<|endoftext|>"
DOWNLOAD_URL_ENV = "AUTORESEARCH_DOWNLOAD_URL"  # replaces the hub URL (mirror, or a test server)
DOWNLOAD_WORKERS = 8
DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_BACKOFF_SECONDS = 1.0       # waits 1, 2, 4, 8 s between the attempts of one file
DOWNLOAD_TIMEOUT = (10, 60)          # (connect, read) seconds

NUM_THREADS = os.cpu_count() or 1


class DataError(RuntimeError):
    """Missing, empty or broken data; the message says what to run to fix it."""


def cache_root():
    return Path(os.environ.get("AUTORESEARCH_CACHE_DIR") or DEFAULT_CACHE_ROOT).expanduser()


def _profile():
    profile = os.environ.get("AUTORESEARCH_PROFILE", "").strip().lower() or "standard"
    if profile not in ("smoke", "standard"):
        raise ValueError(f"AUTORESEARCH_PROFILE={profile!r}: use smoke or standard")
    return profile


def is_standard_run():
    """True when the result may be compared with other standard results."""
    return TIME_BUDGET_IS_STANDARD and _profile() != "smoke"


def _check_dataset_name(name, where):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} ({where}): choose one of {', '.join(DATASETS)}")
    return name


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


def _prepare_command(name):
    """The command that (re)builds a dataset, for error messages."""
    command = f"uv run prepare.py --dataset {name}"
    if name == "local":
        info = _read_dataset_info(dataset_dir(name))
        command += f" --source {info.get('source', 'DIR')}"
    return command


def _read_dataset_info(directory):
    try:
        return json.loads((directory / "dataset.json").read_text())
    except (OSError, ValueError):
        return {}


def _train_shards(directory):
    return sorted(directory.glob("train_*.parquet"))


def _split_shards(directory, split):
    if split == "train":
        return _train_shards(directory)
    val = directory / VAL_SHARD
    return [val] if val.exists() else []


def _tmp_path(path):
    """Where path is written before it replaces path. The name holds the process id: training
    ranks may rebuild the same token cache at once."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def _replaced_through_tmp(path):
    """Yield a .tmp path to write; it replaces path only once the block has finished, and it is
    deleted if the block fails (full disk, Ctrl-C), so a failure leaves neither a partial file
    nor a .tmp behind."""
    tmp = _tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write_bytes(path, data):
    with _replaced_through_tmp(path) as tmp:
        tmp.write_bytes(data)


# ---------------------------------------------------------------------------------------------
# Progress: one self-overwriting line on stderr for every long step


def _human(count):
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= limit:
            return f"{count / limit:.1f}{suffix}"
    return f"{count:.3g}" if isinstance(count, float) else str(count)


def _duration(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """done/total, rate and time left, redrawn at most 10 times a second (thread-safe)."""

    def __init__(self, label, total, unit):
        self.label, self.total, self.unit = label, total, unit
        self.done, self.note = 0, ""
        self.start = self.last_draw = time.perf_counter()
        self.lock = threading.Lock()
        self._draw()

    def update(self, count=1, note=None):
        with self.lock:
            self.done += count
            if note is not None:
                self.note = note
            if time.perf_counter() - self.last_draw >= 0.1:
                self._draw()

    def close(self):
        with self.lock:
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _draw(self):
        now = time.perf_counter()
        self.last_draw = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        left = _duration((self.total - self.done) / rate) if rate > 0 else "?"
        line = (f"\r{self.label}: {_human(self.done)}/{_human(self.total)} {self.unit} | "
                f"{_human(rate)} {self.unit}/s | {left} left")
        sys.stderr.write(line + (f" | {self.note}" if self.note else "") + "\033[K")
        sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# Downloads: parallel, retried with exponential backoff, .tmp -> verify -> atomic rename


class DownloadError(DataError):
    pass


def _text_column_problem(schema):
    """Why a parquet schema has no usable `text` column, or None when it has one of strings."""
    if "text" not in schema.names:
        return "no `text` column"
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return f"its `text` column holds {kind}, not strings"
    return None


def _verify_parquet(path, expected_size=None):
    """Raise ValueError unless path is a complete parquet file with a `text` column of strings."""
    if expected_size is not None and path.stat().st_size != expected_size:
        raise ValueError(f"{path.stat().st_size} bytes instead of {expected_size}")
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except (pa.ArrowException, OSError) as error:
        raise ValueError(str(error)) from None
    problem = _text_column_problem(schema)
    if problem:
        raise ValueError(problem)


def _verify_size(path, expected_size=None):
    size = path.stat().st_size
    if (expected_size is not None and size != expected_size) or size == 0:
        raise ValueError(f"{size} bytes instead of {expected_size}")


def download_files(jobs, *, label, workers=DOWNLOAD_WORKERS, attempts=DOWNLOAD_ATTEMPTS,
                   backoff=None):
    """Download [(url, dest, verify)] in parallel threads; return [(dest, reason)] for failures.

    A file lands at dest only after it has been written completely to dest.tmp and verify(tmp,
    expected_size) accepted it, so an interrupted or failed run leaves no partial file. Files
    already at dest that verify are skipped (resume). If the host cannot be reached at all, the
    remaining files are abandoned instead of each waiting through its own retries.
    """
    import requests

    backoff = DOWNLOAD_BACKOFF_SECONDS if backoff is None else backoff
    pending = []
    for url, dest, verify in jobs:
        if dest.exists():
            try:
                verify(dest)
                continue
            except (ValueError, OSError):
                print(f"{dest.name} is incomplete or corrupt: downloading it again",
                      file=sys.stderr)
                dest.unlink()
        pending.append((url, dest, verify))
    if not pending:
        return []

    stop = threading.Event()
    state = {"succeeded": 0, "bytes": 0}
    progress = Progress(label, len(pending), "files")
    started = time.perf_counter()

    def fetch(url, dest, verify):
        """One file, up to `attempts` tries; None on success, else why it failed."""
        tmp = dest.with_name(dest.name + ".tmp")
        reason, unreachable = "not attempted", False
        for attempt in range(attempts):
            if attempt:
                stop.wait(backoff * 2 ** (attempt - 1))
            if stop.is_set():
                return "cancelled"
            unreachable = False
            try:
                with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT) as response:
                    if response.status_code != 200:
                        reason = f"HTTP {response.status_code}"
                        if response.status_code < 500 and response.status_code != 429:
                            return reason  # a 404 does not get better by retrying
                        continue
                    expected = response.headers.get("Content-Length")
                    with open(tmp, "wb") as out:
                        for chunk in response.iter_content(chunk_size=1 << 20):
                            if stop.is_set():
                                break
                            out.write(chunk)
                            with progress.lock:
                                state["bytes"] += len(chunk)
                if stop.is_set():
                    tmp.unlink(missing_ok=True)
                    return "cancelled"
                verify(tmp, int(expected) if expected else None)
                os.replace(tmp, dest)
                with progress.lock:
                    state["succeeded"] += 1
                return None
            except requests.ConnectionError:
                reason, unreachable = f"cannot connect to {urlparse(url).netloc}", True
            except requests.Timeout:
                reason = "timed out"
            except requests.RequestException:
                reason = "connection dropped mid-file"
            except ValueError as error:
                reason = f"incomplete or corrupt file ({error})"
            except OSError as error:
                tmp.unlink(missing_ok=True)
                return f"cannot write {tmp}: {error}"
            tmp.unlink(missing_ok=True)
            if attempt + 1 < attempts:
                progress.update(0, note=f"{dest.name}: {reason}, retrying")
        if unreachable and state["succeeded"] == 0:
            stop.set()  # the host is gone: do not make every other file wait out its retries
        return reason

    failures = []
    executor = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {executor.submit(fetch, *job): job[1] for job in pending}
        for future in as_completed(futures):
            reason = future.result()
            if reason is not None:
                failures.append((futures[future], reason))
            megabytes = state["bytes"] / 1e6
            rate = megabytes / max(time.perf_counter() - started, 1e-9)
            failed = f", {len(failures)} failed" if failures else ""
            progress.update(1, note=f"{megabytes:.0f} MB at {rate:.1f} MB/s{failed}")
    except KeyboardInterrupt:
        stop.set()
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        progress.close()
    return sorted(failures)


def _download_or_fail(jobs, name, label, **download_options):
    failures = download_files(jobs, label=label, **download_options)
    if not failures:
        return
    host = urlparse(jobs[0][0]).netloc
    causes = [reason for _, reason in failures if reason != "cancelled"] or ["cancelled"]
    names = ", ".join(dest.name for dest, _ in failures[:3]) + (" ..." if len(failures) > 3 else "")
    raise DownloadError(
        f"could not download {len(failures)} of {len(jobs)} files from {host} ({names}): "
        f"{causes[-1]}. Finished files are kept: re-run `{_prepare_command(name)}` to resume, "
        "or work offline with `uv run prepare.py --dataset pystdlib`."
    )


def _base_url(default, base_url):
    return (base_url or os.environ.get(DOWNLOAD_URL_ENV) or default).rstrip("/")


def _check_num_shards(num_shards):
    if not 1 <= num_shards <= CLIMBMIX_VAL_SHARD:
        raise DataError(f"--num-shards must be between 1 and {CLIMBMIX_VAL_SHARD}, "
                        f"got {num_shards}")


def download_climbmix(directory, num_shards=CLIMBMIX_DEFAULT_SHARDS, *, base_url=None,
                      **download_options):
    """Hub shards 0..num_shards-1 -> train_XXXXX.parquet, hub shard 6542 -> val.parquet."""
    _check_num_shards(num_shards)
    base = _base_url(CLIMBMIX_URL, base_url)
    wanted = [(index, directory / TRAIN_SHARD.format(index)) for index in range(num_shards)]
    wanted.append((CLIMBMIX_VAL_SHARD, directory / VAL_SHARD))
    jobs = [(f"{base}/shard_{index:05d}.parquet", dest, _verify_parquet) for index, dest in wanted]
    _download_or_fail(jobs, "climbmix", "climbmix download", **download_options)


def download_tinystories(directory, *, base_url=None, shard_chars=SHARD_CHARS, **download_options):
    """The TinyStories V2 (GPT-4) text files, converted to train shards + the official valid file
    as val.parquet."""
    if (directory / VAL_SHARD).exists() and _train_shards(directory):
        shutil.rmtree(directory / "raw", ignore_errors=True)  # left over if a run stopped late
        return
    raw = directory / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    base = _base_url(TINYSTORIES_URL, base_url)
    jobs = [(f"{base}/{filename}", raw / filename, _verify_size)
            for filename in TINYSTORIES_FILES.values()]
    _download_or_fail(jobs, "tinystories", "tinystories download", **download_options)

    def stories(path):
        """The non-empty stories of one file, read 4 MB at a time."""
        progress = Progress(f"converting {path.name}", path.stat().st_size, "bytes")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tail = ""
        with open(path, "rb") as raw_file:
            while chunk := raw_file.read(1 << 22):
                progress.update(len(chunk))
                parts = (tail + decoder.decode(chunk)).split(TINYSTORIES_SEPARATOR)
                tail = parts.pop()  # may be the start of a story that continues in the next chunk
                yield from filter(None, map(str.strip, parts))
        progress.close()
        tail = (tail + decoder.decode(b"", final=True)).strip()
        if tail:
            yield tail

    val_texts = list(stories(raw / TINYSTORIES_FILES["val"]))
    _write_splits(directory, stories(raw / TINYSTORIES_FILES["train"]), val_texts, shard_chars,
                  f"the TinyStories files from {base}")
    shutil.rmtree(raw)


# ---------------------------------------------------------------------------------------------
# Converted datasets: documents -> train shards + val.parquet


def _write_parquet(path, texts):
    """Write a shard through .tmp; keep the old file (and its mtime, which keys the token cache
    and the tokenizer) when the content is unchanged."""
    tmp = _tmp_path(path)
    try:
        pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), tmp,
                       row_group_size=ROW_GROUP_DOCS)
        if path.exists() and path.stat().st_size == tmp.stat().st_size \
                and path.read_bytes() == tmp.read_bytes():
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_shuffled(path, texts):
    """Write a shard with its documents in a random order seeded by the shard's file name."""
    order = np.random.default_rng(_name_hash(path.name)).permutation(len(texts))
    _write_parquet(path, [texts[index] for index in order])


def _write_splits(directory, train_texts, val_texts, shard_chars, what, skipped=()):
    """Write train shards of about shard_chars each, then val.parquet (val_texts is read only
    after train_texts is exhausted), each shuffled (_write_shuffled), and delete train shards
    left from a bigger earlier corpus. `what` names the corpus and `skipped` its unreadable inputs
    in the empty-corpus error."""
    directory.mkdir(parents=True, exist_ok=True)
    shard, chars, count = [], 0, 0
    for text in train_texts:
        shard.append(text)
        chars += len(text)
        if chars >= shard_chars:
            _write_shuffled(directory / TRAIN_SHARD.format(count), shard)
            shard, chars, count = [], 0, count + 1
    if shard:
        _write_shuffled(directory / TRAIN_SHARD.format(count), shard)
        count += 1
    if not count or not val_texts:
        unread = (f"; {len(skipped)} input(s) were skipped as non-UTF-8 or unreadable, e.g. "
                  f"{min(skipped)}: convert them to UTF-8 text" if skipped else "")
        raise DataError(f"empty corpus: {what} gave {count} train shard(s) and {len(val_texts)} "
                        "validation document(s); at least 2 non-empty documents are needed "
                        f"(one to train on, one to validate){unread}")
    for stale in _train_shards(directory)[count:]:
        stale.unlink()
    _write_shuffled(directory / VAL_SHARD, val_texts)


def _name_hash(name):
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def _is_val_document(doc_id):
    """Deterministic split by name: the same document lands in the same split on every machine."""
    return _name_hash(doc_id) % VAL_ONE_IN == 0


def _in_hashed_order(paths, root):
    """The files under root in an order hashed from their relative paths: a package's files
    scatter over the shards instead of filling one (the same order on every machine)."""
    return sorted(paths, key=lambda path: (_name_hash(path.relative_to(root).as_posix()), path))


def _split_documents(documents, val_texts):
    """Yield the train texts of (doc_id, text) documents, appending the val texts to val_texts
    (streaming: only the val split is held in memory). Empty documents are dropped. The latest
    train text is held back one step so that a tiny corpus can still get a val document."""
    held, yielded = None, 0
    for doc_id, text in documents:
        if not text.strip():
            continue
        if _is_val_document(doc_id):
            val_texts.append(text)
            continue
        if held is not None:
            yield held
            yielded += 1
        held = text
    if held is not None and not val_texts:
        val_texts.append(held)
    elif held is not None:
        yield held
        yielded += 1
    if not yielded and len(val_texts) > 1:
        yield from val_texts[1:]
        del val_texts[1:]


def _read_utf8(path, skipped):
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        skipped.append(str(path))
        return None


def _is_utf8(path):
    """True when the whole file decodes as UTF-8 (read 4 MB at a time, nothing kept)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 22):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _cut_long(text):
    """A text as pieces of at most LOCAL_DOC_CHARS chars, each ending at a line end if it can."""
    start = 0
    while len(text) - start > LOCAL_DOC_CHARS:
        end = text.rfind("\n", start, start + LOCAL_DOC_CHARS) + 1 or start + LOCAL_DOC_CHARS
        yield text[start:end]
        start = end
    yield text[start:]


def _text_file_pieces(path):
    """A UTF-8 text file as pieces of at most LOCAL_DOC_CHARS chars (see _cut_long), read 4 MB
    at a time so that a file of any size costs little memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    tail = ""
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            *pieces, tail = _cut_long(tail + decoder.decode(chunk))
            yield from pieces
    yield from _cut_long(tail + decoder.decode(b"", final=True))


def _numbered(document_id, pieces):
    """(id, text) for the pieces of one document: the id alone if it is one piece, else id#N."""
    first = next(pieces, None)
    second = next(pieces, None)
    if second is None:
        if first is not None:
            yield document_id, first
        return
    yield f"{document_id}#0", first
    yield f"{document_id}#1", second
    for number, piece in enumerate(pieces, start=2):
        yield f"{document_id}#{number}", piece


def _running_stdlib_dir():
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(stdlib_dir, skipped):
    """(relative path, source) for every .py file of the standard library, site/dist-packages
    excluded. Files that are not UTF-8 are appended to skipped."""
    paths = _in_hashed_order(stdlib_dir.rglob("*.py"), stdlib_dir)
    progress = Progress("reading the standard library", len(paths), "files")
    for path in paths:
        progress.update(1)
        relative = path.relative_to(stdlib_dir)
        if {"site-packages", "dist-packages"} & set(relative.parts) or not path.is_file():
            continue
        text = _read_utf8(path, skipped)
        if text is not None:
            yield relative.as_posix(), text
    progress.close()


def _parquet_texts(path, skipped):
    """The strings of a parquet file's `text` column, one row group at a time; a file that is not
    parquet or has no such column is appended to skipped instead."""
    try:
        file = pq.ParquetFile(path)
        problem = _text_column_problem(file.schema_arrow)
        if problem:
            skipped.append(f"{path} ({problem})")
            return
        for index in range(file.num_row_groups):
            yield from file.read_row_group(index, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError):
        skipped.append(f"{path} (not a readable parquet file)")


def _jsonl_texts(path, skipped):
    """(line number, text) of each line of a UTF-8 .jsonl file that is a JSON object with a string
    `text`; other non-blank lines are appended to skipped. Read a line at a time."""
    with open(path, "rb") as file:
        for line_number, line in enumerate(file, start=1):
            line = line.decode("utf-8")
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                yield line_number, record["text"]
            elif line.strip():
                skipped.append(f"{path}:{line_number} (not a JSON object with a string `text`)")


def local_documents(source, skipped):
    """(document id, text) from .txt/.md files (one document each), .jsonl files (one document per
    line with a string `text` field) and .parquet files (the `text` column of strings). A text
    longer than LOCAL_DOC_CHARS becomes several documents (id#0, id#1, ...), and every file is
    streamed, so one huge file fits in memory. Hidden files are ignored; inputs that are not
    UTF-8 or cannot be read are appended to skipped."""
    paths = _in_hashed_order((path for path in source.rglob("*")
                              if path.suffix.lower() in LOCAL_SUFFIXES and path.is_file()
                              and not any(part.startswith(".")
                                          for part in path.relative_to(source).parts)), source)
    progress = Progress(f"reading {source}", len(paths), "files")
    for path in paths:
        progress.update(1)
        relative, suffix = path.relative_to(source).as_posix(), path.suffix.lower()
        if suffix == ".parquet":
            for row, text in enumerate(_parquet_texts(path, skipped)):
                if text:
                    yield from _numbered(f"{relative}:{row}", _cut_long(text))
        elif not os.access(path, os.R_OK):
            skipped.append(f"{path} (not readable)")
        elif not _is_utf8(path):
            skipped.append(str(path))
        elif suffix == ".jsonl":
            for line_number, text in _jsonl_texts(path, skipped):
                yield from _numbered(f"{relative}:{line_number}", _cut_long(text))
        else:
            yield from _numbered(relative, _text_file_pieces(path))
    progress.close()


# ---------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A tiktoken Encoding (BPE ranks + SPECIAL_TOKENS) with the few methods the scripts use."""

    def __init__(self, encoding, fingerprint=None):
        self.encoding = encoding
        self.fingerprint = fingerprint  # sha256 of tokenizer.pkl: keys the token cache
        self.bos_token_id = encoding.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, directory):
        data = (directory / "tokenizer.pkl").read_bytes()
        return cls(pickle.loads(data), hashlib.sha256(data).hexdigest()[:16])

    def get_vocab_size(self):
        return self.encoding.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=NUM_THREADS):
        """str -> ids, or list[str] -> list of ids. Special-token strings in the text are plain
        text. prepend: a token id or special-token string put before each text."""
        if prepend is None:
            prefix = []
        elif isinstance(prepend, str):
            prefix = [self.encoding.encode_single_token(prepend)]
        else:
            prefix = [int(prepend)]
        if isinstance(text, str):
            return prefix + self.encoding.encode_ordinary(text)
        if isinstance(text, list):
            batch = self.encoding.encode_ordinary_batch(text, num_threads=num_threads)
            return [prefix + ids for ids in batch]
        raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")

    def decode(self, ids):
        return self.encoding.decode([int(token) for token in ids])


# What unpickling damaged bytes may raise (a truncated or overwritten tokenizer.pkl).
_DAMAGED_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError,
                          AttributeError, KeyError, IndexError, ImportError)
TRAIN_SPLIT_KEY_FILE = "train_split.key"  # in tokenizer/: what the tokenizer was trained on


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


def _train_split_key(directory, vocab_size):
    """What a tokenizer is trained on: the vocabulary size asked for and each train shard's name,
    size and mtime (a rewritten shard gets a new mtime; an unchanged one keeps its file)."""
    shards = [f"{path.name} {path.stat().st_size} {path.stat().st_mtime_ns}"
              for path in _train_shards(directory)]
    return "\n".join([f"vocab_size {vocab_size}", *shards]) + "\n"


def _stale_tokenizer_reason(directory, vocab_size):
    """Why tokenizer/ does not fit the train split now (None when it does): missing or damaged
    files, or a tokenizer trained on other shards (a prepare from another source, interrupted
    after it had rewritten the shards, say)."""
    tokenizer_dir = directory / "tokenizer"
    if not (tokenizer_dir / "tokenizer.pkl").exists():
        return "tokenizer.pkl is missing"
    try:
        tokenizer = Tokenizer.from_directory(tokenizer_dir)
        token_bytes = np.load(tokenizer_dir / "token_bytes.npy")
    except (OSError, *_DAMAGED_PICKLE_ERRORS):
        return "tokenizer.pkl or token_bytes.npy is missing or damaged"
    if len(token_bytes) != tokenizer.get_vocab_size():
        return "token_bytes.npy does not match tokenizer.pkl"
    key = tokenizer_dir / TRAIN_SPLIT_KEY_FILE
    if not key.exists() or key.read_text() != _train_split_key(directory, vocab_size):
        return "it was not trained on the train shards there now"
    return None


def _corrupt_shard(path, name, error):
    return DataError(f"shard {path} is corrupt or truncated ({error}): delete it and re-run "
                     f"`{_prepare_command(name)}`")


def _shard_texts(path, name):
    """Yield a shard's texts one row group at a time; a damaged shard is a DataError."""
    try:
        shard = pq.ParquetFile(path)
        problem = _text_column_problem(shard.schema_arrow)
        if problem:
            raise ValueError(problem)
        for index in range(shard.num_row_groups):
            texts = shard.read_row_group(index, columns=["text"]).column("text").to_pylist()
            yield [text or "" for text in texts]
    except (pa.ArrowException, OSError, KeyError, ValueError) as error:
        raise _corrupt_shard(path, name, error) from None


def train_tokenizer(directory, vocab_size=VOCAB_SIZE):
    """Train BPE on the train shards only and save tokenizer.pkl + token_bytes.npy, then the
    train split's key (written last: a tokenizer without it is never used)."""
    import rustbpe

    name = directory.name
    shards = _train_shards(directory)
    split_key = _train_split_key(directory, vocab_size)
    total_docs = sum(_shard_document_count(path, name) for path in shards)
    progress = Progress("tokenizer: reading train split", total_docs, "docs")
    seen = {"chars": 0, "docs": 0}

    def texts():
        try:
            for path in shards:
                for batch in _shard_texts(path, name):
                    for text in batch:
                        text = text[:TOKENIZER_DOC_CHARS]
                        seen["chars"] += len(text)
                        seen["docs"] += 1
                        progress.update(1)
                        yield text
                        if seen["chars"] >= TOKENIZER_MAX_CHARS:
                            return
        finally:
            progress.close()  # rustbpe now computes the merges, which has no progress to show

    started = time.perf_counter()
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts(), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    specials = {token: len(ranks) + index for index, token in enumerate(SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(name=f"autoresearch-{name}", pat_str=bpe.get_pattern(),
                                 mergeable_ranks=ranks, special_tokens=specials)
    byte_lengths = [len(encoding.decode_single_token_bytes(rank)) for rank in range(len(ranks))]
    token_bytes = np.array(byte_lengths + [0] * len(SPECIAL_TOKENS), dtype=np.int32)

    # Round trip: decode(encode(x)) == x, and special-token text never becomes a special token.
    tokenizer = Tokenizer(encoding)
    sample = next(_shard_texts(shards[0], name))[0][:TOKENIZER_DOC_CHARS]
    checks = [sample, "Hello world! 12345 3.14159", "  indented\n\ttabs\r\nand émoji 🚀 中文",
              f"{BOS_TOKEN} is plain text here"]
    broken = [text for text in checks if tokenizer.decode(tokenizer.encode(text)) != text]
    if sorted(ranks.values()) != list(range(len(ranks))) \
            or tokenizer.get_bos_token_id() in tokenizer.encode(checks[-1]):
        broken.append("the token ids")
    if broken:
        raise DataError(f"the trained tokenizer fails its round-trip check on {broken[0][:60]!r}: "
                        f"delete {directory / 'tokenizer'} and re-run `{_prepare_command(name)}`")

    out = directory / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    (out / TRAIN_SPLIT_KEY_FILE).unlink(missing_ok=True)
    _atomic_write_bytes(out / "tokenizer.pkl", pickle.dumps(encoding))
    with _replaced_through_tmp(out / "token_bytes.npy") as tmp, open(tmp, "wb") as file:
        np.save(file, token_bytes)
    _atomic_write_bytes(out / TRAIN_SPLIT_KEY_FILE, split_key.encode())
    note = "" if len(ranks) + len(SPECIAL_TOKENS) == vocab_size else (
        f" (asked for {vocab_size}: these chars, at most {TOKENIZER_DOC_CHARS:,} from each of "
        f"{seen['docs']:,} documents, hold no more pairs to merge; more, or more varied, text "
        "fills the vocabulary)")
    print(f"tokenizer: {encoding.n_vocab} tokens from {_human(seen['chars'])} chars "
          f"in {time.perf_counter() - started:.1f}s{note}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Token cache: every document pre-tokenized once, so the loader only slices arrays


def _token_cache_path(shard):
    return shard.parent / "tokens" / f"{shard.stem}.npz"


def _token_cache_key(shard, tokenizer):
    stat = shard.stat()
    return f"{tokenizer.fingerprint}:{stat.st_size}:{stat.st_mtime_ns}"


def _read_token_cache(shard, tokenizer, arrays=("tokens", "offsets")):
    """The shard's cached arrays, or None if the cache is missing, damaged or for another
    tokenizer or another version of the shard."""
    path = _token_cache_path(shard)
    if tokenizer.fingerprint is None or not path.exists():
        return None
    try:
        with np.load(path) as cache:
            if str(cache["key"]) != _token_cache_key(shard, tokenizer):
                return None
            return {array: cache[array] for array in arrays}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def build_token_cache(directory, tokenizer):
    """Tokenize every shard whose cache is missing or stale: tokens (BOS before each document)
    and offsets (document i is tokens[offsets[i]:offsets[i+1]])."""
    name = directory.name
    shards = _split_shards(directory, "train") + _split_shards(directory, "val")
    for orphan in (directory / "tokens").glob("*.npz"):
        if not (directory / f"{orphan.stem}.parquet").exists():
            orphan.unlink()
    _tokenize_shards(_stale_token_caches(shards, tokenizer), name, tokenizer)


def _stale_token_caches(shards, tokenizer):
    """The shards whose token cache is missing, damaged or for another tokenizer."""
    return [shard for shard in shards if _read_token_cache(shard, tokenizer, arrays=()) is None]


def _batches_of_chars(texts, max_chars):
    """texts in consecutive lists of about max_chars chars (at least one text each)."""
    batch, chars = [], 0
    for text in texts:
        if batch and chars + len(text) > max_chars:
            yield batch
            batch, chars = [], 0
        batch.append(text)
        chars += len(text)
    if batch:
        yield batch


def _tokenize_shards(stale, name, tokenizer):
    """Write the token cache of each shard in stale."""
    if not stale:
        return
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
    total_docs = sum(_shard_document_count(shard, name) for shard in stale)
    progress = Progress("tokenizing shards", total_docs, "docs")
    bos = tokenizer.get_bos_token_id()
    for shard in stale:
        pieces, lengths, chars = [], [], 0
        for texts in _shard_texts(shard, name):
            for batch in _batches_of_chars(texts, TOKENIZE_BATCH_CHARS):
                chars += sum(map(len, batch))
                for ids in tokenizer.encode(batch, prepend=bos):
                    pieces.append(np.array(ids, dtype=dtype))
                    lengths.append(len(ids))
                progress.update(len(batch))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
        path = _token_cache_path(shard)
        path.parent.mkdir(exist_ok=True)
        with _replaced_through_tmp(path) as tmp, open(tmp, "wb") as file:
            np.savez(file, tokens=tokens, offsets=offsets, chars=np.int64(chars),
                     key=np.str_(_token_cache_key(shard, tokenizer)))
    progress.close()


# ---------------------------------------------------------------------------------------------
# Dataloader: BOS-aligned best-fit packing


def _shard_document_count(shard, name):
    try:
        return pq.ParquetFile(shard).metadata.num_rows
    except (pa.ArrowException, OSError) as error:
        raise _corrupt_shard(shard, name, error) from None


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


def _describe(directory, tokenizer):
    """dataset.json figures per split, from the token cache."""
    figures = {}
    for split in ("train", "val"):
        docs = tokens = chars = 0
        shards = _split_shards(directory, split)
        for shard in shards:
            cache = _read_token_cache(shard, tokenizer, arrays=("offsets", "chars"))
            docs += len(cache["offsets"]) - 1
            tokens += int(cache["offsets"][-1])
            chars += int(cache["chars"])
        figures[split] = {"shards": len(shards), "docs": docs, "chars": chars, "tokens": tokens}
    return figures


def prepare(name, *, source=None, num_shards=None, vocab_size=VOCAB_SIZE, shard_chars=SHARD_CHARS,
            stdlib_dir=None, base_url=None, **download_options):
    """Build dataset `name` in dataset_dir(name) and make it the active dataset. Each step is
    skipped when its output is already there and up to date. Returns the dataset.json dict."""
    _check_dataset_name(name, "--dataset")
    if num_shards is not None and name != "climbmix":
        raise DataError("--num-shards only applies to --dataset climbmix")
    if name == "local" and source is None:
        raise DataError("--dataset local needs --source DIR "
                        "(a folder of .txt/.md/.jsonl/.parquet files)")
    if name != "local" and source is not None:
        raise DataError("--source only applies to --dataset local")
    if name == "climbmix":
        num_shards = CLIMBMIX_DEFAULT_SHARDS if num_shards is None else num_shards
        _check_num_shards(num_shards)
    if name == "local":
        source = Path(source).expanduser().resolve()
        if not source.is_dir():
            raise DataError(f"--source {source} is not a directory")
    started = time.perf_counter()
    directory = cache_root() / name
    _make_dataset_dir(directory)
    for leftover in directory.rglob("*.tmp"):
        leftover.unlink()

    skipped = []
    if name == "climbmix":
        origin = _base_url(CLIMBMIX_URL, base_url)
        download_climbmix(directory, num_shards, base_url=base_url, **download_options)
    elif name == "tinystories":
        origin = _base_url(TINYSTORIES_URL, base_url)
        download_tinystories(directory, base_url=base_url, shard_chars=shard_chars,
                             **download_options)
    elif name == "pystdlib":
        stdlib_dir = Path(stdlib_dir or _running_stdlib_dir())
        origin = str(stdlib_dir)
        val_texts = []
        train_texts = _split_documents(stdlib_documents(stdlib_dir, skipped), val_texts)
        _write_splits(directory, train_texts, val_texts, shard_chars,
                      f"the standard library in {stdlib_dir}", skipped)
    else:
        origin = str(source)
        val_texts = []
        train_texts = _split_documents(local_documents(source, skipped), val_texts)
        _write_splits(directory, train_texts, val_texts, shard_chars,
                      f"{source} ({'/'.join(LOCAL_SUFFIXES)} files)", skipped)

    tokenizer_dir = directory / "tokenizer"
    stale = _stale_tokenizer_reason(directory, vocab_size)
    if stale:
        if tokenizer_dir.exists():
            print(f"tokenizer: {stale}: training it again", file=sys.stderr)
        train_tokenizer(directory, vocab_size)
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    build_token_cache(directory, tokenizer)

    info = {"dataset": name, "format": DATASET_FORMAT, "source": origin,
            "vocab_size": tokenizer.get_vocab_size(),
            "skipped": sorted(skipped), **_describe(directory, tokenizer)}
    _atomic_write_bytes(directory / "dataset.json", json.dumps(info, indent=2).encode())
    _atomic_write_bytes(cache_root() / ACTIVE_DATASET_FILE, f"{name}\n".encode())
    info["seconds"] = time.perf_counter() - started
    return info


def _make_dataset_dir(directory):
    """Create the dataset folder, or say in one line why the cache root cannot hold it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass  # the folder may exist and still refuse new files
    except (FileExistsError, NotADirectoryError):
        blocker = next(path for path in (directory, *directory.parents) if path.exists())
        raise DataError(f"cannot create {directory}: {blocker} is a file, not a folder; set "
                        "AUTORESEARCH_CACHE_DIR to a folder") from None
    except OSError as error:
        raise DataError(f"cannot write in {directory} ({error.strerror}); set "
                        "AUTORESEARCH_CACHE_DIR to a writable folder") from None


def _out_of_space(error):
    """The one line for a write that failed for want of space, or None for another failure.
    pyarrow's errors carry the errno in their text only."""
    root = cache_root()
    if error.errno == errno.EFBIG or "File too large" in str(error):
        why, fix = "a file reached the file size limit (`ulimit -f`)", "raise the limit"
    elif error.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error) \
            or "quota exceeded" in str(error).lower():
        existing = next(path for path in (root, *root.parents) if path.exists())
        free = shutil.disk_usage(existing).free
        why = f"the disk is full ({_human(free)}B free)"
        fix = "free some space or set AUTORESEARCH_CACHE_DIR to a larger disk"
    else:
        return None
    return (f"no room to write in {root}: {why}; {fix}, then run the same command again "
            "(finished files are kept)")


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
    try:
        info = prepare(args.dataset, source=args.source, num_shards=args.num_shards)
    except DataError as error:
        raise SystemExit(f"prepare.py: {error}") from None
    except KeyboardInterrupt:
        print("prepare.py: interrupted. Finished files are kept: run the same command again to "
              "resume.", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as error:
        raise SystemExit(f"prepare.py: {_out_of_space(error) or error}") from None
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
