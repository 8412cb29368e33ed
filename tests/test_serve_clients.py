"""`tgems serve` through the clients users already have: openai-python on /v1/embeddings and /v1/models, and
huggingface_hub's InferenceClient on zero-shot (and plain) image classification, against the app served by
uvicorn on a loopback port; then what a user meets on the way (closed uploads, errors without Python reprs,
the exit-layer histogram's buckets, the server's threads). Bounded: a handful of requests, 60 s timeouts."""
import base64
import gc
import io
import os
import platform
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import tgems  # noqa: E402

LABELS = ["a red circle", "a blue star", "a green heart"]


def png(arr) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = tgems.load_backbone("embedded")
        test = tgems.load_dataset("scenes:test:4")
        clf = tgems.EarlyExitClassifier(bb, "embedded:cls", test.classes[:16])
    path = tmp_path_factory.mktemp("served") / "shapes"
    clf.save(path)
    return path, clf, test


class LoopbackServer:
    """create_app on uvicorn in a thread, on 127.0.0.1 and a port the OS picks."""

    def __init__(self, path, **settings):
        from tgems.serve.app import create_app
        from tgems.serve.models import ServeSettings

        self.logs = []
        app = create_app({"shapes": str(path)}, ServeSettings(max_batch_size=8, max_wait_ms=1, **settings),
                         log=self.logs.append)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not (self.server.started and self.server.servers):
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        while httpx.get(self.url + "/health", timeout=60).status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def server(saved):
    s = LoopbackServer(saved[0])
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------- 1. openai

@pytest.fixture(scope="module")
def oai(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_embeds_texts_and_images_by_default(oai, saved):
    """The client's default asks for base64 (float32 little-endian); float gives the same vectors."""
    _, clf, test = saved
    bb = clf.backbone
    ref = F.normalize(bb.encode_text(LABELS).float(), dim=-1)
    got = oai.embeddings.create(model="shapes", input=LABELS)  # encoding_format "base64" on the wire
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == "shapes"
    assert torch.allclose(torch.tensor([d.embedding for d in got.data]), ref, atol=1e-6)
    flt = oai.embeddings.create(model="shapes", input=LABELS, encoding_format="float")
    assert torch.allclose(torch.tensor([d.embedding for d in flt.data]), ref, atol=1e-6)
    raw = oai.embeddings.with_raw_response.create(model="shapes", input=LABELS[:1]).http_response.json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (bb.embed_dim,) and np.allclose(vec, ref[0].numpy(), atol=1e-6)
    uri = "data:image/png;base64," + base64.b64encode(png(test.images[0])).decode()
    img = oai.embeddings.create(model="shapes", input=[uri], extra_body={"modality": "image"})
    full = F.normalize(bb.encode_image(bb.preprocess([test.images[0]])).float(), dim=-1)[0]
    assert torch.allclose(torch.tensor(img.data[0].embedding), full, atol=1e-5)
    same = oai.embeddings.create(model="shapes", input=LABELS[:1], dimensions=bb.embed_dim)
    assert len(same.data[0].embedding) == bb.embed_dim
    assert [m.id for m in oai.models.list().data] == ["shapes"]


def test_openai_errors_in_openai_shape(oai, saved, server):
    import openai

    bb = saved[1].backbone
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model="shapes", input=LABELS, dimensions=bb.embed_dim // 2)
    assert e.value.param == "dimensions" and f"{bb.embed_dim}-dimensional" in e.value.message
    assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        oai.embeddings.create(model="nope", input=LABELS)
    assert e.value.code == "model_not_found" and "unknown model 'nope'" in e.value.message
    # words the model cannot read: refused as classify refuses them as a label
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model="shapes", input=["a red circle", "zzqv blorft"])
    assert e.value.param == "input" and "input 1" in e.value.message and "cannot read" in e.value.message
    r = httpx.post(server.url + "/v1/tgems/classify", timeout=60, json={
        "inputs": base64.b64encode(png(saved[2].images[0])).decode(),
        "parameters": {"candidate_labels": ["a red circle", "zzqv blorft"]}})
    assert r.status_code == 400 and "made only of unknown words" in r.json()["error"]
    r = httpx.post(server.url + "/v1/embeddings", content=b"{", headers={"content-type": "application/json"})
    err = r.json()["error"]
    assert r.status_code == 400 and set(err) == {"message", "type", "param", "code"}
    assert "malformed JSON" in err["message"]


