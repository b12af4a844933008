"""Bad input and faults (SPEC §11), each run as a user runs it: `python prepare.py ...` or a
training script in a subprocess, on a temporary AUTORESEARCH_CACHE_DIR. Every test asserts the one
line the user reads, the exit status, and that nothing is lost or left behind (no .tmp file, no
half-written cache). docs/faults.md lists the cases with their messages."""

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dataset_builders
from backends.report import parse_summary
from conftest import REPO_ROOT, generated_documents

RUN_TIMEOUT = 240
ON_LINUX = sys.platform.startswith("linux")  # where the kernel enforces RLIMIT_AS and RLIMIT_FSIZE


def run(args, env, *, cwd=REPO_ROOT, limits=(), timeout=RUN_TIMEOUT):
    """python ARGS with a clean AUTORESEARCH_* environment plus env; limits: (resource, value)
    pairs set in the child before it starts (a hard address-space or file-size limit)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    full_env.update(env, PYTHONPATH=str(REPO_ROOT))

    def set_limits():
        for limit, value in limits:
            resource.setrlimit(limit, (value, value))

    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout,
                          preexec_fn=set_limits if limits else None)


def last_line(stream):
    """The last line a user sees (progress lines redraw themselves with '\\r')."""
    return stream.replace("\r", "\n").strip().splitlines()[-1]


def check_one_line(result, status, expected_start):
    assert result.returncode == status, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "nanobind" not in result.stderr
    line = last_line(result.stderr)
    assert line.startswith(expected_start), line
    return line


def tmp_files(root):
    return sorted(str(path) for path in root.rglob("*.tmp"))


def write_corpus(directory, count, seed):
    directory.mkdir(parents=True)
    for index, text in enumerate(generated_documents(count, seed=seed)):
        (directory / f"doc_{index:03d}.txt").write_text(text, encoding="utf-8")
    return directory


def prepare_local(cache, source, limits=()):
    return run(["prepare.py", "--dataset", "local", "--source", source],
               {"AUTORESEARCH_CACHE_DIR": str(cache)}, limits=limits)


def tokenizer_bytes(cache):
    return (cache / "local" / "tokenizer" / "tokenizer.pkl").read_bytes()


def dataset_figures(cache):
    info = json.loads((cache / "local" / "dataset.json").read_text())
    return info["source"], info["vocab_size"], info["train"], info["val"]


@pytest.fixture
def corpus_a(tmp_path):
    return write_corpus(tmp_path / "corpus_a", 60, seed=11)


@pytest.fixture
def corpus_b(tmp_path):
    return write_corpus(tmp_path / "corpus_b", 50, seed=12)


@pytest.fixture
def fresh_a(tmp_path, corpus_a):
    """corpus_a prepared once, from scratch, by the command."""
    cache = tmp_path / "fresh_a"
    assert prepare_local(cache, corpus_a).returncode == 0
    return cache


# ---------------------------------------------------------------------------------------------
# prepare.py


def test_prepare_repairs_a_corrupt_tokenizer(tmp_path, corpus_a, fresh_a):
    cache = tmp_path / "cache"
    shutil.copytree(fresh_a, cache)
    (cache / "local" / "tokenizer" / "tokenizer.pkl").write_bytes(b"\x80\x04not a pickle")
    result = prepare_local(cache, corpus_a)
    assert result.returncode == 0, result.stderr
    assert "tokenizer: tokenizer.pkl or token_bytes.npy is missing or damaged: training it again" \
        in result.stderr
    assert tokenizer_bytes(cache) == tokenizer_bytes(fresh_a)
    assert dataset_figures(cache) == dataset_figures(fresh_a)
    assert tmp_files(cache) == []


def test_prepare_resumed_with_another_source_keeps_nothing_of_the_first(tmp_path, corpus_a,
                                                                         corpus_b, fresh_a):
    fresh_b = tmp_path / "fresh_b"
    assert prepare_local(fresh_b, corpus_b).returncode == 0
    cache = tmp_path / "cache"
    shutil.copytree(fresh_a, cache)
    # B's shards are written, then Ctrl-C arrives while the tokenizer trains on them.
    interrupted = run(["-c", "import dataset_builders, prepare\n"
                             "def interrupted(*args, **kwargs):\n"
                             "    raise KeyboardInterrupt\n"
                             "dataset_builders.train_tokenizer = interrupted\n"
                             "prepare.main(['--dataset', 'local', '--source', "
                             f"{str(corpus_b)!r}])"],
                      {"AUTORESEARCH_CACHE_DIR": str(cache)})
    check_one_line(interrupted, 130, "prepare.py: interrupted. Finished files are kept")
    assert tokenizer_bytes(cache) == tokenizer_bytes(fresh_a)  # still A's, for now

    resumed = prepare_local(cache, corpus_b)
    assert resumed.returncode == 0, resumed.stderr
    assert "tokenizer: it was not trained on the train shards there now: training it again" \
        in resumed.stderr
    assert tokenizer_bytes(cache) == tokenizer_bytes(fresh_b) != tokenizer_bytes(fresh_a)
    assert dataset_figures(cache) == dataset_figures(fresh_b)  # same source, tokens and docs
    assert tmp_files(cache) == []


def test_a_parquet_text_column_of_another_type_is_skipped_and_counted(tmp_path, corpus_a):
    pq.write_table(pa.table({"text": pa.array([1, 2, 3])}), corpus_a / "numbers.parquet")
    cache = tmp_path / "cache"
    result = prepare_local(cache, corpus_a)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    reason = f"{corpus_a / 'numbers.parquet'} (its `text` column holds int64, not strings)"
    assert f"skipped 1 unreadable or non-UTF-8 input(s), e.g. {reason}" in result.stdout
    assert json.loads((cache / "local" / "dataset.json").read_text())["skipped"] == [reason]


def test_a_huge_file_is_streamed_in_documents_and_a_short_vocabulary_says_why(tmp_path):
    # One file of ~1 MB (10 x LOCAL_DOC_CHARS) among 20 small ones; the old code made it one
    # document, of which the tokenizer saw its first TOKENIZER_DOC_CHARS only.
    source = write_corpus(tmp_path / "corpus", 20, seed=13)
    huge = "\n".join(generated_documents(600, seed=14))[:10 * dataset_builders.LOCAL_DOC_CHARS]
    assert len(huge) == 10 * dataset_builders.LOCAL_DOC_CHARS
    (source / "huge.txt").write_text(huge, encoding="utf-8")
    cache = tmp_path / "cache"
    result = prepare_local(cache, source)
    assert result.returncode == 0, result.stderr
    train, val = (pq.read_table(cache / "local" / name).column("text").to_pylist()
                  for name in ("train_00000.parquet", "val.parquet"))
    pieces = [text for text in train + val if text in huge]
    assert len(train) + len(val) == 20 + len(pieces) and len(pieces) >= 10
    assert all(len(piece) <= dataset_builders.LOCAL_DOC_CHARS and piece.endswith("\n")
               for piece in sorted(pieces, key=huge.index)[:-1])  # cut at line ends
    assert "".join(sorted(pieces, key=huge.index)) == huge  # and nothing lost
    tokenizer_line = next(line for line in result.stderr.replace("\r", "\n").splitlines()
                          if line.startswith("tokenizer: ") and " tokens from " in line)
    seen_docs = len(train)
    assert f"at most 10,000 from each of {seen_docs:,} documents, hold no more pairs to merge" \
        in tokenizer_line
    assert "the corpus has no more pairs to merge" not in tokenizer_line


def test_a_malformed_time_budget_stops_prepare_with_one_line(tmp_path, corpus_a):
    result = run(["prepare.py", "--dataset", "local", "--source", corpus_a],
                 {"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache"),
                  "AUTORESEARCH_TIME_BUDGET": "abc"})
    line = check_one_line(result, 1, "prepare.py: AUTORESEARCH_TIME_BUDGET='abc' is not a number")
    assert result.stderr.strip() == line
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_a_cache_root_that_is_a_file_or_unwritable_is_one_line(tmp_path, corpus_a, kind):
    if kind == "file":
        root = tmp_path / "not_a_folder"
        root.write_text("a file")
        expected = f"prepare.py: cannot create {root}/local: {root} is a file, not a folder"
    elif os.geteuid() != 0:
        root = tmp_path / "read_only"
        root.mkdir()
        root.chmod(0o555)
        expected = f"prepare.py: cannot write in {root}/local"
    elif ON_LINUX:
        root = "/sys/autoresearch"  # root may write anywhere but in sysfs
        expected = f"prepare.py: cannot write in {root}/local"
    else:
        pytest.skip("root can write in any folder here")
    result = run(["prepare.py", "--dataset", "local", "--source", corpus_a],
                 {"AUTORESEARCH_CACHE_DIR": str(root)})
    line = check_one_line(result, 1, expected)
    assert line.endswith("AUTORESEARCH_CACHE_DIR to a folder") if kind == "file" \
        else line.endswith("AUTORESEARCH_CACHE_DIR to a writable folder")
    if kind == "file":
        assert root.read_text() == "a file"


def test_a_binary_active_dataset_file_is_one_line_and_prepare_rewrites_it(tmp_path, corpus_a,
                                                                          fresh_a):
    cache = tmp_path / "cache"
    shutil.copytree(fresh_a, cache)
    (cache / "active_dataset").write_bytes(bytes(range(128, 256)))
    result = run(["train_mlx.py"], {"AUTORESEARCH_CACHE_DIR": str(cache),
                                    "AUTORESEARCH_PROFILE": "smoke"})
    check_one_line(result, 2, f"error: {cache / 'active_dataset'} names no dataset (binary data): "
                              "run `uv run prepare.py --dataset NAME` to rewrite it")
    assert prepare_local(cache, corpus_a).returncode == 0
    assert (cache / "active_dataset").read_text() == "local\n"


@pytest.mark.skipif(not ON_LINUX, reason="needs the kernel's file size limit (RLIMIT_FSIZE)")
def test_a_full_disk_is_one_line_and_leaves_no_tmp_behind(tmp_path, corpus_a, fresh_a):
    # No file may grow past 16 kB: the first train shard cannot be written. Python ignores
    # SIGXFSZ, so the write fails with EFBIG, as it fails with ENOSPC on a full disk.
    cache = tmp_path / "cache"
    result = prepare_local(cache, corpus_a, limits=[(resource.RLIMIT_FSIZE, 16_000)])
    line = check_one_line(result, 1, f"prepare.py: no room to write in {cache}: ")
    assert line.endswith("then run the same command again (finished files are kept)")
    assert tmp_files(cache) == [] and not list(cache.rglob("*.parquet"))
    resumed = prepare_local(cache, corpus_a)
    assert resumed.returncode == 0, resumed.stderr
    assert tokenizer_bytes(cache) == tokenizer_bytes(fresh_a)


def test_the_disk_full_line_says_how_much_is_free(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    free = shutil.disk_usage(tmp_path).free
    line = dataset_builders._out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert line.startswith(f"no room to write in {tmp_path / 'cache'}: the disk is full (")
    assert f"({dataset_builders._human(free)}B free); free some space or set AUTORESEARCH_CACHE_DIR" in line
    assert dataset_builders._out_of_space(OSError(errno.EACCES, "Permission denied")) is None


def test_zero_shards_is_refused_before_anything_is_made(tmp_path):
    result = run(["prepare.py", "--num-shards", "0"],
                 {"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache"),
                  dataset_builders.DOWNLOAD_URL_ENV: "http://127.0.0.1:9"})  # nothing listens there
    line = check_one_line(result, 1, "prepare.py: --num-shards must be between 1 and 6542, got 0")
    assert result.stderr.strip() == line
    assert not (tmp_path / "cache").exists()


def test_a_corpus_of_only_non_utf8_files_says_they_were_skipped(tmp_path):
    source = tmp_path / "corpus"
    source.mkdir()
    (source / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (source / "latin1.md").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    result = prepare_local(tmp_path / "cache", source)
    line = check_one_line(result, 1, "prepare.py: empty corpus: ")
    assert line.endswith(f"; 2 input(s) were skipped as non-UTF-8 or unreadable, e.g. "
                         f"{source / 'binary.txt'}: convert them to UTF-8 text")
    assert tmp_files(tmp_path / "cache") == []


# ---------------------------------------------------------------------------------------------
# Damaged datasets, found by the training scripts before they train


@pytest.fixture
def damaged_dataset(tiny_dataset, tmp_path):
    """A private copy of the tiny dataset (mtimes kept) and the environment to train on it."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_dataset.cache_dir, cache)
    return cache / "local", {**tiny_dataset.env, "AUTORESEARCH_CACHE_DIR": str(cache),
                             "AUTORESEARCH_RUNS_DIR": str(tmp_path / "runs")}


