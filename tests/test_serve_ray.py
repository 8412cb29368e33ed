"""`tgems serve --engine ray`: one replica of the same app on a local Ray (1 CPU), behind Serve's HTTP proxy on a
loopback port, answers as the local app does (labels, exit layers, scores, errors); SIGTERM lets the request in
flight finish, exits 0 and leaves no Ray process behind. Refusals before Ray starts cost nothing.

One server process is shared by the module (starting Ray and Serve takes tens of seconds); `-m "not ray"`
skips these."""
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve")  # only the missing extra skips: CI installs it
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

from test_serve import b64, make_client, saved, wait_ready  # noqa: E402,F401 (a shared fixture)

from tgems.errors import TGEMError  # noqa: E402

pytestmark = pytest.mark.ray
SRC = str(Path(__file__).resolve().parents[1] / "src")
MARK = "TGEMS_RAY_SERVE_TEST"  # in the environment of every process the server starts (Ray's included)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked(token) -> list[int]:
    """Processes alive with our marker in their environment: the server and what it started."""
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                if f"{MARK}={token}".encode() in f.read().split(b"\0"):
                    with open(f"/proc/{p}/stat") as st:
                        if st.read().rsplit(")", 1)[1].split()[0] != "Z":
                            found.append(int(p))
        except OSError:
            pass
    return found


class RayServer:
    def __init__(self, classifier):
        self.port, self.token = _free_port(), uuid.uuid4().hex
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, MARK: self.token,
               "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("RAY_ADDRESS", None)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tgems.cli", "serve", "--engine", "ray", "--replicas", "1", "--replica-cpus", "1",
             "--classifier", f"shapes={classifier}", "--port", str(self.port), "--max-batch-size", "8",
             "--max-wait-ms", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3000):  # up to about five minutes on a busy machine
            assert self.proc.poll() is None, self.proc.communicate()[1]
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            self.stop()
            raise AssertionError("the Ray Serve deployment did not come up")
        self.startup_s = time.perf_counter() - t0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        out = self.proc.communicate()
        for pid in _marked(self.token):  # a last resort after a failure: never leave Ray behind
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return out


@pytest.fixture(scope="module")
def server(saved):
    s = RayServer(saved[0])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(saved):
    with make_client(saved) as c:  # the same settings as the server's (batches of 8, 1 ms)
        wait_ready(c)
        yield c


def test_health_and_models_via_ray(server, local, saved):
    r = httpx.get(server.url + "/health", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok", "models": ["shapes"]}
    got = httpx.get(server.url + "/v1/models", timeout=30).json()["data"]
    ref = local.get("/v1/models").json()["data"]
    assert [{k: v for k, v in m.items() if k != "created"} for m in got] == \
        [{k: v for k, v in m.items() if k != "created"} for m in ref]  # created: when each app started
    assert got[0]["fingerprint"] == saved[1].backbone.fingerprint() and got[0]["calibration"]["max_drop"] == 0.2


@pytest.mark.parametrize("parameters", [
    {"top_k": 3},
    {"candidate_labels": ["a red circle", "a blue star", "a green square", "a purple ring"],
     "hypothesis_template": "a photo of {}", "tau": 0.5},
])
def test_classify_via_ray_equals_the_local_app(server, local, saved, parameters):
    _, clf, test = saved
    body = {"inputs": [b64(a, uri=i % 2 == 0) for i, a in enumerate(test.images[:8])], "parameters": parameters}
    r = httpx.post(server.url + "/v1/tgems/classify", json=body, timeout=120)
    assert r.status_code == 200, r.text
    ref = local.post("/v1/tgems/classify", json=body).json()
    out = r.json()
    assert len(out) == 8
    assert [[x["label"] for x in o["labels"]] for o in out] == [[x["label"] for x in o["labels"]] for o in ref]
    assert [o["exit_layer"] for o in out] == [o["exit_layer"] for o in ref]
    assert [(o["calibrated"], o.get("notes")) for o in out] == [(o["calibrated"], o.get("notes")) for o in ref]
    assert np.allclose([[x["score"] for x in o["labels"]] for o in out],
                       [[x["score"] for x in o["labels"]] for o in ref], atol=1e-5)
    if "candidate_labels" not in parameters:  # and the library's answer
        assert [o["exit_layer"] for o in out] == clf.predict(list(test.images[:8])).exit_layers.tolist()


@pytest.mark.parametrize("body,status,reason", [
    (b"{not json", 400, "malformed JSON"),
    (b'{"inputs": [OK, "@@not base64@@"]}', 400, "input 1: not valid base64"),
    (b'{"inputs": OK, "parameters": {"budget": 0.5}}', 400, "was not calibrated for budget 0.5"),
    (b'{"inputs": OK, "model": "nope"}', 404, "unknown model 'nope'"),
])
def test_bad_input_is_the_same_one_line_4xx_via_ray(server, local, saved, body, status, reason):
    body = body.replace(b"OK", b'"' + b64(saved[2].images[0]).encode() + b'"')
    headers = {"content-type": "application/json"}
    r = httpx.post(server.url + "/v1/tgems/classify", content=body, headers=headers, timeout=60)
    assert r.status_code == status and reason in r.json()["error"]
    assert r.json() == local.post("/v1/tgems/classify", content=body, headers=headers).json()


def test_metrics_are_the_replicas(server):
    httpx.post(server.url + "/v1/tgems/classify", content=b"{", headers={"content-type": "application/json"}, timeout=60)
    text = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'tgems_errors_total{code="400",route="classify"}' in text
    assert 'tgems_layer_occupancy{layer="1",model="shapes"}' in text


def test_sigterm_finishes_the_request_in_flight_exits_0_and_leaves_no_ray(server, saved):
    """Last in the module: it stops the shared server."""
    uris = [b64(saved[2].images[i % 24]) for i in range(256)]
    got = {}

    def call():
        got["r"] = httpx.post(server.url + "/v1/tgems/classify", json={"inputs": uris, "parameters": {"tau": 2.0}},
                              timeout=300)

    t = threading.Thread(target=call)
    t.start()
    for _ in range(3000):  # the request has reached the replica's scheduler
        text = httpx.get(server.url + "/metrics", timeout=30).text
        if any(ln.startswith(("tgems_rows_inflight{", "tgems_rows_waiting{")) and float(ln.rsplit(" ", 1)[1]) > 0
               for ln in text.splitlines()):
            break
        time.sleep(0.01)
    assert server.token and _marked(server.token)
    server.proc.send_signal(signal.SIGTERM)
    t.join(300)
    rc = server.proc.wait(120)
    err = server.proc.communicate()[1]
    assert got["r"].status_code == 200, got["r"].text
    assert [o["exit_layer"] for o in got["r"].json()] == [12] * 256
    assert rc == 0, err
    assert "tgems serve: stopped" in err and "Traceback" not in err
    for _ in range(600):
        if not _marked(server.token):
            break
        time.sleep(0.1)
    assert _marked(server.token) == []


# ------------------------------------------------------------------ refusals before Ray starts (no Ray)


def _cli(*argv, env=None):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "tgems.cli", "serve", *argv], env=env, capture_output=True,
                          text=True, timeout=300)