# ---------------------------------------------------------------------------------------------- 2. huggingface_hub

def test_huggingface_client_zero_shot_on_the_route_and_the_root(server, saved):
    hub = pytest.importorskip("huggingface_hub")
    _, clf, test = saved
    image = png(test.images[0])
    outs = []
    for client in (hub.InferenceClient(model=server.url + "/v1/classify", timeout=60),
                   hub.InferenceClient(base_url=server.url, timeout=60)):
        out = client.zero_shot_image_classification(image, candidate_labels=LABELS)
        assert sorted(o.label for o in out) == sorted(LABELS)  # every candidate label, once
        scores = [o.score for o in out]
        assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-3
        outs.append([(o.label, o.score) for o in out])
    assert outs[0] == outs[1]
    rich = httpx.post(server.url + "/v1/tgems/classify", timeout=60, json={
        "inputs": base64.b64encode(image).decode(), "parameters": {"candidate_labels": LABELS, "top_k": 3}}).json()
    assert [(x["label"], x["score"]) for x in rich["labels"]] == outs[0]
    r = httpx.post(server.url + "/v1/classify", timeout=60, json={
        "inputs": base64.b64encode(image).decode(), "parameters": {"candidate_labels": LABELS}})
    assert r.headers["x-tgems-exit-layer"] == str(rich["exit_layer"])
    assert r.headers["x-tgems-num-layers"] == "12" and float(r.headers["x-tgems-flops-ratio"]) == rich["flops_ratio"]


def test_raw_image_body_as_the_hf_inference_api_takes_it(server, saved):
    """huggingface_hub's image_classification posts the image's bytes as they are (no JSON)."""
    hub = pytest.importorskip("huggingface_hub")
    _, clf, test = saved
    out = hub.InferenceClient(model=server.url + "/v1/classify", timeout=60).image_classification(
        png(test.images[1]))
    ref = clf.predict([test.images[1]])
    assert len(out) == len(clf.labels) and out[0].label == ref.labels[0]
    for ctype in ("image/png", "application/octet-stream"):
        r = httpx.post(server.url + "/", content=png(test.images[1]), headers={"content-type": ctype}, timeout=60)
        assert r.status_code == 200 and r.json()[0]["label"] == ref.labels[0], r.text
        assert r.headers["x-tgems-exit-layer"] == str(int(ref.exit_layers[0]))
    r = httpx.post(server.url + "/", params={"candidate_labels": ",".join(LABELS)}, content=png(test.images[1]),
                   headers={"content-type": "image/png"}, timeout=60)
    assert sorted(x["label"] for x in r.json()) == sorted(LABELS)
    r = httpx.post(server.url + "/", content=b"not an image", headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"].startswith("input 0: not a readable image")


# ---------------------------------------------------------------------------------------------- 3, 4

def test_multipart_uploads_are_closed(saved):
    """No "Unclosed file <SpooledTemporaryFile>": the uploads are closed when the request is parsed, even
    when one of them is refused; one file is past 1 MB, so it was spooled to disk."""
    from starlette.testclient import TestClient

    from tgems.serve.app import create_app
    from tgems.serve.models import ServeSettings

    test = saved[2]
    big = png(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8))
    assert len(big) > 2 ** 20
    with TestClient(create_app({"shapes": str(saved[0])}, ServeSettings(max_batch_size=8, max_wait_ms=1),
                               log=lambda m: None)) as c:
        while c.get("/health").status_code != 200:
            time.sleep(0.05)
        gc.collect()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            files = [("image", ("a.png", png(test.images[0]), "image/png")), ("image", ("b.png", big, "image/png"))]
            assert c.post("/v1/classify", files=files, data={"top_k": "1"}).status_code == 200
            bad = [("image", ("a.png", png(test.images[0]), "image/png")), ("image", ("c.txt", b"text", "text/plain"))]
            r = c.post("/v1/classify", files=bad)
            assert r.status_code == 400 and "input 1" in r.json()["error"]
            gc.collect()
        unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        assert not unclosed, unclosed


