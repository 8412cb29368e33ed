"""The ASGI app of `tgems serve` (Starlette): the routes of each ecosystem put together.

hf.py: zero-shot classification where Hugging Face clients post (`POST /`, `POST /v1/classify`); openai.py:
`/v1/embeddings` and `/v1/models`; here the tgems routes (`POST /v1/tgems/classify`, the richer answer),
/health, /metrics and the page. A client's mistake is a one-line 4xx in its route's error shape, never a
500. Images go through the depth-queue scheduler of their model, one row each; a client that leaves has
its rows dropped."""
from __future__ import annotations

import asyncio
from pathlib import Path

from tgems.serve.schemas import BadRequest

STATIC = Path(__file__).parent / "static"
OPENAI_PATHS = ("/v1/embeddings", "/v1/models")


class _BodyLimit:
    """ASGI middleware: a request body past `max_bytes` is refused with 413, at once when its Content-Length
    says so (nothing of it is read), else as soon as the bytes streamed in pass the limit."""

    def __init__(self, app, max_mb: float, on_refused=None, error_body=None):
        self.app, self.max_mb, self.on_refused, self.error_body = app, max_mb, on_refused, error_body
        self.max_bytes = int(max_mb * 2 ** 20)

    def reason(self, size: str) -> str:
        return f"the request body ({size}) is past the limit of {self.max_mb:g} MB (--max-body-mb)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            from starlette.responses import JSONResponse

            if self.on_refused:
                self.on_refused(scope["path"])
            why = self.reason(f"{int(length)} bytes")
            body = self.error_body(scope["path"], why) if self.error_body else {"error": why}
            resp = JSONResponse(body, status_code=413, headers={"Connection": "close"})
            return await resp(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BadRequest(self.reason(f"over {self.max_bytes} bytes so far"), 413, {"Connection": "close"})
            return message

        await self.app(scope, counted, send)


def tgems_classify_item(c, r) -> dict:
    """The tgems answer for one image: top labels, exit layer, depth, FLOPs ratio, calibration and notes."""
    from tgems.serve.hf import ranked

    item = {"labels": ranked(c.labels, r.probs, min(c.req.top_k, len(c.labels))), "exit_layer": r.exit_layer,
            "num_layers": r.num_layers, "flops_ratio": round(r.flops_ratio, 6), "calibrated": c.calibrated,
            "model": c.model.name}
    if c.notes:
        item["notes"] = c.notes
    return item


def create_app(sources: dict | None = None, settings=None, models: dict | None = None, log=None,
               on_load_error=None):
    """The app for {name: classifier dir} `sources`, loaded in a thread at startup (/health answers 503
    until then), or for ready `models` ({name: ServedModel}). `on_load_error(message)` is called when
    loading fails (the CLI then stops the server)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from tgems.serve import hf, openai
    from tgems.serve.service import Service

    svc = Service(sources, settings, models, log, on_load_error)

    async def classify(request):
        c = await svc.classify(request)
        out = [tgems_classify_item(c, r) for r in c.rows]
        return JSONResponse(out[0] if c.req.single else out)

    async def health(request):
        state = svc.state
        if state["models"] is None:
            body = {"status": "loading"} if state["error"] is None else {"status": "failed", "error": state["error"]}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok", "models": list(state["models"])})

    async def metrics_route(request):
        body, ctype = await asyncio.to_thread(svc.metrics.render)
        return Response(body, media_type=ctype)

    async def page(request):
        return FileResponse(STATIC / "index.html")

    routes = [*hf.routes(svc), *openai.routes(svc),
              Route("/v1/tgems/classify", svc.handler("classify", classify), methods=["POST"]),
              Route("/", page), Route("/health", health), Route("/metrics", metrics_route),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    names = {"/": "classify", "/v1/classify": "classify", "/v1/tgems/classify": "classify",
             "/v1/embeddings": "embeddings"}
    refused = lambda path: svc.metrics.observe_request(names.get(path, "other"), 413, 0.0)  # noqa: E731

    def error_body(path, why):
        return openai.openai_error(why, 413) if path in OPENAI_PATHS else {"error": why}

    app = Starlette(routes=routes, lifespan=svc.lifespan,
                    middleware=[Middleware(_BodyLimit, max_mb=svc.settings.max_body_mb, on_refused=refused,
                                           error_body=error_body)])
    app.state.tgems = svc.state
    app.state.metrics = svc.metrics
    app.state.service = svc
    return app

