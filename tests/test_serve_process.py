"""`tgems serve` as a process on a loopback port: a client that leaves has its rows dropped, SIGTERM finishes
the requests in flight and exits 0, and the page works in a real headless browser (Chromium, when installed)."""
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import tgems  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = tgems.load_backbone("embedded")
        test = tgems.load_dataset("scenes:test:8")
        path = tmp_path_factory.mktemp("served") / "shapes"
        tgems.EarlyExitClassifier(bb, "embedded:cls", test.classes[:16]).save(path)
    return path, test


def _png_uri(arr) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, classifier, *args):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, "-m", "tgems.cli", "serve", "--classifier", f"shapes={classifier}",
                                      "--port", str(self.port), *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        for _ in range(1200):  # up to about two minutes on a busy machine
            assert self.proc.poll() is None, self.proc.communicate()[1]
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("server did not come up")

    def metric(self, name) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    def wait_busy(self):
        for _ in range(2000):
            if self.metric("tgems_rows_inflight") + self.metric("tgems_rows_waiting") > 0:
                return
            time.sleep(0.01)
        raise AssertionError("the request never reached the scheduler")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.communicate()


def _long_request(images):
    """256 images that never exit early, through batches of 4: hundreds of steps."""
    uris = [_png_uri(images[i % len(images)]) for i in range(256)]
    return {"inputs": uris, "parameters": {"tau": 2.0}}


@pytest.fixture(scope="module")
def server(classifier_dir):
    s = Server(classifier_dir[0], "--max-batch-size", "4")
    yield s
    s.stop()


def test_a_client_that_leaves_has_its_rows_dropped(server, classifier_dir):
    body = json.dumps(_long_request(classifier_dir[1].images)).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/tgems/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    server.wait_busy()
    sock.close()
    for _ in range(1000):
        if server.metric("tgems_rows_inflight") + server.metric("tgems_rows_waiting") == 0:
            break
        time.sleep(0.02)
    assert server.metric("tgems_rows_inflight") == 0 and server.metric("tgems_rows_waiting") == 0
    assert server.metric("tgems_rows_cancelled_total") > 0
    assert server.metric("tgems_layer_rows_total") < 256 * 12  # not every row ran every block
    r = httpx.post(server.url + "/v1/tgems/classify", json={"inputs": _png_uri(classifier_dir[1].images[0])}, timeout=60)
    assert r.status_code == 200  # the server goes on


def test_sigterm_finishes_requests_in_flight_and_exits_0(classifier_dir):
    s = Server(classifier_dir[0], "--max-batch-size", "4")
    got = {}

    def call():
        got["r"] = httpx.post(s.url + "/v1/tgems/classify", json=_long_request(classifier_dir[1].images), timeout=300)

    t = threading.Thread(target=call)
    t.start()
    try:
        s.wait_busy()
        s.proc.send_signal(signal.SIGTERM)
        refused = False
        for _ in range(600):  # new connections are refused while the request in flight finishes
            try:
                httpx.get(s.url + "/health", timeout=5)
            except httpx.TransportError:
                refused = True
                break
            time.sleep(0.05)
        t.join(300)
        rc = s.proc.wait(120)
    finally:
        out, err = s.stop()
    assert refused
    assert got["r"].status_code == 200 and len(got["r"].json()) == 256
    assert all(o["exit_layer"] == 12 for o in got["r"].json())
    assert rc == 0, err
    assert "tgems serve: stopped" in err and "Traceback" not in err


def test_load_failure_exits_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "tgems.cli", "serve", "--classifier", str(tmp_path),
                        "--port", str(_free_port())], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("tgems: error:")]
    assert len(errors) == 1 and "is not a saved classifier" in errors[0] and "Traceback" not in p.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_in_headless_chromium(server, classifier_dir, tmp_path):
    from urllib.parse import quote

    url = f"{server.url}/?demo={quote(_png_uri(classifier_dir[1].images[0]))}"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    assert "exit layer / full depth" in dom and "FLOPs saved" in dom  # the answer was rendered
    shot = tmp_path / "page.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1000,700", url], capture_output=True,
                   timeout=180)
    from PIL import Image

    assert Image.open(shot).size == (1000, 700)
