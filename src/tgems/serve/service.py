"""What every route of `tgems serve` shares: the served models (loaded in a thread at startup), the metrics,
the handler wrapper that turns errors into one-line 4xx answers in the route's own error shape, submitting
rows to a model's scheduler, and the classification every classify route answers from."""
from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from dataclasses import dataclass

from tgems.errors import TGEMError
from tgems.serve.schemas import BadRequest

DISCONNECT_POLL_S = 0.05  # how often a waiting request checks whether its client is still there


class _ClientGone(Exception):
    pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept fixed


def steady_heap() -> bool:
    """Fix glibc's mmap threshold, so that every block over 128 KB (a batch of hidden states, a decoded image)
    is mapped on its own and given back to the OS when freed. Why: by default glibc raises the threshold to
    the largest block freed so far (up to 32 MB), after which those blocks come from the heap arenas of the
    server's threads, and the holes they leave let the resident memory creep up with every request (a
    ViT-B/32-shaped server grew 18 % over 3,000 requests while its Python objects stayed flat). A user's own
    MALLOC_MMAP_THRESHOLD_ wins; elsewhere than glibc nothing is done. True when set here."""
    import ctypes
    import os

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def _stderr(msg: str):
    print(msg, file=sys.stderr, flush=True)


def plain_error(message: str, status: int, param=None) -> dict:
    """The tgems and Hugging Face error body: {"error": one line}."""
    return {"error": message}


@dataclass
class Classified:
    """One classify request's answers: a RowResult per image, with what the request resolved to."""

    req: object  # schemas.ClassifyRequest
    model: object  # models.ServedModel
    labels: list
    rows: list
    calibrated: bool
    notes: list


class Service:
    """The models, settings, metrics and log of one app; `handler` wraps each route."""

    def __init__(self, sources, settings, models, log, on_load_error):
        from tgems.serve.metrics import Metrics
        from tgems.serve.models import ServeSettings

        self.sources, self.settings = sources, settings or ServeSettings()
        self._given, self.log, self.on_load_error = models, log or _stderr, on_load_error
        self.state = {"models": None, "error": None}
        self.metrics = Metrics(lambda: self.state["models"])

    # ------------------------------------------------------------------ loading

    def load(self):
        from tgems.serve.models import build_served

        steady_heap()
        try:
            loaded = self._given if self._given is not None else build_served(self.sources, self.settings, self.log)
            for m in loaded.values():
                m.scheduler.start()
            self.state["models"] = loaded
            self.log(f"tgems serve: ready: {', '.join(loaded)}")
        except TGEMError as e:
            self._failed(str(e), f"tgems: error: {e}")
        except Exception as e:  # a bug: still one line
            self._failed(f"{type(e).__name__}: {e}", f"tgems: internal error while loading: {type(e).__name__}: {e}")

    def _failed(self, error, line):
        self.state["error"] = error
        self.log(line)
        if self.on_load_error:
            self.on_load_error(error)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        loader = threading.Thread(target=self.load, name="tgems-serve-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loader.join)
            for m in (self.state["models"] or {}).values():  # requests are finished: let the queues drain, stop
                await asyncio.to_thread(m.scheduler.stop)

    def ready(self) -> dict:
        if self.state["models"] is None:
            raise BadRequest("the model is still loading" if self.state["error"] is None
                             else f"the model failed to load: {self.state['error']}", 503, {"Retry-After": "5"})
        return self.state["models"]

    def pick(self, name):
        served = self.ready()
        if name is None:
            return next(iter(served.values()))
        if name not in served:
            raise BadRequest(f"unknown model '{name}' (serving: {', '.join(served)})", 404, param="model",
                             code="model_not_found")
        return served[name]

    # ------------------------------------------------------------------ handlers

    def handler(self, name, fn, error_body=plain_error):
        """One-line errors in `error_body`'s shape, request metrics, never a 500 for a client's mistake."""
        from starlette.responses import JSONResponse, Response

        async def handle(request):
            t0 = time.perf_counter()
            try:
                resp = await fn(request)
            except BadRequest as e:
                resp = JSONResponse(error_body(str(e), e.status, e), status_code=e.status, headers=e.headers)
            except TGEMError as e:
                resp = JSONResponse(error_body(str(e), 400, None), status_code=400)
            except _ClientGone:
                resp = Response(status_code=499)
            except Exception as e:  # a bug or a failed step: one line, logged
                self.log(f"tgems serve: internal error on {name}: {type(e).__name__}: {e}")
                resp = JSONResponse(error_body(f"internal error: {type(e).__name__}", 500, None), status_code=500)
            self.metrics.observe_request(name, resp.status_code, time.perf_counter() - t0)
            return resp
        return handle

    async def run_rows(self, request, model, pixels, policy, auditable=False):
        """Submit one row per image; wait for every answer, or drop the rows when the client leaves."""
        from tgems.scheduler import QueueFull

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
            self.metrics.observe_row(model.name, r)
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

    async def classify(self, request) -> Classified:
        """Parse a classify request (JSON, multipart or a raw image body), run its rows, return the answers."""
        from tgems.serve.schemas import parse_classify

        self.ready()
        req = await parse_classify(request, self.settings.max_client_batch)
        model = self.pick(req.model)
        policy, calibrated, notes, labels = await asyncio.to_thread(
            model.policy, req.labels, req.templates, req.budget, req.max_drop, req.tau)
        pixels = await asyncio.to_thread(model.backbone.preprocess, req.images)
        rows = await self.run_rows(request, model, pixels, policy, auditable=calibrated)
        return Classified(req, model, labels, rows, calibrated, notes)
