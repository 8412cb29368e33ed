"""The Hugging Face routes of `tgems serve`: zero-shot image classification in the exact shape of the HF
Inference API, where HF clients post.

`huggingface_hub.InferenceClient(model=URL).zero_shot_image_classification(image, candidate_labels=...)`
posts `{"inputs": <base64>, "parameters": {"candidate_labels": [...], ...}}` to URL itself, and
`InferenceClient(base_url=URL)` to the same URL, i.e. `POST /` of a bare server address; both expect a bare
list `[{"label", "score"}, ...]` over every candidate label, best first. The exit layer, depth and FLOPs
ratio travel in response headers (the body has no room for them); the tgems object with them, notes and
the calibration flag is on `POST /v1/tgems/classify`. A raw image body (Content-Type image/* or
application/octet-stream) is taken as the HF Inference API takes it. Errors: `{"error": "<one line>"}`."""
from __future__ import annotations

from tgems.serve.service import plain_error

def ranked(labels, probs, top_k=None) -> list[dict]:
    """[{"label", "score"}] over the labels (the first top_k when given), highest score first."""
    order = probs.argsort(descending=True).tolist()
    return [{"label": labels[i], "score": round(float(probs[i]), 6)} for i in order[:top_k or len(order)]]


def headers(c) -> dict:
    """Exit layer, depth and FLOPs ratio of each image (comma-separated when there are several)."""
    rows = c.rows
    return {"X-TGEMS-Exit-Layer": ",".join(str(r.exit_layer) for r in rows),
            "X-TGEMS-Num-Layers": ",".join(str(r.num_layers) for r in rows),
            "X-TGEMS-FLOPs-Ratio": ",".join(f"{r.flops_ratio:.6f}" for r in rows),
            "X-TGEMS-Calibrated": "true" if c.calibrated else "false", "X-TGEMS-Model": c.model.name}


def routes(svc) -> list:
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def classify(request):
        c = await svc.classify(request)
        top_k = c.req.top_k if c.req.top_k_given else None
        out = [ranked(c.labels, r.probs, top_k) for r in c.rows]
        return JSONResponse(out[0] if c.req.single else out, headers=headers(c))

    handler = svc.handler("classify", classify, plain_error)
    return [Route("/", handler, methods=["POST"]), Route("/v1/classify", handler, methods=["POST"])]
