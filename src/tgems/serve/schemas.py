"""Request shapes: Hugging Face zero-shot image classification (JSON, multipart or a raw image body), and the
image decoding every route shares (openai.py parses the embeddings request with it). Every bad input is a
`BadRequest` with a status and a one-line reason that names the input's index; nothing here raises anything
else on user data."""
from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from tgems.io import is_disk_full


class BadRequest(Exception):
    """A client error: `status` (4xx), a one-line reason, and for OpenAI's error shape the request field at
    fault (`param`) and a machine-readable `code`."""

    def __init__(self, reason: str, status: int = 400, headers: dict | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(reason)
        self.status, self.headers, self.param, self.code = status, headers or {}, param, code


_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def _reason(e: Exception) -> str:
    """An exception's first line for a user, without Python object reprs ('<_io.BytesIO object at 0x...>')."""
    first = str(e).splitlines()[0] if str(e) else ""
    return _REPR.sub("", first).strip() or type(e).__name__


def decode_image(data: bytes, index: int) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8. Past PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS): 413,
    judged from the header before any pixel is decoded."""
    from PIL import Image

    from tgems.images import to_rgb

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                arr = np.asarray(to_rgb(img))  # EXIF orientation, 16-bit scaled: as every reader
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadRequest(f"input {index}: the image is past the decompression-bomb limit of "
                         f"{Image.MAX_IMAGE_PIXELS} pixels", 413) from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        raise BadRequest(f"input {index}: not a readable image ({_reason(e)})") from None
    if arr.ndim != 3 or min(arr.shape[:2]) < 1:
        raise BadRequest(f"input {index}: an empty image")
    return arr


def decode_base64_image(item, index: int) -> np.ndarray:
    """A base64 string or a data URI ('data:image/png;base64,...') -> (H, W, 3) uint8."""
    if not isinstance(item, str):
        raise BadRequest(f"input {index}: expected a base64 string or data URI, got {type(item).__name__}")
    s = item.strip()
    if s.startswith("data:"):
        head, sep, s = s.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRequest(f"input {index}: a data URI must be base64 ('data:image/png;base64,...')")
    try:
        raw = base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"input {index}: not valid base64") from None
    if not raw:
        raise BadRequest(f"input {index}: empty")
    return decode_image(raw, index)


def _labels(value, where="candidate_labels") -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [t.strip() for t in value.split(",") if t.strip()]
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise BadRequest(f"parameters.{where} must be a list of strings")
    from tgems.errors import TGEMError
    from tgems.profiles import check_labels

    try:
        return check_labels(value)
    except TGEMError as e:
        raise BadRequest(f"parameters.{where}: {e}") from None


def _number(params, key, lo=None, hi=None, integer=False):
    v = params.get(key)
    if v is None:
        return None
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise BadRequest(f"parameters.{key} must be a number, got '{v}'") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadRequest(f"parameters.{key} must be a number, got {v!r}")
    if integer:
        if v != int(v):
            raise BadRequest(f"parameters.{key} must be an integer, got {v}")
        v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise BadRequest(f"parameters.{key} must lie in [{lo}, {hi}], got {v}")
    return v


@dataclass
class ClassifyRequest:
    images: list  # (H, W, 3) uint8 arrays
    single: bool  # one input given (not a list): answer with one result
    model: str | None = None
    labels: list[str] | None = None
    templates: list[str] | None = None
    top_k: int = 5
    top_k_given: bool = False
    budget: float | None = None
    max_drop: float | None = None
    tau: float | None = None
    notes: list = field(default_factory=list)


def _parameters(params: dict, req: ClassifyRequest) -> ClassifyRequest:
    if not isinstance(params, dict):
        raise BadRequest("parameters must be an object")
    req.labels = _labels(params.get("candidate_labels"))
    tpl = params.get("hypothesis_template")
    if tpl is not None:
        if not isinstance(tpl, str) or tpl.count("{}") != 1:
            raise BadRequest("parameters.hypothesis_template must be a string with one '{}' (e.g. 'a photo of {}')")
        req.templates = [tpl]
    top_k = _number(params, "top_k", 1, None, integer=True)
    req.top_k, req.top_k_given = (5, False) if top_k is None else (top_k, True)
    req.budget = _number(params, "budget", 0, 1)
    req.max_drop = _number(params, "max_drop", 0, 1)
    req.tau = _number(params, "tau", 0, 2)
    return req


def _check_count(n: int, max_client_batch: int):
    if n == 0:
        raise BadRequest("inputs is empty")
    if n > max_client_batch:
        raise BadRequest(f"{n} images in one request; at most {max_client_batch} (--max-client-batch)", 413)


def json_object(body: bytes, field: str) -> dict:
    """The body as a JSON object, else a one-line 400 naming the field it must carry."""
    import json

    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the body must be a JSON object with '{field}'")
    return data


def parse_classify_json(body: bytes, max_client_batch: int) -> ClassifyRequest:
    data = json_object(body, "inputs")
    if "inputs" not in data:
        raise BadRequest("missing field 'inputs' (a base64 image, a data URI, or a list of them)")
    inputs = data["inputs"]
    single = not isinstance(inputs, list)
    items = [inputs] if single else inputs
    _check_count(len(items), max_client_batch)
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string")
    req = ClassifyRequest([decode_base64_image(x, i) for i, x in enumerate(items)], single, model)
    params = dict(data.get("parameters") or {})
    for key in ("budget", "max_drop", "tau"):  # also accepted at the top level
        if key in data and key not in params:
            params[key] = data[key]
    return _parameters(params, req)


async def parse_classify_form(request, max_client_batch: int) -> ClassifyRequest:
    """multipart/form-data: files in `image` (or `file`, `inputs`), the parameters as form fields
    (candidate_labels comma-separated or repeated)."""
    try:
        form = await request.form(max_files=max_client_batch + 1)
    except BadRequest:  # the body limit, counted while it streams in
        raise
    except Exception as e:
        if is_disk_full(e):  # the server's disk, not the client's body
            raise
        raise BadRequest(f"malformed multipart body: {_reason(e)}") from None
    try:  # the uploads are spooled files: closed here, not left to the garbage collector
        files = [v for k, v in form.multi_items() if k in ("image", "file", "inputs", "images") and hasattr(v, "read")]
        _check_count(len(files), max_client_batch)
        images = [decode_image(await f.read(), i) for i, f in enumerate(files)]
        req = ClassifyRequest(images, len(files) == 1, form.get("model"))
        return _parameters(_field_parameters(form), req)
    finally:
        await form.close()


def _field_parameters(fields) -> dict:
    """Parameters given as form fields or query parameters (candidate_labels comma-separated or repeated)."""
    labels = fields.getlist("candidate_labels")
    params = {k: fields.get(k) for k in ("hypothesis_template", "top_k", "budget", "max_drop", "tau") if fields.get(k)}
    if labels:
        params["candidate_labels"] = labels[0] if len(labels) == 1 else labels
    return params


RAW_IMAGE_TYPES = ("image/", "application/octet-stream")
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")  # PNG JPEG GIF BMP TIFF


def looks_like_image(body: bytes) -> bool:
    """huggingface_hub posts raw bytes labelled application/json when it knows no file name: sniffed here."""
    return body.startswith(IMAGE_MAGIC) or (body[:4] == b"RIFF" and body[8:12] == b"WEBP")


async def parse_classify(request, max_client_batch: int) -> ClassifyRequest:
    """A classify request in any of the shapes the Hugging Face Inference API takes: JSON (`inputs` base64),
    multipart, or the raw bytes of one image (Content-Type image/* or application/octet-stream, or bytes that
    begin as an image does; parameters, if any, in the query string)."""
    import asyncio

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await parse_classify_form(request, max_client_batch)
    body = await request.body()
    if ctype.startswith(RAW_IMAGE_TYPES) or looks_like_image(body):
        if not body:
            raise BadRequest("the request body is empty (expected the bytes of one image)")
        image = await asyncio.to_thread(decode_image, body, 0)
        req = ClassifyRequest([image], True, request.query_params.get("model"))
        return _parameters(_field_parameters(request.query_params), req)
    return await asyncio.to_thread(parse_classify_json, body, max_client_batch)
