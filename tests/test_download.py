"""prepare.py downloads, against a real HTTP server on 127.0.0.1 that this file starts.

The server serves generated parquet shards (and TinyStories-style text files) and can be told to
answer 500 once, drop the connection halfway once, always send a cut-short file, or go away.
"""

import io
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dataset_builders
import prepare
from conftest import REPO_ROOT, generated_documents

FAST = {"attempts": 3, "backoff": 0.001}  # real retries, tiny waits


class FlakyServer:
    """Serves `files` (url path -> bytes) with scripted faults; records every request path."""

    def __init__(self, files):
        self.files = dict(files)
        self.fail_once, self.drop_once, self.truncated = set(), set(), set()
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                first_time = self.path not in server.requests
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None or (first_time and self.path in server.fail_once):
                    self.send_error(404 if body is None else 500)
                    return
                if self.path in server.truncated:
                    body = body[: len(body) // 2]  # a cut-short file, consistently announced
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if first_time and self.path in server.drop_once:
                    self.wfile.write(body[: len(body) // 3])
                    self.close_connection = True  # the connection dies mid-file
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def count(self, path):
        return self.requests.count(path)

    def go_away(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def parquet_bytes(texts):
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buffer)
    return buffer.getvalue()


@pytest.fixture
def hub():
    """A climbmix-like hub: shards 0..5 and the pinned val shard 6542."""
    files = {f"/shard_{index:05d}.parquet": parquet_bytes(generated_documents(12, seed=index))
             for index in [*range(6), 6542]}
    server = FlakyServer(files)
    yield server
    server.go_away()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("AUTORESEARCH_DATASET", raising=False)
    monkeypatch.delenv(dataset_builders.DOWNLOAD_URL_ENV, raising=False)
    directory = tmp_path / "cache" / "climbmix"
    directory.mkdir(parents=True)
    return directory


def files_in(directory):
    return sorted(path.name for path in directory.iterdir() if path.is_file())


def test_flaky_host_then_gone_leaves_every_good_shard_and_no_partial_file(hub, cache, monkeypatch):
    hub.fail_once.add("/shard_00001.parquet")
    hub.drop_once.add("/shard_00003.parquet")
    hub.truncated.add("/shard_00002.parquet")
    with pytest.raises(dataset_builders.DownloadError) as error:
        dataset_builders.download_climbmix(cache, 4, base_url=hub.url, **FAST)
    message = str(error.value)
    assert f"could not download 1 of 5 files from 127.0.0.1:{hub.url.rsplit(':', 1)[1]} " \
           "(train_00002.parquet): incomplete or corrupt file" in message
    assert "re-run `uv run prepare.py --dataset climbmix` to resume" in message
    assert "`uv run prepare.py --dataset pystdlib`" in message
    assert files_in(cache) == ["train_00000.parquet", "train_00001.parquet", "train_00003.parquet", "val.parquet"]
    for name, index in [("train_00000.parquet", 0), ("train_00001.parquet", 1), ("train_00003.parquet", 3),
                        ("val.parquet", 6542)]:
        assert (cache / name).read_bytes() == hub.files[f"/shard_{index:05d}.parquet"]
    assert [hub.count(f"/shard_{index:05d}.parquet") for index in range(4)] == [1, 2, 3, 2]

    hub.truncated.clear()  # the next run resumes: only the missing shard is fetched
    hub.requests.clear()
    dataset_builders.download_climbmix(cache, 4, base_url=hub.url, **FAST)
    assert hub.requests == ["/shard_00002.parquet"]
    assert (cache / "train_00002.parquet").read_bytes() == hub.files["/shard_00002.parquet"]

    hub.go_away()  # asking for one more shard now fails with one clear line, losing nothing
    monkeypatch.setenv(dataset_builders.DOWNLOAD_URL_ENV, hub.url)
    monkeypatch.setattr(dataset_builders, "DOWNLOAD_BACKOFF_SECONDS", 0.001)
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--dataset", "climbmix", "--num-shards", "5"])
    message = exit_info.value.code
    assert message.startswith("prepare.py: could not download 1 of 6 files from 127.0.0.1:")
    assert "(train_00004.parquet): cannot connect to 127.0.0.1:" in message
    assert message.endswith("or work offline with `uv run prepare.py --dataset pystdlib`.")
    assert files_in(cache) == [f"train_{index:05d}.parquet" for index in range(4)] + ["val.parquet"]


@pytest.mark.parametrize("dataset, files", [("climbmix", 3), ("tinystories", 2)])
def test_unreachable_host_exits_with_one_line_and_leaves_no_empty_folder(tmp_path, dataset, files):
    env = {**os.environ, "AUTORESEARCH_CACHE_DIR": str(tmp_path),
           dataset_builders.DOWNLOAD_URL_ENV: "http://127.0.0.1:9"}  # the discard port: nothing listens
    extra = ", '--num-shards', '2'" if dataset == "climbmix" else ""
    script = ("import dataset_builders, prepare; dataset_builders.DOWNLOAD_BACKOFF_SECONDS = 0.001; "
              f"prepare.main(['--dataset', '{dataset}'{extra}])")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"prepare.py: could not download {files} of {files} files from 127.0.0.1:9")
    assert "cannot connect to 127.0.0.1:9" in last_line and "--dataset pystdlib" in last_line
    assert list(tmp_path.iterdir()) == [], "neither climbmix/ nor tinystories/raw/ stays behind empty"


def test_sigterm_mid_download_says_what_ctrl_c_says_and_exits_143(tmp_path):
    requested, release = threading.Event(), threading.Event()

    class StalledHandler(BaseHTTPRequestHandler):
        def do_GET(self):  # headers and a first chunk, then nothing until the test releases it
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"PAR1")
            self.wfile.flush()
            requested.set()
            release.wait(60)
            self.close_connection = True

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StalledHandler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    env = {**os.environ, "AUTORESEARCH_CACHE_DIR": str(tmp_path),
           dataset_builders.DOWNLOAD_URL_ENV: f"http://127.0.0.1:{httpd.server_address[1]}"}
    try:
        with subprocess.Popen([sys.executable, "prepare.py", "--dataset", "climbmix", "--num-shards", "1"],
                              cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True) as child:
            assert requested.wait(60), "the download never started"
            child.terminate()  # SIGTERM
            release.set()
            stderr = child.stderr.read()
            assert child.wait(60) == 143
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()
    assert "Traceback" not in stderr
    assert stderr.endswith("\nprepare.py: interrupted. Finished files are kept: run the same command again "
                           "to resume.\n")
    assert list((tmp_path / "climbmix").glob("*.tmp")) == []


def test_corrupt_shard_on_disk_is_downloaded_again(hub, cache):
    dataset_builders.download_climbmix(cache, 2, base_url=hub.url, **FAST)
    (cache / "train_00001.parquet").write_bytes(b"PAR1 garbage")
    hub.requests.clear()
    dataset_builders.download_climbmix(cache, 2, base_url=hub.url, **FAST)
    assert hub.requests == ["/shard_00001.parquet"]
    assert (cache / "train_00001.parquet").read_bytes() == hub.files["/shard_00001.parquet"]


def test_missing_file_fails_at_once_without_retries(hub, cache):
    del hub.files["/shard_00001.parquet"]
    with pytest.raises(dataset_builders.DownloadError, match=r"\(train_00001.parquet\): HTTP 404"):
        dataset_builders.download_climbmix(cache, 3, base_url=hub.url, **FAST)
    assert hub.count("/shard_00001.parquet") == 1
    assert files_in(cache) == ["train_00000.parquet", "train_00002.parquet", "val.parquet"]


def test_shard_count_is_checked(cache):
    for bad in (0, 6543):
        with pytest.raises(prepare.DataError, match=f"--num-shards must be between 1 and 6542, got {bad}"):
            dataset_builders.download_climbmix(cache, bad)


def test_climbmix_prepares_end_to_end_from_a_mirror(hub, cache, monkeypatch):
    info = prepare.prepare("climbmix", num_shards=3, base_url=hub.url, vocab_size=300, **FAST)
    assert prepare.active_dataset() == "climbmix"
    assert info["source"] == hub.url and info["train"]["shards"] == 3 and info["val"]["docs"] == 12
    assert (cache / "tokenizer" / "tokenizer.pkl").exists() and (cache / "tokens" / "val.npz").exists()
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "smoke")
    inputs, _, epoch = next(prepare.make_dataloader(prepare.get_tokenizer(), 2, 64, "train"))
    assert inputs.shape == (2, 64) and epoch == 1


