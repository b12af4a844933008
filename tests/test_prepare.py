"""prepare.py: constants, datasets, tokenizer, the packing dataloader, bad input (evaluate_bpb: test_evaluation.py).

The dataloader is checked batch for batch against reference_rows(), a deliberately plain version
of the packing rule (lists and linear scans) fed by its own reading of the parquet shards.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dataset_builders
import prepare
from conftest import REPO_ROOT, generated_documents


# ---------------------------------------------------------------------------------------------
# Reference implementation of the packing rule


def reference_documents(directory, split, tokenizer):
    """All documents of a split, in order, BOS first, read straight from the parquet files."""
    names = sorted(path.name for path in directory.glob("train_*.parquet")) if split == "train" \
        else ["val.parquet"]
    documents = []
    for name in names:
        for text in pq.read_table(directory / name).column("text").to_pylist():
            documents.append([tokenizer.get_bos_token_id()] + tokenizer.encode(text))
    return documents


def reference_rows(documents, row_len, buffer_size, bos):
    """Yield (row, epoch). To fill a row: top the buffer up to buffer_size documents (the stream of
    documents repeats forever, numbering its passes), put in the largest document that fits, and
    when none fits, the beginning of the shortest one, cut to fill the row; the rest of it, behind
    a bos, joins the end of the buffer. epoch: the latest pass that a document put in a row so far
    came from."""
    buffer_size = min(buffer_size, len(documents))
    buffer, next_document, epoch = [], 0, 1
    while True:
        row = []
        while len(row) < row_len:
            while len(buffer) < buffer_size:
                document_pass = next_document // len(documents) + 1
                buffer.append((documents[next_document % len(documents)], document_pass))
                next_document += 1
            space = row_len - len(row)
            fitting = [i for i in range(len(buffer)) if len(buffer[i][0]) <= space]
            if fitting:
                document, document_pass = buffer.pop(max(fitting, key=lambda i: len(buffer[i][0])))
            else:
                document, document_pass = buffer.pop(min(range(len(buffer)), key=lambda i: len(buffer[i][0])))
                buffer.append(([bos] + document[space:], document_pass))
            row += document[:space]
            epoch = max(epoch, document_pass)
        yield row, epoch


def reference_batches(documents, B, T, buffer_size, bos, world_size=1):
    rows = reference_rows(documents, T + 1, buffer_size, bos)
    while True:
        batch = [next(rows) for _ in range(B * world_size)]
        array = np.array([row for row, _ in batch], dtype=np.int64)
        yield array[:, :-1], array[:, 1:], batch[-1][1]


@pytest.fixture
def tokenizer(tiny_env):
    return prepare.get_tokenizer()


@pytest.fixture
def dataset_path(tiny_dataset):
    return tiny_dataset.cache_dir / tiny_dataset.name


@pytest.fixture
def copied_dataset(tiny_dataset, tiny_env, tmp_path, monkeypatch):
    """A private copy of the tiny dataset (mtimes kept, so its token cache stays valid)."""
    cache_dir = tmp_path / "cache"
    shutil.copytree(tiny_dataset.cache_dir, cache_dir)
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(cache_dir))
    return cache_dir / tiny_dataset.name


# ---------------------------------------------------------------------------------------------
# Constants and environment


def test_constants_are_the_contract_values():
    assert (prepare.MAX_SEQ_LEN, prepare.STANDARD_TIME_BUDGET, prepare.VOCAB_SIZE) == (2048, 300, 8192)
    assert len(dataset_builders.SPECIAL_TOKENS) == 4 and dataset_builders.BOS_TOKEN == dataset_builders.SPECIAL_TOKENS[0]
    assert r"\p{N}{1,2}" in dataset_builders.SPLIT_PATTERN and r"\p{N}{1,3}" not in dataset_builders.SPLIT_PATTERN


def _import_in_subprocess(env_changes, expression):
    env = {key: value for key, value in os.environ.items()
           if key not in ("AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_PROFILE")}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", f"import prepare; print(({expression}))"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_time_budget_override_is_labelled_non_standard():
    expression = "prepare.TIME_BUDGET, prepare.TIME_BUDGET_IS_STANDARD, prepare.is_standard_run()"
    assert _import_in_subprocess({}, expression).stdout.strip() == "(300.0, True, True)"
    shortened = _import_in_subprocess({"AUTORESEARCH_TIME_BUDGET": "30"}, expression)
    assert shortened.stdout.strip() == "(30.0, False, False)"
    smoke = _import_in_subprocess({"AUTORESEARCH_PROFILE": "smoke"}, expression)
    assert smoke.stdout.strip() == "(300.0, True, False)"
    broken = _import_in_subprocess({"AUTORESEARCH_TIME_BUDGET": "five"}, expression)
    assert broken.returncode != 0 and "AUTORESEARCH_TIME_BUDGET='five' is not a number" in broken.stderr


def test_cache_root_and_recorded_dataset_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("AUTORESEARCH_DATASET", raising=False)
    assert dataset_builders.cache_root() == tmp_path
    with pytest.raises(prepare.DataError, match=r"uv run prepare.py --dataset pystdlib"):
        prepare.active_dataset()
    (tmp_path / "active_dataset").write_text("tinystories\n")
    assert prepare.active_dataset() == "tinystories"
    assert prepare.dataset_dir() == tmp_path / "tinystories"
    monkeypatch.setenv("AUTORESEARCH_DATASET", "pystdlib")
    assert prepare.active_dataset() == "pystdlib"


def test_unknown_dataset_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--dataset", "wikipedia"])
    assert exit_info.value.code == 2 and "invalid choice: 'wikipedia'" in capsys.readouterr().err
    monkeypatch.setenv("AUTORESEARCH_DATASET", "wikipedia")
    with pytest.raises(prepare.DataError, match="unknown dataset 'wikipedia'.*climbmix, tinystories, pystdlib, local"):
        prepare.active_dataset()


def test_progress_line_shows_done_total_rate_and_time_left(capsys):
    progress = dataset_builders.Progress("download", 10, "files")
    progress.update(3)
    progress.close()
    line = capsys.readouterr().err.split("\r")[-1]
    assert re.match(r"download: 3/10 files \| [\d.]+[kMG]? files/s \| \d+s left", line)


# ---------------------------------------------------------------------------------------------
# Datasets


def _write_fake_stdlib(root):
    """A small standard library: 40 modules, an empty package file, site/dist-packages that must
    be left out, and one Latin-1 file that must be skipped."""
    for index in range(40):
        module = root / ("json" if index % 4 == 0 else "") / f"mod_{index:02d}.py"
        module.parent.mkdir(parents=True, exist_ok=True)
        module.write_text(f'"""Module {index}."""\n\ndef value_{index}():\n    return {index * 7}\n')
    (root / "json" / "__init__.py").write_text("")
    for excluded in ("site-packages", "dist-packages"):
        (root / excluded).mkdir()
        (root / excluded / "third_party.py").write_text("THIRD_PARTY = True\n")
    (root / "latin1.py").write_bytes("# coding: latin-1\nname = 'caf\xe9'\n".encode("latin-1"))


def _shard_texts(directory):
    train = [text for path in sorted(directory.glob("train_*.parquet"))
             for text in pq.read_table(path).column("text").to_pylist()]
    return train, pq.read_table(directory / "val.parquet").column("text").to_pylist()


def test_pystdlib_is_every_stdlib_file_split_by_path(tmp_path, monkeypatch, capsys):
    stdlib = tmp_path / "stdlib"
    _write_fake_stdlib(stdlib)
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("AUTORESEARCH_DATASET", raising=False)
    monkeypatch.setattr(dataset_builders, "_running_stdlib_dir", lambda: stdlib)
    prepare.main(["--dataset", "pystdlib"])

    train, val = _shard_texts(tmp_path / "cache" / "pystdlib")
    modules = {path.relative_to(stdlib).as_posix(): path.read_text() for path in stdlib.rglob("mod_*.py")}
    expected_val = {text for name, text in modules.items() if dataset_builders._is_val_document(name)}
    assert expected_val and set(val) == expected_val
    assert sorted(train + val) == sorted(modules.values())  # one file = one document, nothing else
    output = capsys.readouterr().out
    assert "skipped 1 unreadable or non-UTF-8 input(s)" in output and "latin1.py" in output
    assert prepare.active_dataset() == "pystdlib"
    info = json.loads((tmp_path / "cache" / "pystdlib" / "dataset.json").read_text())
    assert info["train"]["docs"] == len(train) and info["val"]["docs"] == len(val)
    assert info["source"] == str(stdlib)


def test_training_stream_mixes_packages_the_same_way_on_every_machine(tmp_path, monkeypatch):
    stdlib = tmp_path / "stdlib"
    packages = ["asyncio", "email", "encodings", "json", "xml"]
    for package in packages:
        (stdlib / package).mkdir(parents=True)
        for index in range(24):
            (stdlib / package / f"mod_{index:02d}.py").write_text(f"# {package}\nVALUE = {index}\n" * 20)

    def prepared_in(cache):
        monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(cache))
        prepare.prepare("pystdlib", stdlib_dir=stdlib, vocab_size=300, shard_chars=5_000)
        return _shard_texts(cache / "pystdlib")

    train, val = prepared_in(tmp_path / "first")
    assert len(list((tmp_path / "first" / "pystdlib").glob("train_*.parquet"))) > 3
    package_of = [text.split("\n")[0][2:] for text in train]
    # In path order 23 of every 24 neighbours share a package; mixed, about 1 in 5 do.
    same_neighbours = sum(a == b for a, b in zip(package_of, package_of[1:])) / (len(train) - 1)
    assert same_neighbours < 0.4
    assert set(package_of[:24]) == set(packages)
    assert len(val) >= 3 and val != sorted(val)
    assert prepared_in(tmp_path / "second") == (train, val)


def test_local_reads_txt_md_jsonl_and_parquet_and_skips_non_utf8(tmp_path, monkeypatch):
    source = tmp_path / "corpus"
    (source / "notes").mkdir(parents=True)
    (source / "a.txt").write_text("Plain text document.")
    (source / "notes" / "b.md").write_text("# Markdown\n\nsecond document")
    (source / "c.jsonl").write_text('{"text": "json one"}\n\n{"text": "json two"}\nnot json\n')
    pq.write_table(pa.table({"text": ["parquet one", "parquet two"]}), source / "d.parquet")
    (source / "e.txt").write_bytes("caf\xe9 in Latin-1".encode("latin-1"))
    (source / ".hidden").mkdir()
    (source / ".hidden" / "secret.txt").write_text("ignored: hidden")
    (source / "f.csv").write_text("ignored,not a supported suffix")
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path / "cache"))

    info = prepare.prepare("local", source=source, vocab_size=300)
    train, val = _shard_texts(tmp_path / "cache" / "local")
    assert sorted(train + val) == sorted(["Plain text document.", "# Markdown\n\nsecond document",
                                          "json one", "json two", "parquet one", "parquet two"])
    assert len(val) >= 1 and len(train) >= 1
    assert [entry.split(" ")[0] for entry in info["skipped"]] == [f"{source}/c.jsonl:4", str(source / "e.txt")]
    assert info["source"] == str(source.resolve())


def test_empty_corpus_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "corpus"
    source.mkdir()
    (source / "latin1.txt").write_bytes(b"caf\xe9")
    (source / "blank.md").write_text("  \n")
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--dataset", "local", "--source", str(source)])
    assert str(exit_info.value.code).startswith("prepare.py: empty corpus:")
    assert "at least 2 non-empty documents are needed" in str(exit_info.value.code)
    with pytest.raises(SystemExit, match="needs --source DIR"):
        prepare.main(["--dataset", "local"])


def test_prepare_again_keeps_an_unchanged_dataset_and_retrains_after_a_change(tmp_path, monkeypatch):
    source = tmp_path / "corpus"
    source.mkdir()
    for index, text in enumerate(generated_documents(30, seed=1)):
        (source / f"{index}.txt").write_text(text)
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    directory = tmp_path / "cache" / "local"
    watched = [directory / "tokenizer" / "tokenizer.pkl", directory / "train_00000.parquet",
               directory / "tokens" / "train_00000.npz"]

    prepare.prepare("local", source=source, vocab_size=300)
    first = [path.stat().st_mtime_ns for path in watched]
    prepare.prepare("local", source=source, vocab_size=300)
    assert [path.stat().st_mtime_ns for path in watched] == first
    (source / "0.txt").write_text("a changed document " * 50)
    prepare.prepare("local", source=source, vocab_size=300)
    assert all(path.stat().st_mtime_ns != before for path, before in zip(watched, first))


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_has_bos_first_special_and_byte_lengths(tiny_env, tokenizer):
    vocab = tokenizer.get_vocab_size()
    assert tokenizer.get_bos_token_id() == vocab - 4
    assert [tokenizer.encoding.encode_single_token(token) for token in dataset_builders.SPECIAL_TOKENS] \
        == list(range(vocab - 4, vocab))
    token_bytes = prepare.get_token_bytes()
    assert token_bytes.dtype == np.int32 and token_bytes.shape == (vocab,)
    assert token_bytes[-4:].tolist() == [0, 0, 0, 0]
    assert token_bytes[:-4].tolist() == [len(tokenizer.encoding.decode_single_token_bytes(token))
                                         for token in range(vocab - 4)]


def test_tokenizer_round_trips_and_treats_special_token_text_as_text(tiny_env, tokenizer):
    text = generated_documents(3, seed=5)[1] + " 🚀 \t\r\n <|bos|>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and tokenizer.get_bos_token_id() not in ids
    batch = tokenizer.encode(["one", "two words"], prepend=dataset_builders.BOS_TOKEN)
    assert [row[0] for row in batch] == [tokenizer.get_bos_token_id()] * 2
    assert tokenizer.decode(batch[1][1:]) == "two words"
    assert tokenizer.decode(np.array(ids)) == text


def test_tokenizer_splits_numbers_into_at_most_two_digits(tiny_env, tokenizer):
    pieces = [tokenizer.encoding.decode_single_token_bytes(token)
              for token in tokenizer.encode("12345 9876543 20250101")]
    assert all(len(re.findall(rb"\d", piece)) <= 2 for piece in pieces)
    assert b"".join(pieces) == b"12345 9876543 20250101"


def test_tokenizer_is_trained_on_the_train_split_only(tmp_path, monkeypatch):
    """A word repeated 300 times in the val documents never becomes a token; the same treatment
    in a train document does."""
    source = tmp_path / "corpus"
    source.mkdir()
    names = [f"doc_{index}.txt" for index in range(60)]
    val_names = [name for name in names if dataset_builders._is_val_document(name)]
    assert val_names
    for name, text in zip(names, generated_documents(len(names), seed=2)):
        marker = " Zyxwvutsrqponm" if name in val_names else ""
        (source / name).write_text(text + marker * 300)
    (source / names[[name not in val_names for name in names].index(True)]).write_text(" Qwertyuiopasdf" * 300)
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    prepare.prepare("local", source=source, vocab_size=400)
    trained = dataset_builders.Tokenizer.from_directory(tmp_path / "cache" / "local" / "tokenizer")
    assert len(trained.encode(" Qwertyuiopasdf")) == 1
    assert len(trained.encode(" Zyxwvutsrqponm")) >= 5


# ---------------------------------------------------------------------------------------------
# Dataloader


@pytest.mark.parametrize("B, T, buffer_size, steps", [
    (4, 64, 16, 25),        # small buffer: many crops
    (2, 2048, 1000, 6),     # real row length; buffer capped at the split's document count
    (8, 256, 1000, 70),     # long enough for the stream to wrap into epoch 2
    (1, 7, 3, 40),          # rows shorter than most documents
])
def test_loader_matches_the_reference_rule_batch_for_batch(tiny_env, dataset_path, tokenizer,
                                                           B, T, buffer_size, steps):
    loader = prepare.make_dataloader(tokenizer, B, T, "train", buffer_size=buffer_size)
    reference = reference_batches(reference_documents(dataset_path, "train", tokenizer), B, T, buffer_size,
                                  tokenizer.get_bos_token_id())
    epochs = []
    for _ in range(steps):
        inputs, targets, epoch = next(loader)
        expected_inputs, expected_targets, expected_epoch = next(reference)
        assert inputs.dtype == targets.dtype == np.int64 and inputs.shape == targets.shape == (B, T)
        np.testing.assert_array_equal(inputs, expected_inputs)
        np.testing.assert_array_equal(targets, expected_targets)
        assert epoch == expected_epoch
        epochs.append(epoch)
    assert epochs == sorted(epochs)
    if steps == 70:
        assert epochs[-1] >= 2


def test_a_cropped_document_goes_on_in_later_rows_so_no_token_is_dropped(tiny_env, dataset_path, tokenizer):
    bos = tokenizer.get_bos_token_id()
    documents = reference_documents(dataset_path, "train", tokenizer)
    loader = prepare.make_dataloader(tokenizer, 4, 31, "train", buffer_size=1)
    rows = [np.concatenate([inputs, targets[:, -1:]], axis=1).ravel() for inputs, targets, _ in
            (next(loader) for _ in range(300))]
    placed = [token for token in np.concatenate(rows).tolist() if token != bos]
    text = [token for document in documents for token in document if token != bos]
    assert len(placed) > 30_000 and placed == text[:len(placed)]  # in order, every token, once


def test_loader_rows_start_with_bos_and_targets_are_inputs_shifted(tiny_env, tokenizer):
    inputs, targets, _ = next(prepare.make_dataloader(tokenizer, 16, 100, "train"))
    assert (inputs[:, 0] == tokenizer.get_bos_token_id()).all()
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])


def test_loader_is_deterministic_and_the_row_stream_ignores_batch_size(tiny_env, tokenizer):
    first = [next(prepare.make_dataloader(tokenizer, 6, 128, "train"))[0] for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    small = prepare.make_dataloader(tokenizer, 2, 128, "train")
    np.testing.assert_array_equal(np.concatenate([next(small)[0] for _ in range(3)]), first[0])


def test_ranks_get_disjoint_slices_of_the_single_process_batch(tiny_env, tokenizer):
    world_size, B = 3, 2
    single = prepare.make_dataloader(tokenizer, B * world_size, 96, "train")
    ranks = [prepare.make_dataloader(tokenizer, B, 96, "train", rank=rank, world_size=world_size)
             for rank in range(world_size)]
    for _ in range(5):
        inputs, targets, epoch = next(single)
        per_rank = [next(loader) for loader in ranks]
        np.testing.assert_array_equal(np.concatenate([batch[0] for batch in per_rank]), inputs)
        np.testing.assert_array_equal(np.concatenate([batch[1] for batch in per_rank]), targets)
        assert {batch[2] for batch in per_rank} == {epoch}


def test_loader_without_token_cache_tokenizes_on_the_fly_identically(tiny_env, copied_dataset, tokenizer):
    cached = [next(prepare.make_dataloader(tokenizer, 4, 300, "train"))[0] for _ in range(1)][0]
    stranger = dataset_builders.Tokenizer(tokenizer.encoding, fingerprint="another-tokenizer")
    np.testing.assert_array_equal(next(prepare.make_dataloader(stranger, 4, 300, "train"))[0], cached)
    shutil.rmtree(copied_dataset / "tokens")
    np.testing.assert_array_equal(next(prepare.make_dataloader(tokenizer, 4, 300, "train"))[0], cached)


def test_train_loader_never_opens_the_val_shard(tiny_env, copied_dataset, tokenizer):
    (copied_dataset / "val.parquet").unlink()
    (copied_dataset / "tokens" / "val.npz").unlink()
    next(prepare.make_dataloader(tokenizer, 2, 64, "train"))
    with pytest.raises(prepare.DataError, match="no val documents"):
        prepare.make_dataloader(tokenizer, 2, 64, "val")


def test_loader_rejects_bad_arguments(tiny_env, tokenizer):
    with pytest.raises(ValueError, match="split must be"):
        prepare.make_dataloader(tokenizer, 2, 64, "test")
    with pytest.raises(ValueError, match="rank=2 world_size=2"):
        prepare.make_dataloader(tokenizer, 2, 64, "train", rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------
# Bad data on disk


def test_no_train_shards_is_an_error_not_an_endless_loop(tiny_env, copied_dataset, tokenizer):
    for shard in copied_dataset.glob("train_*.parquet"):
        shard.unlink()
    with pytest.raises(prepare.DataError, match=r"no train documents .* run `uv run prepare.py --dataset local --source "):
        prepare.make_dataloader(tokenizer, 2, 64, "train")
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), copied_dataset / "train_00000.parquet")
    with pytest.raises(prepare.DataError, match="no train documents"):
        prepare.make_dataloader(tokenizer, 2, 64, "train")


def test_loader_refuses_a_dataset_built_by_another_version_of_prepare(tiny_env, copied_dataset, tokenizer,
                                                                      tiny_dataset):
    info_path = copied_dataset / "dataset.json"
    info = json.loads(info_path.read_text())
    del info["format"]  # as the format-1 prepare.py wrote it: documents in path order
    info_path.write_text(json.dumps(info))
    command = f"uv run prepare.py --dataset local --source {tiny_dataset.source}"
    with pytest.raises(prepare.DataError, match=re.escape(f"format None, this one reads {dataset_builders.DATASET_FORMAT}): "
                                                          f"run `{command}`")):
        prepare.make_dataloader(tokenizer, 2, 64, "val")


def test_no_tokenizer_names_the_command_to_run(tiny_env, copied_dataset, tiny_dataset):
    (copied_dataset / "tokenizer" / "tokenizer.pkl").write_bytes(b"not a pickle")
    with pytest.raises(prepare.DataError, match="tokenizer.pkl is corrupt"):
        prepare.get_tokenizer()
    shutil.rmtree(copied_dataset / "tokenizer")
    command = f"uv run prepare.py --dataset local --source {tiny_dataset.source}"
    with pytest.raises(prepare.DataError, match=re.escape("no tokenizer for dataset 'local'")) as error:
        prepare.get_tokenizer()
    assert command in str(error.value)
    with pytest.raises(prepare.DataError, match=re.escape(command)):
        prepare.get_token_bytes()


def test_corrupt_shard_names_the_file_and_the_command(tiny_env, copied_dataset, tokenizer):
    shard = copied_dataset / "train_00003.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(prepare.DataError) as error:
        prepare.make_dataloader(tokenizer, 2, 64, "train")
    assert f"shard {shard} is corrupt or truncated" in str(error.value)
    assert "re-run `uv run prepare.py --dataset local --source" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Evaluation


def test_eval_budget_is_the_smoke_value_without_touching_backends(tiny_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "backends", None)  # importing it would now fail
    assert prepare.eval_token_budget() == 4 * prepare.MAX_SEQ_LEN


def test_eval_budget_comes_from_the_hardware_tier(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "standard")
    fake = SimpleNamespace(get_hardware_info=lambda: {"kind": "cpu"},
                           eval_tokens=lambda info, backend: 32 * 2048)
    monkeypatch.setitem(sys.modules, "backends", fake)
    assert prepare.eval_token_budget() == 32 * 2048
    fake.eval_tokens = lambda info, backend: 1000
    with pytest.raises(ValueError, match="not a positive multiple of 2048"):
        prepare.eval_token_budget()


def test_eval_budget_is_the_tier_of_the_backend_that_trains(monkeypatch):
    # MLX on an NVIDIA machine trains on the CPU tier, so it must not evaluate the GPU's tokens.
    import backends
    from backends.tiers import CPU_TIER, NVIDIA_H100
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "standard")
    monkeypatch.setattr(backends, "get_hardware_info",
                        lambda: {"kind": "nvidia", "gpu_name": "NVIDIA H100 80GB HBM3",
                                 "generation": "Hopper", "gpu_memory_gb": 80})
    assert prepare.eval_token_budget("cuda") == NVIDIA_H100["eval_tokens"] == 40 * 2**19
    assert prepare.eval_token_budget("mlx") == CPU_TIER["eval_tokens"] == 32 * 2048


def test_an_interruption_mid_progress_line_starts_its_message_on_a_new_line(monkeypatch, capsys):
    def interrupted_while_tokenizing(name, **options):
        dataset_builders.Progress("tokenizing shards", 10, "docs").update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "build_dataset", interrupted_while_tokenizing)
    with pytest.raises(SystemExit) as stopped:
        prepare.main(["--dataset", "pystdlib"])
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert err.startswith("\rtokenizing shards: 0/10 docs")
    assert err.endswith("\033[K\nprepare.py: interrupted. Finished files are kept: run the same command "
                        "again to resume.\n")
