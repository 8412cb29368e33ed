"""`tgems serve` in process (Starlette's TestClient): the routes answer as the library does (classify equals
EarlyExitClassifier.predict, embeddings equal the backbone's), every bad input is a one-line 4xx naming the
input, health / models / metrics. On the shipped embedded model and a classifier calibrated in the test."""
import asyncio
import base64
import io
import json
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

import tgems  # noqa: E402
from tgems.profiles import check_readable_labels  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(dir, classifier, test images): 16 scenes labels, calibrated label-free for max_drop 0.2."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = tgems.load_backbone("embedded")
        test = tgems.load_dataset("scenes:test:24")
        clf = tgems.EarlyExitClassifier(bb, "embedded:cls", test.classes[:16])
        clf = clf.calibrate(tgems.load_dataset("scenes:calib:200"), max_drop=0.2, delta=0.1, use_labels=False)
    path = tmp_path_factory.mktemp("served") / "shapes"
    clf.save(path)
    return path, clf, test


def png(arr) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def b64(arr, uri=False) -> str:
    s = base64.b64encode(png(arr)).decode()
    return f"data:image/png;base64,{s}" if uri else s


def wait_ready(client, tries=600):
    for _ in range(tries):
        r = client.get("/health")
        if r.status_code == 200:
            return r
        assert r.json()["status"] == "loading", r.text
        time.sleep(0.05)
    raise AssertionError("the server did not load")


def make_client(saved, **settings):
    from starlette.testclient import TestClient

    from tgems.serve.app import create_app
    from tgems.serve.models import ServeSettings

    s = ServeSettings(max_batch_size=8, max_wait_ms=1, **settings)
    return TestClient(create_app({"shapes": str(saved[0])}, s, log=lambda m: None))


@pytest.fixture(scope="module")
def client(saved):
    with make_client(saved) as c:
        wait_ready(c)
        yield c


def test_health_is_503_until_loaded(saved):
    from starlette.testclient import TestClient

    from tgems.serve.app import create_app

    app = create_app({"shapes": str(saved[0])}, log=lambda m: None)
    c = TestClient(app)  # no lifespan: nothing loads
    r = c.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = c.post("/v1/tgems/classify", json={"inputs": b64(saved[2].images[0])})
    assert r.status_code == 503 and "loading" in r.json()["error"]


def test_a_classifier_that_cannot_load_keeps_health_at_503(tmp_path):
    from starlette.testclient import TestClient

    from tgems.serve.app import create_app

    errors = []
    with TestClient(create_app({"x": str(tmp_path)}, log=lambda m: None, on_load_error=errors.append)) as c:
        for _ in range(200):
            if errors:
                break
            time.sleep(0.05)
        r = c.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "failed"
    assert "is not a saved classifier" in r.json()["error"] and len(errors) == 1