def test_tinystories_is_downloaded_and_converted_to_the_shard_layout(tmp_path, monkeypatch):
    stories = generated_documents(60, seed=9)
    train, val = stories[:50], stories[50:]
    separator = f"\n{dataset_builders.TINYSTORIES_SEPARATOR}\n"
    server = FlakyServer({f"/{dataset_builders.TINYSTORIES_FILES['train']}": separator.join(train).encode(),
                          f"/{dataset_builders.TINYSTORIES_FILES['val']}": separator.join(val).encode()})
    server.fail_once.add(f"/{dataset_builders.TINYSTORIES_FILES['train']}")
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path))
    try:
        info = prepare.prepare("tinystories", base_url=server.url, vocab_size=300, shard_chars=20_000, **FAST)
    finally:
        server.go_away()
    directory = tmp_path / "tinystories"
    shards = sorted(directory.glob("train_*.parquet"))
    assert len(shards) > 1 and not (directory / "raw").exists()
    # every story once, shuffled within its shard (prepare.py's _write_shuffled)
    assert sorted(text for shard in shards for text in pq.read_table(shard).column("text").to_pylist()) == sorted(train)
    assert sorted(pq.read_table(directory / "val.parquet").column("text").to_pylist()) == sorted(val)
    assert info["train"]["docs"] == 50 and info["val"]["docs"] == 10

    tokenizer_mtime = (directory / "tokenizer" / "tokenizer.pkl").stat().st_mtime_ns
    prepare.prepare("tinystories", base_url=server.url, vocab_size=300, **FAST)  # server is gone: no download needed
    assert (directory / "tokenizer" / "tokenizer.pkl").stat().st_mtime_ns == tokenizer_mtime
