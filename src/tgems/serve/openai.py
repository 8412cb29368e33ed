"""The OpenAI routes of `tgems serve`, in OpenAI's exact shapes: `POST /v1/embeddings` (with the image
extension Infinity uses: `"modality": "image"`) and `GET /v1/models`.

What the openai-python client relies on: it sends `"encoding_format": "base64"` unless told otherwise and
decodes the string as float32 little-endian; `dimensions` is a promise about the vector's length, so a
value other than the model's size is refused, never ignored; errors are
`{"error": {"message", "type", "param", "code"}}`, whose message the client shows."""
from __future__ import annotations

import asyncio
import base64
import time
import warnings
from dataclasses import dataclass

import numpy as np

from tgems.serve.schemas import BadRequest, decode_base64_image, json_object

ENCODINGS = ("float", "base64")


def openai_error(message: str, status: int, err=None) -> dict:
    """OpenAI's error body; `err` (a BadRequest) may name the request field at fault and a code."""
    kind = ("invalid_request_error" if status < 500 and status != 429 else
            "rate_limit_error" if status == 429 else "server_error")
    return {"error": {"message": message, "type": kind, "param": getattr(err, "param", None),
                      "code": getattr(err, "code", None)}}


@dataclass
class EmbeddingsRequest:
    model: str | None
    modality: str
    encoding: str = "float"
    dimensions: int | None = None
    texts: list[str] | None = None
    images: list | None = None
    early_exit: bool = False


def parse_embeddings_json(body: bytes, max_client_batch: int) -> EmbeddingsRequest:
    data = json_object(body, "input")
    if "input" not in data:
        raise BadRequest("missing field 'input' (a string or a list of strings)", param="input")
    items = data["input"] if isinstance(data["input"], list) else [data["input"]]
    if not items:
        raise BadRequest("input is empty", param="input")
    if len(items) > max_client_batch:
        raise BadRequest(f"{len(items)} inputs in one request; at most {max_client_batch} (--max-client-batch)",
                         413, param="input")
    modality = data.get("modality", "text")
    if modality not in ("text", "image"):
        raise BadRequest(f"modality must be 'text' or 'image', got {modality!r}", param="modality")
    fmt = data.get("encoding_format") or "float"
    if fmt not in ENCODINGS:
        raise BadRequest(f"encoding_format must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
    dims = data.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise BadRequest(f"dimensions must be a positive integer, got {dims!r}", param="dimensions")
    early = data.get("early_exit", False)
    if not isinstance(early, bool):
        raise BadRequest("early_exit must be true or false", param="early_exit")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", param="model")
    req = EmbeddingsRequest(model, modality, fmt, dims, early_exit=early)
    if modality == "text":
        for i, t in enumerate(items):
            if not isinstance(t, str) or not t.strip():
                raise BadRequest(f"input {i}: expected a non-empty string (token ids are not taken)", param="input")
        req.texts = items
    else:
        try:
            req.images = [decode_base64_image(x, i) for i, x in enumerate(items)]
        except BadRequest as e:
            e.param = "input"
            raise
    return req


def check_texts(backbone, texts):
    """Refuse, as classify refuses such labels, a text made only of words the model cannot read."""
    from tgems.errors import TGEMError
    from tgems.profiles import check_readable_query

    for i, t in enumerate(texts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a half-read text is embedded, as classify scores such a label
                check_readable_query(backbone, t)
        except TGEMError as e:
            why = str(e).replace("the query", "the text", 1)
            raise BadRequest(f"input {i}: {why}", param="input", code="unreadable_text") from None


def _encode(vec, fmt: str):
    if fmt == "base64":
        return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
    return vec.tolist()


def routes(svc) -> list:
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    started = int(time.time())

    async def embeddings(request):
        import torch.nn.functional as F

        svc.ready()
        req = await asyncio.to_thread(parse_embeddings_json, await request.body(), svc.settings.max_client_batch)
        model = svc.pick(req.model)
        size = model.backbone.embed_dim
        if req.dimensions is not None and req.dimensions != size:
            raise BadRequest(f"dimensions {req.dimensions}: model '{model.name}' gives {size}-dimensional "
                             f"embeddings and does not shorten them (leave dimensions out or give {size})",
                             param="dimensions")
        data, tokens = [], 0
        if req.texts is not None:
            def encode():
                check_texts(model.backbone, req.texts)
                emb = F.normalize(model.backbone.encode_text(req.texts).float(), dim=-1).cpu()
                return emb, sum(len(t) for t in model.backbone.token_ids(req.texts))
            emb, tokens = await asyncio.to_thread(encode)
            data = [{"object": "embedding", "index": i, "embedding": _encode(e, req.encoding)}
                    for i, e in enumerate(emb)]
        else:
            pixels = await asyncio.to_thread(model.backbone.preprocess, req.images)
            policy = model.default_policy if req.early_exit else model.never_exit
            rows = await svc.run_rows(request, model, pixels, policy)
            for i, r in enumerate(rows):
                item = {"object": "embedding", "index": i,
                        "embedding": _encode(F.normalize(r.embedding, dim=-1), req.encoding)}
                if req.early_exit:
                    item.update(exit_layer=r.exit_layer, num_layers=r.num_layers, flops_ratio=round(r.flops_ratio, 6))
                data.append(item)
        return JSONResponse({"object": "list", "data": data, "model": model.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def list_models(request):
        served = svc.ready()
        return JSONResponse({"object": "list", "data": [{**m.describe(), "created": started}
                                                         for m in served.values()]})

    return [Route("/v1/embeddings", svc.handler("embeddings", embeddings, openai_error), methods=["POST"]),
            Route("/v1/models", svc.handler("models", list_models, openai_error))]
