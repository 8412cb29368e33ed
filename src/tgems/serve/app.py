"""The ASGI app of `tgems serve` (Starlette): classify, embeddings, models, health, metrics and the page.

Every request is answered in one JSON object; a client's mistake is a 4xx with {"error": one line}, never
a 500. Images go through the depth-queue scheduler of their model, one row each; a client that leaves
has its rows dropped."""
from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from pathlib import Path

from tgems.errors import TGEMError
from tgems.serve.schemas import BadRequest

STATIC = Path(__file__).parent / "static"
DISCONNECT_POLL_S = 0.05  # how often a waiting request checks whether its client is still there


class _ClientGone(Exception):
    pass


class _BodyLimit:
    """ASGI middleware: a request body past `max_bytes` is refused with 413, at once when its Content-Length
    says so (nothing of it is read), else as soon as the bytes streamed in pass the limit."""

    def __init__(self, app, max_mb: float, on_refused=None):
        self.app, self.max_mb, self.on_refused = app, max_mb, on_refused
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
            resp = JSONResponse({"error": self.reason(f"{int(length)} bytes")}, status_code=413,
                                headers={"Connection": "close"})
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


def _stderr(msg: str):
    print(msg, file=sys.stderr, flush=True)


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

    from tgems.serve.metrics import Metrics
    from tgems.serve.models import ServeSettings, build_served

    settings = settings or ServeSettings()
    log = log or _stderr
    state = {"models": None, "error": None}
    metrics = Metrics(lambda: state["models"])

    def load():
        try:
            loaded = models if models is not None else build_served(sources, settings, log)
            for m in loaded.values():
                m.scheduler.start()
            state["models"] = loaded
            log(f"tgems serve: ready: {', '.join(loaded)}")
        except TGEMError as e:
            state["error"] = str(e)
            log(f"tgems: error: {e}")
            if on_load_error:
                on_load_error(str(e))
        except Exception as e:  # a bug: still one line
            state["error"] = f"{type(e).__name__}: {e}"
            log(f"tgems: internal error while loading: {type(e).__name__}: {e}")
            if on_load_error:
                on_load_error(state["error"])

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loader = threading.Thread(target=load, name="tgems-serve-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loader.join)
            for m in (state["models"] or {}).values():  # requests are finished: let the queues drain, stop
                await asyncio.to_thread(m.scheduler.stop)

    def ready() -> dict:
        if state["models"] is None:
            raise BadRequest("the model is still loading" if state["error"] is None
                             else f"the model failed to load: {state['error']}", 503, {"Retry-After": "5"})
        return state["models"]

    def pick(name):
        served = ready()
        if name is None:
            return next(iter(served.values()))
        if name not in served:
            raise BadRequest(f"unknown model '{name}' (serving: {', '.join(served)})", 404)
        return served[name]

    def route(name):
        """A handler wrapper: one-line errors, request metrics, never a 500 for a client's mistake."""
        def wrap(fn):
            async def handler(request):
                t0 = time.perf_counter()
                try:
                    resp = await fn(request)
                except BadRequest as e:
                    resp = JSONResponse({"error": str(e)}, status_code=e.status, headers=e.headers)
                except TGEMError as e:
                    resp = JSONResponse({"error": str(e)}, status_code=400)
                except _ClientGone:
                    resp = Response(status_code=499)
                except Exception as e:  # a bug or a failed step: one line, logged
                    log(f"tgems serve: internal error on {name}: {type(e).__name__}: {e}")
                    resp = JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)
                metrics.observe_request(name, resp.status_code, time.perf_counter() - t0)
                return resp
            return handler
        return wrap

    async def run_rows(request, model, pixels, policy, auditable=False):
        """Submit one row per image; wait for every answer, or drop the rows when the client leaves."""
        from tgems.scheduling.driver import QueueFull

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        results, left = [None] * len(pixels), [len(pixels)]

        def settle(i, r):
            if fut.done():
                return
            if isinstance(r, Exception):
                fut.set_exception(r)
                return
            results[i] = r
            metrics.observe_row(model.name, r)
            left[0] -= 1
            if not left[0]:
                fut.set_result(results)

        tag = object()
        try:
            model.scheduler.submit(pixels, policy, lambda i, r: loop.call_soon_threadsafe(settle, i, r),
                                   tag=tag, auditable=auditable)
        except QueueFull as e:
            raise BadRequest(f"{e}; retry later", 429, {"Retry-After": "1"}) from None
        try:
            while not fut.done():
                await asyncio.wait([fut], timeout=DISCONNECT_POLL_S)
                if not fut.done() and await request.is_disconnected():
                    raise _ClientGone()
            return fut.result()
        finally:
            if not fut.done():
                model.scheduler.cancel(tag)
                fut.cancel()

    @route("classify")
    async def classify(request):
        from tgems.serve.schemas import parse_classify_form, parse_classify_json

        ready()
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            req = await parse_classify_form(request, settings.max_client_batch)
        else:
            req = await asyncio.to_thread(parse_classify_json, await request.body(), settings.max_client_batch)
        model = pick(req.model)
        policy, calibrated, notes, labels = await asyncio.to_thread(
            model.policy, req.labels, req.templates, req.budget, req.max_drop, req.tau)
        pixels = await asyncio.to_thread(model.backbone.preprocess, req.images)
        rows = await run_rows(request, model, pixels, policy, auditable=calibrated)
        out = []
        for r in rows:
            probs = r.probs
            top = probs.topk(min(req.top_k, len(labels)))
            item = {"labels": [{"label": labels[i], "score": round(float(p), 6)}
                               for p, i in zip(top.values.tolist(), top.indices.tolist())],
                    "exit_layer": r.exit_layer, "num_layers": r.num_layers,
                    "flops_ratio": round(r.flops_ratio, 6), "calibrated": calibrated, "model": model.name}
            if notes:
                item["notes"] = notes
            out.append(item)
        return JSONResponse(out[0] if req.single else out)

    @route("embeddings")
    async def embeddings(request):
        import torch.nn.functional as F

        from tgems.serve.schemas import parse_embeddings_json

        ready()
        req = await asyncio.to_thread(parse_embeddings_json, await request.body(), settings.max_client_batch)
        model = pick(req.model)
        data, tokens = [], 0
        if req.texts is not None:
            def encode():
                emb = F.normalize(model.backbone.encode_text(req.texts).float(), dim=-1).cpu()
                return emb, sum(len(t) for t in model.backbone.token_ids(req.texts))
            emb, tokens = await asyncio.to_thread(encode)
            data = [{"object": "embedding", "index": i, "embedding": e.tolist()} for i, e in enumerate(emb)]
        else:
            pixels = await asyncio.to_thread(model.backbone.preprocess, req.images)
            policy = model.default_policy if req.early_exit else model.never_exit
            rows = await run_rows(request, model, pixels, policy)
            for i, r in enumerate(rows):
                item = {"object": "embedding", "index": i,
                        "embedding": F.normalize(r.embedding, dim=-1).tolist()}
                if req.early_exit:
                    item.update(exit_layer=r.exit_layer, num_layers=r.num_layers, flops_ratio=round(r.flops_ratio, 6))
                data.append(item)
        return JSONResponse({"object": "list", "data": data, "model": model.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @route("models")
    async def list_models(request):
        served = ready()
        return JSONResponse({"object": "list", "data": [m.describe() for m in served.values()]})

    async def health(request):
        if state["models"] is None:
            body = {"status": "loading"} if state["error"] is None else {"status": "failed", "error": state["error"]}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok", "models": list(state["models"])})

    async def metrics_route(request):
        body, ctype = await asyncio.to_thread(metrics.render)
        return Response(body, media_type=ctype)

    async def page(request):
        return FileResponse(STATIC / "index.html")

    routes = [Route("/", page), Route("/health", health), Route("/metrics", metrics_route),
              Route("/v1/models", list_models), Route("/v1/classify", classify, methods=["POST"]),
              Route("/v1/embeddings", embeddings, methods=["POST"]),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    names = {"/v1/classify": "classify", "/v1/embeddings": "embeddings"}
    refused = lambda path: metrics.observe_request(names.get(path, "other"), 413, 0.0)  # noqa: E731
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(_BodyLimit, max_mb=settings.max_body_mb, on_refused=refused)])
    app.state.tgems = state
    app.state.metrics = metrics
    return app