def test_a_truncated_token_cache_is_rebuilt_with_a_warning(damaged_dataset, tmp_path):
    directory, env = damaged_dataset
    cache_file = directory / "tokens" / "train_00001.npz"
    intact = dict(np.load(cache_file))
    cache_file.write_bytes(cache_file.read_bytes()[:1000])
    result = run(["train_mlx.py"], {**env, "AUTORESEARCH_TIME_BUDGET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: the token cache of train_00001.parquet is missing or damaged: rebuilding it" \
        in result.stderr
    rebuilt = np.load(cache_file)
    assert all(np.array_equal(rebuilt[key], value) for key, value in intact.items())
    assert parse_summary(result.stdout)["data_wait_percent"] < 50
    assert tmp_files(directory) == []


@pytest.mark.parametrize("damage", ["token_bytes.npy missing", "val shard truncated"])
def test_a_damaged_evaluation_input_stops_the_run_before_training(damaged_dataset, tmp_path,
                                                                  tiny_dataset, damage):
    directory, env = damaged_dataset
    if damage == "token_bytes.npy missing":
        (directory / "tokenizer" / "token_bytes.npy").unlink()
        expected = "error: no token_bytes.npy for dataset 'local': run `uv run prepare.py"
    else:
        val = directory / "val.parquet"
        val.write_bytes(val.read_bytes()[:-100])
        expected = f"error: shard {val} is corrupt or truncated"
    result = run(["train_mlx.py"], {**env, "AUTORESEARCH_TIME_BUDGET": "60"})
    check_one_line(result, 2, expected)
    assert "step 00000" not in result.stdout  # refused before the first step, not after 60 s
    assert f"--dataset local --source {tiny_dataset.source}`" in result.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# train.py and train_mlx.py


def edited_script(script, tmp_path, replacements):
    """A copy of the script in tmp_path with constants replaced, as an agent's edit would."""
    source = (REPO_ROOT / script).read_text()
    for old, new in replacements.items():
        assert f"\n{old}" in source, old
        source = source.replace(f"\n{old}", f"\n{new}")
    path = tmp_path / script
    path.write_text(source)
    return path


def smoke_env(tiny_dataset, tmp_path, script, **extra):
    env = {**tiny_dataset.env, "AUTORESEARCH_RUNS_DIR": str(tmp_path / "runs"), **extra}
    if script == "train.py":
        env["AUTORESEARCH_BACKEND"] = "cpu"
    return env


@pytest.mark.parametrize("script", [pytest.param("train.py", marks=pytest.mark.slow), "train_mlx.py"])
def test_ctrl_c_is_one_line_exit_130_and_no_library_noise(tiny_dataset, tmp_path, script):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(smoke_env(tiny_dataset, tmp_path, script, AUTORESEARCH_TIME_BUDGET="120"),
               PYTHONPATH=str(REPO_ROOT))
    # Ctrl-C's default action in the child, even if this process was started with it ignored.
    with subprocess.Popen([sys.executable, script], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as child:
        seen = b""
        while b"\rstep 00002" not in seen:  # in the loop, with the collector frozen
            chunk = child.stdout.read1(4096)
            assert chunk, child.stderr.read().decode()[-3000:]
            seen += chunk
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=RUN_TIMEOUT)
    assert child.returncode == 130
    lines = stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted at step ")
    step = int(lines[0].removeprefix("interrupted at step ").removesuffix(": nothing recorded"))
    assert step >= 2 and f"\rstep {step - 1:05d}".encode() in seen + stdout
    assert parse_summary((seen + stdout).decode()) is None
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not ON_LINUX, reason="needs the kernel's address-space limit (RLIMIT_AS)")
@pytest.mark.parametrize("script", ["train.py", "train_mlx.py"])
def test_a_model_too_big_for_memory_is_refused_with_one_line(tiny_dataset, tmp_path, script):
    # ASPECT_RATIO = 8192 under `ulimit -v 8000000`: MLX would segfault without the check.
    path = edited_script(script, tmp_path, {'ASPECT_RATIO = SUGGESTED["aspect_ratio"]':
                                            "ASPECT_RATIO = 8192"})
    result = run([path], smoke_env(tiny_dataset, tmp_path, script), cwd=tmp_path,
                 limits=[(resource.RLIMIT_AS, 8_000_000 * 1024)])
    line = check_one_line(result, 1, "out of memory: the run had 7.6 GiB (the address-space "
                                     "limit, ulimit -v) and the model's ")
    assert line.endswith(" to train; lower ASPECT_RATIO or DEPTH")
    assert result.stderr.strip() == line
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.skipif(not ON_LINUX, reason="needs the kernel's address-space limit (RLIMIT_AS)")
def test_out_of_memory_in_a_step_names_the_batch_constant(tiny_dataset, tmp_path):
    # The model fits; one micro-batch of 256 rows of 2048 tokens does not fit in 4 GB.
    path = edited_script("train.py", tmp_path, {
        'SEQ_LEN = SUGGESTED["seq_len"]': "SEQ_LEN = 2048",
        'DEVICE_BATCH_SIZE = SUGGESTED["device_batch_size"]': "DEVICE_BATCH_SIZE = 256",
        'TOTAL_BATCH_SIZE = SUGGESTED["total_batch_size"]': "TOTAL_BATCH_SIZE = 256 * 2048"})
    result = run([path], smoke_env(tiny_dataset, tmp_path, "train.py"), cwd=tmp_path,
                 limits=[(resource.RLIMIT_AS, 4_000_000 * 1024)])
    line = check_one_line(result, 1, "out of memory: the run had 3.8 GiB (the address-space "
                                     "limit, ulimit -v) and the model's ")
    assert re.search(r"'s 0\.\dM parameters need at least \d MiB to train; "
                     r"lower DEVICE_BATCH_SIZE$", line), line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("backend", ["cuda", "mps", "tpu"])
def test_train_mlx_refuses_a_backend_it_does_not_run(tiny_dataset, tmp_path, backend):
    result = run(["train_mlx.py"], smoke_env(tiny_dataset, tmp_path, "train_mlx.py",
                                             AUTORESEARCH_BACKEND=backend))
    if backend == "tpu":
        expected = "error: AUTORESEARCH_BACKEND='tpu' is not a backend"
    else:
        expected = (f"error: AUTORESEARCH_BACKEND='{backend}' but train_mlx.py trains with MLX "
                    f"only: run `uv run train.py` for {backend}, or unset AUTORESEARCH_BACKEND")
    line = check_one_line(result, 2, expected)
    assert result.stderr.strip() == line and result.stdout == ""


def test_train_mlx_evaluates_the_tier_of_the_backend_that_trains(tiny_dataset, tmp_path):
    # An H100 machine: auto would pick CUDA there, whose tier evaluates 20,971,520 tokens (hours
    # for MLX on the CPU). train_mlx.py trains the CPU tier, so it evaluates the CPU tier's budget,
    # here cut to 2 rows so that the test takes seconds.
    script = "\n".join([
        "from backends import hardware, tiers",
        "tiers.CPU_TIER.update(eval_tokens=2 * 2048, eval_batch_size=2)",
        "h100 = {'name': 'NVIDIA H100 80GB HBM3', 'sm_count': 132, 'memory_bytes': 80 * 2**30,",
        "        'capability': (9, 0), 'count': 1}",
        "info = hardware.read_hardware_info(cuda_reader=lambda: h100)",
        "hardware._cached_hardware_info = lambda: info",
        "hardware.DEFAULT_PROBES['cuda'] = lambda: True",
        "import train_mlx as script",  # the standard profile: the CPU tier's configuration
        "assert script.SUGGESTED['tier'] == 'cpu', script.SUGGESTED",
        "script.DEPTH, script.ASPECT_RATIO, script.HEAD_DIM = 2, 32, 32",
        "script.WINDOW_PATTERN = 'L'",
        "script.SEQ_LEN, script.DEVICE_BATCH_SIZE, script.TOTAL_BATCH_SIZE = 64, 2, 128",
        "script.UNTIMED_STEPS, script.TIME_BUDGET = 1, 1e-9",  # two steps, then the evaluation
        "script.main()",
    ])
    env = {k: v for k, v in tiny_dataset.env.items() if k != "AUTORESEARCH_PROFILE"}
    result = run(["-c", script], {**env, "AUTORESEARCH_RUNS_DIR": str(tmp_path / "runs")})
    assert result.returncode == 0, result.stderr[-3000:]
    fields = parse_summary(result.stdout)
    assert fields["eval_tokens"] == 2 * 2048 and fields["profile"] == "standard"
    assert fields["chip"] == "NVIDIA H100 80GB HBM3"
    assert "evaluation: 4,096 tokens" in result.stdout


def test_pyproject_asks_for_the_torch_that_train_py_needs():
    # train.py's evaluation uses torch.compiler.set_stance, new in torch 2.6.
    assert '"torch>=2.6",' in (REPO_ROOT / "pyproject.toml").read_text()
    assert "torch.compiler.set_stance(" in (REPO_ROOT / "train.py").read_text()
    assert '{ name = "torch", specifier = ">=2.6" }' in (REPO_ROOT / "uv.lock").read_text()