def test_errors_carry_no_python_reprs_and_exit_buckets_are_the_layers(server, saved):
    ok = httpx.post(server.url + "/v1/classify", timeout=60,  # one answered row of its own: the count below
                    json={"inputs": base64.b64encode(png(saved[2].images[0])).decode()})
    assert ok.status_code == 200, ok.text
    r = httpx.post(server.url + "/v1/classify", timeout=60,
                   json={"inputs": base64.b64encode(b"GIF89a not really").decode()})
    err = r.json()["error"]
    assert r.status_code == 400 and "input 0: not a readable image" in err
    assert " at 0x" not in err and "<_io" not in err, err
    text = httpx.get(server.url + "/metrics", timeout=60).text
    buckets = [line.split('le="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith("tgems_exit_layer_bucket")]
    assert buckets == [f"{float(l)}" for l in range(1, 13)] + ["+Inf"], buckets
    count = [line for line in text.splitlines() if line.startswith("tgems_exit_layer_count")]
    assert count and float(count[0].rsplit(" ", 1)[1]) >= 1


def test_serve_threads_default_and_option():
    from tgems.cli import build_parser
    from tgems.serve.models import ServeSettings
    from tgems.serve.server import default_threads, set_threads

    assert [default_threads(c) for c in (1, 2, 4, 16)] == [1, 1, 3, 8]
    assert build_parser().parse_args(["serve", "--classifier", "x", "--threads", "3"]).threads == 3
    before, logs = torch.get_num_threads(), []
    try:
        n = set_threads(ServeSettings(), logs.append)
        assert torch.get_num_threads() == n and "the default" in logs[0] and f"{n} torch thread" in logs[0]
        assert set_threads(ServeSettings(threads=1), logs.append) == 1 and "(--threads)" in logs[1]
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- 5

def test_the_server_gives_freed_heap_pages_back(tmp_path, saved, monkeypatch):
    """What made a long soak's RSS creep: glibc keeps freed batch-sized blocks resident in its heap once its
    mmap threshold has risen. The app trims the heap every TRIM_EVERY_S; in a fresh process, 20 cycles of an
    8 MB tensor freed under a small one that stays keep 8 MB resident, and `release_heap` gives it back."""
    import subprocess
    import sys

    from starlette.testclient import TestClient

    from tgems.serve import service
    from tgems.serve.app import create_app
    from tgems.serve.models import ServeSettings

    if not Path("/proc/self/statm").exists() or "glibc" not in " ".join(platform.libc_ver()):
        pytest.skip("glibc on Linux only")
    code = """
import torch
from tgems.serve.service import release_heap
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
torch.set_num_threads(1)
a = torch.ones(2_000_000)
del a
base, keep = rss(), []
for i in range(20):
    b = torch.ones(2_000_000 + 1000 * i)
    keep.append(torch.ones(3000))
    del b
grown = (rss() - base) / 2 ** 20
assert release_heap()
print(grown, (rss() - base) / 2 ** 20)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    grown, trimmed = map(float, out.stdout.split())
    assert grown > 4 and trimmed < 1, (grown, trimmed)
    monkeypatch.setattr(service, "TRIM_EVERY_S", 0.05)
    app = create_app({"shapes": str(saved[0])}, ServeSettings(), log=lambda m: None)
    with TestClient(app):
        deadline = time.monotonic() + 30
        while app.state.service.trims < 2:
            assert time.monotonic() < deadline, "the app never trimmed its heap"
            time.sleep(0.05)
