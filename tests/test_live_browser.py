"""The live page in a real headless browser: Chromium from the system's package manager, driven
through its DevTools protocol by the small WebSocket client below (no browser-automation package).

The page must load, show the best, and update itself without a reload when results.tsv grows.
The test saves the screenshot it takes in its temporary folder; set LIVE_PAGE_SCREENSHOT to a path
(docs/live-page.png for the README) to keep a copy there.

Skipped, with the reason, where no Chromium is installed (Debian/Ubuntu: apt-get install chromium).
"""

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tools import live

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium): "
                                                         "the live page's browser test is skipped")
# Where to keep a copy of the screenshot, resolved before the test changes directory.
KEEP_SCREENSHOT = Path(os.environ["LIVE_PAGE_SCREENSHOT"]).resolve() if os.environ.get("LIVE_PAGE_SCREENSHOT") else None
WIDTH = 1200
WAIT_SECONDS = 60
KIND = "[standard 300s/standard/pystdlib/cpu/cpu/x1]"
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
# A night as the runner writes it: the baseline's six runs, kept changes with their confirmations,
# discards, crashes and a disturbed run. (commit, val_bpb, status, description)
NIGHT = [("41f6506", value, "keep", "baseline" + (f" [run {n}]" if n > 1 else ""))
         for n, value in enumerate([1.1464, 1.1471, 1.1458, 1.1466, 1.1462, 1.1469], start=1)] + [
    ("a1c2e3f", 1.1525, "discard", "matrix lr 0.05"),
    ("b2d3f4a", 1.1431, "keep", "warmdown ratio 0.6"), ("b2d3f4a", 1.1437, "keep", "warmdown ratio 0.6 [run 2]"),
    ("c3e4a5b", 0.0, "crash", "depth 10 [crash: exit code 1: out of memory]"),
    ("d4f5b6c", 1.1446, "discard", "softcap 12"), ("d4f5b6c", 1.1441, "discard", "softcap 12 [run 2]"),
    ("e5a6c7d", 1.1612, "discard", "no value embeddings"),
    ("f6b7d8e", 1.1398, "keep", "batch 2^15 tokens"), ("f6b7d8e", 1.1405, "keep", "batch 2^15 tokens [run 2]"),
    ("a7c8e9f", 1.1429, "discard", "rope base 50000 [disturbed: other processes used 23% of the CPU (limit 10%)]"),
    ("b8d9f0a", 1.1473, "discard", "adam beta2 0.99"),
    ("c9e0a1b", 0.0, "crash", "window pattern SSSSL [crash: exit code 1: FAIL: training diverged at step 41]"),
    ("d0f1b2c", 1.1379, "keep", "x0 lambda init 0.2"), ("d0f1b2c", 1.1386, "keep", "x0 lambda init 0.2 [run 2]"),
    ("e1a2c3d", 1.1402, "discard", "muon momentum 0.9"),
]
NEW_BEST = ("f2b3d4e", 1.1352, "keep", "unembedding lr 0.006")


def row_line(commit, val_bpb, status, description):
    return f"{commit}\t{val_bpb:.6f}\t{0.0 if status == 'crash' else 2.1:.1f}\t{status}\t{description} {KIND}\n"


class DevTools:
    """A minimal WebSocket client (RFC 6455: masked text frames out, whole messages in) for the
    DevTools protocol of one page."""

    def __init__(self, url):
        address = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((address.hostname, address.port), timeout=WAIT_SECONDS)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {address.path} HTTP/1.1\r\nHost: {address.netloc}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buffer = bytearray()
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.receive_bytes()
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        self.buffer = bytearray(rest)
        self.last_id = 0

    def receive_bytes(self):
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the browser closed the DevTools connection")
        return chunk

    def read(self, count):
        while len(self.buffer) < count:
            self.buffer += self.receive_bytes()
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def message(self):
        """The next whole message (continuation frames joined), as JSON."""
        payload = b""
        while True:
            first, second = self.read(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self.read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self.read(8))[0]
            assert not second & 0x80, "a server never masks its frames"
            data = self.read(length)
            if first & 0x0F == 0x8:
                raise ConnectionError("the browser closed the DevTools connection")
            payload += data
            if first & 0x80:
                return json.loads(payload)

    def call(self, method, **params):
        self.last_id += 1
        payload = json.dumps({"id": self.last_id, "method": method, "params": params}).encode()
        size = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + struct.pack(">H", size))
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload)))
        while True:
            message = self.message()
            if message.get("id") == self.last_id:
                assert "error" not in message, message["error"]
                return message["result"]

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")


def wait_until(check, what):
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"the page never showed {what}")