def _one_error(p) -> str:
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("tgems: error:")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    return errors[0]


def test_replicas_without_the_ray_engine_is_refused(saved):
    p = _cli("--classifier", str(saved[0]), "--replicas", "2")
    assert "--replicas needs --engine ray" in _one_error(p)


def test_a_directory_that_is_no_classifier_is_refused_before_ray_starts(tmp_path):
    import ray

    from tgems.integrations.ray_serve import deploy
    from tgems.serve.models import ServeSettings

    with pytest.raises(TGEMError, match="is not a saved classifier"):
        deploy({"x": str(tmp_path)}, ServeSettings(port=_free_port()))
    assert not ray.is_initialized()


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    from tgems.integrations import ray_serve

    monkeypatch.setitem(sys.modules, "ray.serve", None)
    with pytest.raises(TGEMError, match=r'pip install "tgems\[ray-serve\]" \(ray.serve is missing\)'):
        ray_serve.require_serve()


def test_a_sigterm_while_the_replicas_load_stops_cleanly_once_they_have(monkeypatch):
    """ray.init installs its own SIGTERM handler (it aborts the driver): ours goes in after it, before the
    replicas finish loading, since Serve's proxy may answer requests already."""
    from tgems.integrations import ray_serve

    closed = []

    class Service:
        url = "http://127.0.0.1:1"

        def close(self):
            closed.append(True)

    def deploy(sources, settings, log, on_ray):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what ray.init leaves behind, as far as Python can
        on_ray()
        os.kill(os.getpid(), signal.SIGTERM)  # delivered while the replicas still load
        time.sleep(0.05)
        return Service()

    monkeypatch.setattr(ray_serve, "deploy", deploy)
    before = signal.getsignal(signal.SIGTERM)
    lines = []
    settings = type("S", (), {"replicas": 1})()
    try:
        assert ray_serve.run_ray_server({}, settings, lines.append) == 0
    finally:
        after = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, before)
    assert closed == [True] and lines[-2:] == ["tgems serve: stopping", "tgems serve: stopped"]
    assert after is signal.SIG_DFL  # restored to what was there when it caught SIGTERM


def test_the_serve_run_builder_reads_serve_settings(saved):
    from tgems.integrations.ray_serve import build_app

    app = build_app({"classifier": f"shapes={saved[0]}", "replicas": "3", "max_batch_size": "16"})
    deployment = getattr(app, "_bound_deployment", None)
    if deployment is not None:  # a private attribute of ray.serve.Application: checked where it exists
        assert deployment.num_replicas == 3 and deployment.max_ongoing_requests == 1024
        assert deployment.max_queued_requests == 1024 and deployment.ray_actor_options["num_cpus"] == 1
        config = getattr(deployment, "backpressure_config", None)
        assert config is None or config.status_code == 429  # a full proxy queue is a full queue
    with pytest.raises(TGEMError, match="unknown setting"):
        build_app({"classifier": str(saved[0]), "replica": "3"})
    with pytest.raises(TGEMError, match="--replicas must be an integer >= 1"):
        build_app({"classifier": str(saved[0]), "replicas": "0"})


def test_a_replica_that_refuses_its_classifier_gives_the_refusal_line():
    """Serve reports a replica that failed to start with its traceback; the command says the TGEMError's line
    (seen end to end with a damaged classifier.safetensors: one line, exit 2, about a minute)."""
    from tgems.integrations.ray_serve import _reason

    status = ("Deploying application tgems failed: Failed to update the deployments ['tgems'].\n"
              "Traceback (most recent call last):\n  File \"x.py\", line 74, in read_tensors\n"
              "    raise TGEMError(f\"{file} is damaged\")\n"
              "tgems.errors.TGEMError: /c/classifier.safetensors is damaged (its checksum does not match)\n")
    assert _reason(status) == (True, "/c/classifier.safetensors is damaged (its checksum does not match)")
    assert _reason("Traceback ...\n  File \"y.py\"\nRuntimeError: CUDA out of memory\n") == (
        False, "RuntimeError: CUDA out of memory")