def test_classify_equals_predict(client, saved):
    _, clf, test = saved
    ref = clf.predict(list(test.images[:6]))
    r = client.post("/v1/tgems/classify", json={"inputs": [b64(a, uri=i % 2 == 0) for i, a in enumerate(test.images[:6])],
                                          "parameters": {"top_k": 3}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [o["labels"][0]["label"] for o in out] == ref.labels
    assert [o["exit_layer"] for o in out] == ref.exit_layers.tolist()
    assert np.allclose([o["flops_ratio"] for o in out], ref.flops_ratio, atol=1e-6)
    assert np.allclose([o["labels"][0]["score"] for o in out], ref.probs.max(1), atol=1e-5)
    assert all(len(o["labels"]) == 3 and o["calibrated"] is True and "notes" not in o for o in out)
    assert all(o["num_layers"] == 12 for o in out)
    # one input (not a list): one result; the calibrated max_drop may be asked for by value
    r = client.post("/v1/tgems/classify", json={"inputs": b64(test.images[0]), "parameters": {"max_drop": 0.2}})
    assert r.status_code == 200 and r.json()["exit_layer"] == ref.exit_layers[0]


def test_other_label_sets_and_taus_answer_as_their_classifier(client, saved):
    _, clf, test = saved
    labels = list(test.classes[16:40:3])
    ref = tgems.EarlyExitClassifier(clf.backbone, "embedded:cls", labels, templates=["a photo of {}"],
                                    calibration={"goal": clf.goal, "tau": 0.5}).predict(list(test.images[:8]))
    r = client.post("/v1/tgems/classify", json={"inputs": [b64(a) for a in test.images[:8]], "parameters": {
        "candidate_labels": labels, "hypothesis_template": "a photo of {}", "tau": 0.5, "top_k": 1}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [o["labels"][0]["label"] for o in out] == ref.labels
    assert [o["exit_layer"] for o in out] == ref.exit_layers.tolist()
    assert all(o["calibrated"] is False for o in out)
    assert any("guarantee does not" in n for n in out[0]["notes"])


def test_multipart_upload(client, saved):
    _, clf, test = saved
    ref = clf.predict(list(test.images[:2]))
    files = [("image", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(test.images[:2])]
    r = client.post("/v1/tgems/classify", files=files, data={"top_k": "2"})
    assert r.status_code == 200, r.text
    assert [o["labels"][0]["label"] for o in r.json()] == ref.labels
    r = client.post("/v1/tgems/classify", files=files[:1], data={"candidate_labels": "a red circle, a blue star"})
    assert r.status_code == 200 and {x["label"] for x in r.json()["labels"]} == {"a red circle", "a blue star"}


def _bomb_png() -> bytes:
    """A PNG whose header says 20000 x 20000 pixels (past PIL's limit), a few bytes long."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("body,status,reason", [
    (b"{not json", 400, "malformed JSON"),
    (b'["a"]', 400, "JSON object"),
    (b'{"parameters": {}}', 400, "missing field 'inputs'"),
    (b'{"inputs": []}', 400, "inputs is empty"),
    (b'{"inputs": ["iVBORw0KGgo=", "@@not base64@@"]}', 400, "input 0: not a readable image"),
    (b'{"inputs": [OK, "@@not base64@@"]}', 400, "input 1: not valid base64"),
    (b'{"inputs": [OK, 5]}', 400, "input 1: expected a base64 string"),
    (b'{"inputs": [OK, OK, "' + base64.b64encode(b"hello, not an image") + b'"]}', 400, "input 2: not a readable"),
    (b'{"inputs": ["data:image/png,abc"]}', 400, "input 0: a data URI must be base64"),
    (b'{"inputs": [OK, "' + base64.b64encode(_bomb_png()) + b'"]}', 413, "input 1: the image is past the "
                                                                           "decompression-bomb limit"),
    (b'{"inputs": OK, "parameters": {"top_k": 0}}', 400, "top_k"),
    (b'{"inputs": OK, "parameters": {"candidate_labels": "x", "hypothesis_template": "no slot"}}', 400, "'{}'"),
    (b'{"inputs": OK, "parameters": {"candidate_labels": ["a", "a"]}}', 400, "duplicate labels"),
    (b'{"inputs": OK, "parameters": {"budget": 0.5}}', 400, "was not calibrated for budget 0.5"),
    (b'{"inputs": OK, "parameters": {"max_drop": 0.05}}', 400, "not calibrated for max_drop 0.05"),
    (b'{"inputs": OK, "parameters": {"tau": 0.5, "max_drop": 0.2}}', 400, "at most one of"),
    (b'{"inputs": OK, "model": "nope"}', 404, "unknown model 'nope' (serving: shapes)"),
])
def test_bad_input_is_a_one_line_4xx(client, saved, body, status, reason):
    ok = b'"' + b64(saved[2].images[0]).encode() + b'"'
    r = client.post("/v1/tgems/classify", content=body.replace(b"OK", ok), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert reason in err and "\n" not in err


def test_too_many_images_is_413(saved):
    with make_client(saved, max_client_batch=3) as c:
        wait_ready(c)
        r = c.post("/v1/tgems/classify", json={"inputs": [b64(a) for a in saved[2].images[:4]]})
        assert r.status_code == 413 and "at most 3" in r.json()["error"]
        files = [("image", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(saved[2].images[:4])]
        assert c.post("/v1/tgems/classify", files=files).status_code == 413


def test_full_queue_is_429_with_retry_after(saved):
    with make_client(saved, queue_size=2) as c:
        wait_ready(c)
        r = c.post("/v1/tgems/classify", json={"inputs": [b64(a) for a in saved[2].images[:3]]})
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and "queue is full" in r.json()["error"]
        assert c.post("/v1/tgems/classify", json={"inputs": [b64(a) for a in saved[2].images[:2]]}).status_code == 200


def test_unreadable_labels_get_the_cli_refusal(client, saved):
    labels = ["the digit zero", "the digit one"]
    with pytest.raises(tgems.TGEMError) as cli:
        check_readable_labels(saved[1].backbone, labels, ["{}"])
    r = client.post("/v1/tgems/classify", json={"inputs": b64(saved[2].images[0]),
                                          "parameters": {"candidate_labels": labels, "hypothesis_template": "{}"}})
    assert r.status_code == 400 and r.json()["error"] == str(cli.value)


def test_embeddings(client, saved):
    _, clf, test = saved
    bb = clf.backbone
    texts = ["a red circle", "a blue star"]
    r = client.post("/v1/embeddings", json={"input": texts, "model": "shapes"})
    assert r.status_code == 200, r.text
    got = torch.tensor([d["embedding"] for d in r.json()["data"]])
    assert torch.allclose(got, F.normalize(bb.encode_text(texts).float(), dim=-1), atol=1e-5)
    px = bb.preprocess(list(test.images[:3]))
    r = client.post("/v1/embeddings", json={"input": [b64(a, uri=True) for a in test.images[:3]], "modality": "image"})
    got = torch.tensor([d["embedding"] for d in r.json()["data"]])
    assert torch.allclose(got, F.normalize(bb.encode_image(px).float(), dim=-1), atol=1e-5)
    ref = clf.predict(px)
    r = client.post("/v1/embeddings", json={"input": [b64(a, uri=True) for a in test.images[:3]],
                                            "modality": "image", "early_exit": True})
    data = r.json()["data"]
    assert [d["exit_layer"] for d in data] == ref.exit_layers.tolist()
    got = torch.tensor([d["embedding"] for d in data])
    assert torch.allclose(got, F.normalize(torch.tensor(ref.embeddings), dim=-1), atol=1e-5)
    bad = client.post("/v1/embeddings", json={"input": ["x", 3]})
    assert bad.status_code == 400 and "input 1" in bad.json()["error"]["message"]
    bad = client.post("/v1/embeddings", json={"input": ["x"], "modality": "audio"})
    assert bad.status_code == 400 and "modality" in bad.json()["error"]["message"]


def test_models_and_metrics(client, saved):
    _, clf, test = saved
    client.post("/v1/tgems/classify", json={"inputs": [b64(a) for a in test.images[:4]]})
    client.post("/v1/tgems/classify", content=b"{", headers={"content-type": "application/json"})
    m = client.get("/v1/models").json()["data"][0]
    assert m["id"] == "shapes" and m["fingerprint"] == clf.backbone.fingerprint() and m["labels"] == clf.labels
    assert m["calibration"]["goal"] == "max_drop" and m["calibration"]["max_drop"] == 0.2
    assert m["calibration"]["n_calib"] == 200 and m["audit"]["rate"] == 0.0
    text = client.get("/metrics").text
    assert 'tgems_requests_total{code="200",route="classify"}' in text
    assert 'tgems_errors_total{code="400",route="classify"}' in text
    assert 'tgems_request_seconds_bucket{le="+Inf",route="classify"}' in text
    assert 'tgems_queue_seconds_count{model="shapes"}' in text
    assert 'tgems_exit_layer_bucket{le="12.0",model="shapes"}' in text
    assert 'tgems_layer_occupancy{layer="1",model="shapes"}' in text
    saved_flops = float(text.split('tgems_flops_saved_total{model="shapes"} ')[1].split()[0])
    assert saved_flops > 0
    assert 'tgems_rows_inflight{model="shapes"} 0.0' in text


def test_live_audit_shows_in_models_and_metrics(saved):
    _, clf, test = saved
    with make_client(saved, audit_rate=1.0) as c:
        wait_ready(c)
        r = c.post("/v1/tgems/classify", json={"inputs": [b64(a) for a in test.images[:16]]})
        ref = clf.predict(list(test.images[:16]))
        assert [o["exit_layer"] for o in r.json()] == ref.exit_layers.tolist()  # answered at their exits
        early = int((ref.exit_layers < 12).sum())
        for _ in range(200):  # audited rows finish after the answer
            a = c.get("/v1/models").json()["data"][0]["audit"]
            if a["n"] == early:
                break
            time.sleep(0.05)
        full = clf.with_tau(2.0).predict(list(test.images[:16]))
        mask = ref.exit_layers < 12
        assert a["n"] == early > 0 and a["disagree"] == int((ref.indices[mask] != full.indices[mask]).sum())
        assert a["max_drop"] == 0.2 and a["lower"] <= a["observed"] <= a["upper"]
        assert f'tgems_audit_rows_total{{model="shapes"}} {float(early)}' in c.get("/metrics").text


def test_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "<html" in r.text.lower() and "/v1/tgems/classify" in r.text


def test_a_body_past_the_limit_is_413_before_it_is_read(saved):
    """Content-Length past --max-body-mb: refused from the header; a chunked body (no Content-Length): refused
    once the bytes counted while streaming pass the limit, the rest of it never read."""
    limit = 0.01  # MB
    big = b'{"inputs": "' + b"A" * int(limit * 2 ** 20) + b'"}'
    pulled = []

    async def chunked(app):
        """The body in 1 KB chunks without a Content-Length, straight through ASGI (TestClient would read a
        streamed body whole before the app sees it)."""
        sent = []

        async def receive():
            pulled.append(1024)
            return {"type": "http.request", "body": b" " * 1024, "more_body": len(pulled) < 64}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/tgems/classify", "raw_path": b"/v1/tgems/classify", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json"),
                                              (b"transfer-encoding", b"chunked")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await app(scope, receive, send)
        return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))

    with make_client(saved, max_body_mb=limit) as c:
        wait_ready(c)
        r = c.post("/v1/tgems/classify", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert "past the limit of 0.01 MB" in err and "\n" not in err
        status, body = asyncio.run(chunked(c.app))
        assert status == 413 and "past the limit" in body["error"], body
        assert limit * 2 ** 20 < sum(pulled) <= limit * 2 ** 20 + 1024 < 64 * 1024
        files = [("image", ("0.png", b"\0" * int(limit * 2 ** 20), "image/png"))]
        assert c.post("/v1/tgems/classify", files=files).status_code == 413
        r = c.post("/v1/embeddings", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413
        # under the limit: answered as before
        r = c.post("/v1/tgems/classify", json={"inputs": b64(saved[2].images[0])})
        assert r.status_code == 200, r.text
        assert 'tgems_requests_total{code="413",route="classify"} 3.0' in c.get("/metrics").text


def test_drop_scheduler_answers_as_predict(saved):
    """--scheduler drop (exit-and-drop micro-batches, the benchmark's baseline) answers as predict does."""
    _, clf, test = saved
    ref = clf.predict(list(test.images[:6]))
    with make_client(saved, scheduler="drop") as c:
        wait_ready(c)
        r = c.post("/v1/tgems/classify", json={"inputs": [b64(a) for a in test.images[:6]]})
        assert r.status_code == 200, r.text
        out = r.json()
        assert [o["labels"][0]["label"] for o in out] == ref.labels
        assert [o["exit_layer"] for o in out] == ref.exit_layers.tolist()
        assert np.allclose([o["labels"][0]["score"] for o in out], ref.probs.max(1), atol=1e-5)
        assert np.allclose([o["flops_ratio"] for o in out], ref.flops_ratio, atol=1e-6)
        text = c.get("/metrics").text
        assert 'tgems_layer_rows_total{layer="1",model="shapes"} 6.0' in text
        served = c.app.state.tgems["models"]["shapes"]
        assert type(served.scheduler).__name__ == "DropScheduler"


def test_drop_scheduler_mixes_policies_cancels_and_refuses_a_full_queue(saved):
    from tgems.engine import run_early_exit
    from tgems.scheduling.drop import DropScheduler
    from tgems.scheduling.driver import QueueFull

    _, clf, test = saved
    bb = clf.backbone
    px = bb.preprocess(list(test.images[:9]))
    pols = {"a": clf.policy(), "b": clf.with_tau(0.3).policy()}
    s = DropScheduler(bb, max_batch_size=8, queue_size=9)
    got = {"a": [None] * 3, "b": [None] * 3, "c": []}
    s.submit(px[:3], pols["a"], lambda i, r: got["a"].__setitem__(i, r), tag="a")
    s.submit(px[3:6], pols["b"], lambda i, r: got["b"].__setitem__(i, r), tag="b")
    s.submit(px[6:9], pols["a"], lambda i, r: got["c"].append(r), tag="c")
    with pytest.raises(QueueFull, match="queue is full"):
        s.submit(px[:1], pols["a"], lambda i, r: None)
    assert s.cancel("c") == 3 and s.pending == 6
    s.run_until_idle()
    assert got["c"] == [] and s.stats["answered"] == 6
    for k, sl in (("a", slice(0, 3)), ("b", slice(3, 6))):
        ref = run_early_exit(bb, px[sl], pols[k])
        assert [r.exit_layer for r in got[k]] == ref.exit_layers.tolist()
        assert torch.allclose(torch.stack([r.probs for r in got[k]]), ref.outputs.float(), atol=1e-5)


@pytest.mark.parametrize("bad,reason", [
    ({"port": -1}, "--port must be an integer in 0 .. 65535"),
    ({"max_batch_size": 0}, "--max-batch-size must be an integer >= 1"),
    ({"max_wait_ms": -1.0}, "max-wait-ms must be a number >= 0"),
    ({"max_wait_ms": float("nan")}, "max-wait-ms must be"),
    ({"queue_size": 0}, "--queue-size must be an integer >= 1"),
    ({"max_inflight": 0}, "--max-inflight must be an integer >= 1"),
    ({"max_body_mb": 0.0}, "max-body-mb must be a positive number"),
    ({"audit_rate": 1.5}, "audit-rate must be a number in [0, 1]"),
    ({"seed": -1}, "seed must be an integer"),
    ({"dtype": "int8"}, "dtype must be one of float32, float16, bfloat16"),
    ({"engine": "k8s"}, "engine must be one of local, ray"),
    ({"scheduler": "fifo"}, "scheduler must be one of drop, depth"),
    ({"replicas": 0}, "--replicas must be an integer >= 1"),
    ({"replica_cpus": 0.0}, "replica-cpus must be a positive number"),
    ({"threads": 0}, "--threads must be an integer >= 1"),
    ({"scheduler": "drop", "audit_rate": 0.1}, "--audit-rate needs --scheduler depth"),
    ({"engine": "ray", "threads": 2}, "--threads is for the local server"),
])
def test_serve_settings_check_refuses_bad_options_in_one_line(bad, reason):
    """One check for every entry point: `ServeSettings.check()` (the CLI, create_app, run_server, Ray Serve)."""
    from tgems.errors import TGEMError
    from tgems.serve.app import create_app
    from tgems.serve.models import ServeSettings
    from tgems.serve.server import run_server

    settings = ServeSettings(**bad)
    for call in (settings.check, lambda: create_app({"x": "."}, settings),
                 lambda: run_server({"x": "."}, settings, lambda m: None)):
        with pytest.raises(TGEMError) as e:
            call()
        assert reason in str(e.value) and "\n" not in str(e.value)


def test_serve_settings_check_returns_a_checked_copy():
    from dataclasses import FrozenInstanceError

    from tgems.serve.models import ServeSettings

    s = ServeSettings(max_wait_ms=1, max_body_mb=2, replica_cpus=1)
    checked = s.check()
    assert checked == ServeSettings(max_wait_ms=1.0, max_body_mb=2.0, replica_cpus=1.0)
    assert type(checked.max_wait_ms) is float and type(s.max_wait_ms) is int  # the given one is left as it was
    assert ServeSettings().check() == ServeSettings()
    with pytest.raises(FrozenInstanceError):
        s.port = 1


def test_one_tuple_of_schedulers_dtypes_and_engines():
    import re
    from pathlib import Path

    import tgems
    from tgems import options, spec
    from tgems.serve import models

    src = Path(tgems.__file__).parent
    for name in ("SCHEDULERS", "DTYPES", "ENGINES"):
        defined = [p for p in src.rglob("*.py") if re.search(rf"^{name} = ", p.read_text(), re.M)]
        assert defined == [src / "options.py"], (name, defined)
    assert spec.SCHEDULERS is models.SCHEDULERS is options.SCHEDULERS


@pytest.mark.parametrize("argv,reason", [
    (["--classifier", ".", "--max-wait-ms", "-1"], "max-wait-ms must be a number >= 0"),
    (["--classifier", ".", "--engine", "ray", "--threads", "2"], "--threads is for the local server"),
    (["--classifier", ".", "--scheduler", "drop", "--audit-rate", "0.5"], "--audit-rate needs --scheduler depth"),
    ([], "give at least one --classifier"),
    (["--classifier", ".", "--max-body-mb", "0"], "max-body-mb must be a positive number"),
    (["--classifier", ".", "--scheduler", "fifo"], "invalid choice: 'fifo'"),
    (["--classifier", "/no/such/dir"], "/no/such/dir is not a directory"),
    (["--classifier", "a=.", "--classifier", "a=."], "two classifiers named 'a'"),
])
def test_serve_command_refuses_bad_options_in_one_line(capsys, argv, reason):
    from helpers import assert_one_line_error, run_cli

    rc, out, err = run_cli(capsys, "serve", *argv)
    assert reason in assert_one_line_error(rc, err)


def test_an_address_in_use_is_one_line(capsys, tmp_path):
    import socket

    from helpers import assert_one_line_error, run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rc, out, err = run_cli(capsys, "serve", "--classifier", tmp_path, "--port", s.getsockname()[1])
    assert "cannot listen on 127.0.0.1" in assert_one_line_error(rc, err)


def test_a_full_server_disk_is_a_one_line_507(saved, monkeypatch):
    """Uploads spool to the server's disk: a full disk there is the operator's to fix, said in one line (and
    logged), not a 500 with a traceback nor a 400 that blames the client's body."""
    import errno

    from starlette.datastructures import UploadFile
    from starlette.testclient import TestClient

    from tgems.serve.app import create_app
    from tgems.serve.models import ServeSettings

    async def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    logged = []
    app = create_app({"shapes": str(saved[0])}, ServeSettings(max_batch_size=8, max_wait_ms=1), log=logged.append)
    with TestClient(app) as c:
        wait_ready(c)
        files = [("image", ("0.png", png(saved[2].images[0]), "image/png"))]
        assert c.post("/v1/tgems/classify", files=files).status_code == 200
        monkeypatch.setattr(UploadFile, "write", full)
        for route in ("/v1/tgems/classify", "/v1/classify"):
            r = c.post(route, files=files)
            assert r.status_code == 507, r.text
            why = r.json()["error"]
            assert "no space left on the server's disk" in why and "\n" not in why
    assert sum("no space left on the server's disk" in m for m in logged) == 2
    assert not any("internal error" in m for m in logged)