@pytest.fixture
def night_page(tmp_path, monkeypatch):
    """A night served on a free port: its results, its last verdict, and a run in progress whose
    runner is this test's process (it holds the lock file's pid)."""
    folder = tmp_path / "night"
    (folder / ".autoresearch").mkdir(parents=True)
    (folder / "results.tsv").write_text(HEADER + "".join(row_line(*row) for row in NIGHT))
    (folder / ".autoresearch" / "state.json").write_text(json.dumps({
        "last_verdict": "DISCARD  1.140200 (mean of 1 run; best d0f1b2c 1.138250 mean of 6; +0.001950; "
                        "sigma 0.000488 from 14 runs; t -3.2 below -0.5 after run 1) e1a2c3d muon momentum 0.9",
        "in_progress": {"commit": "a3c4e5f" + "0" * 33, "description": "mlp hidden 3x instead of 4x", "pending": []}}))
    (folder / ".autoresearch" / "lock").write_text(
        f"pid {os.getpid()}: run 'mlp hidden 3x instead of 4x', since {time.strftime('%H:%M:%S')}")
    subprocess.run(["git", "init", "--quiet", "-b", "autoresearch/dec5-cpu", str(folder)], check=True)
    (folder / "run.log").write_text("".join(
        f"\rstep {step:05d} ({step / 4.5:.1f}%) | loss {4.2 - step / 200:.4f} | lrm 1.00 | 41,230 tok/s | "
        f"mfu 28.9% | remaining {300 - step * 300 / 450:.0f}s   " for step in range(1, 188)))
    monkeypatch.chdir(folder)
    server = live.start("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture
def browser(tmp_path):
    """Start headless Chromium; yields a function that opens a URL and returns its DevTools."""
    profile = tmp_path / "profile"
    process = subprocess.Popen([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--no-default-browser-check", "--disable-extensions", "--disable-dev-shm-usage",
                                f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                f"--window-size={WIDTH},900", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    active = profile / "DevToolsActivePort"
    port = wait_until(lambda: active.exists() and active.read_text().split("\n")[0].strip(), "its DevTools port")

    def open_page(url):
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        page = next(target for target in targets if target["type"] == "page")
        devtools = DevTools(page["webSocketDebuggerUrl"])
        devtools.call("Page.navigate", url=url)
        return devtools

    yield open_page
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def text_of(page, element):
    return page.evaluate(f"(document.getElementById({json.dumps(element)}) || {{}}).textContent")


def test_the_page_shows_the_night_and_updates_without_a_reload_when_a_row_is_appended(night_page, browser, tmp_path):
    folder, url = night_page
    page = browser(url)
    wait_until(lambda: text_of(page, "best-value") == "1.138250", "the best (mean of its 2 runs)")
    assert text_of(page, "best-detail") == "d0f1b2c x0 lambda init 0.2 · mean of 2 runs"
    assert text_of(page, "sigma-value").startswith("σ 0.000")
    assert text_of(page, "counts-value") == "21"
    assert text_of(page, "running-line").startswith("step 187 · loss 3.2650 · ")
    assert text_of(page, "running-detail").startswith("a3c4e5f mlp hidden 3x instead of 4x · 0 run(s) of it done")
    assert text_of(page, "branch") == "· autoresearch/dec5-cpu"
    assert page.evaluate("document.querySelectorAll('#chart svg .kept').length") == 3
    assert page.evaluate("document.querySelectorAll('#chart svg .crash').length") == 2
    assert "muon momentum 0.9" in text_of(page, "verdicts")
    assert text_of(page, "connection").startswith("live · updated")
    assert text_of(page, "errors") == ""
    page.evaluate("window.loadedOnce = true")  # gone if the page reloads

    with open(folder / "results.tsv", "a") as results:
        results.write(row_line(*NEW_BEST))
    wait_until(lambda: text_of(page, "best-value") == "1.135200", "the appended row's new best")
    assert page.evaluate("window.loadedOnce") is True
    assert text_of(page, "counts-value") == "22"
    assert text_of(page, "best-detail") == "f2b3d4e unembedding lr 0.006 · mean of 1 run"
    assert page.evaluate("document.querySelectorAll('#chart svg .kept').length") == 4
    assert page.evaluate("document.querySelector('#last-rows td:nth-child(6)').textContent") == "unembedding lr 0.006"

    height = page.evaluate("document.documentElement.scrollHeight")
    page.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1, mobile=False)
    shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", shot[16:24]) == (WIDTH, height)
    (tmp_path / "live-page.png").write_bytes(shot)
    if KEEP_SCREENSHOT:
        KEEP_SCREENSHOT.write_bytes(shot)
