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
from tgems.io import is_disk_full
from tgems.serve.schemas import BadRequest

DISK_FULL = ("no space left on the server's disk (uploads over 1 MB are spooled to its temporary folder); "
             "nothing was answered for this request: retry once the operator has freed space")
DISCONNECT_POLL_S = 0.05  # how often a waiting request checks whether its client is still there


class _ClientGone(Exception):
    pass


TRIM_EVERY_S = 2.0  # how often the server gives the heap's free pages back to the OS


def release_heap() -> bool:
    """Give the free pages of every malloc arena back to the OS (`tgems.heap.trim`); False without glibc.

    Why: a server's threads (the event loop, decoding in to_thread workers, the scheduler) free batch-sized
    blocks in glibc's heap arenas, whose mmap threshold rises with the largest block freed; the freed pages
    stay resident, so the server's RSS crept up with every request (a ViT-B/32-shaped server: +18 % over
    3,000 requests, while its Python objects stayed flat under tracemalloc). Trimming every TRIM_EVERY_S
    bounds it, for no CPU cost we could measure (a single-thread A/B on the ViT-B/32 shape: 22 - 24 images
    per CPU-second either way); mapping every large block on its own instead (a fixed mmap threshold) kept
    RSS flat too but cost a quarter more CPU per image in page faults (17 - 18)."""
    from tgems.heap import trim

    return trim()


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

        self.sources, self.settings = sources, (settings or ServeSettings()).check()
        self._given, self.log, self.on_load_error = models, log or _stderr, on_load_error
        self.state = {"models": None, "error": None}
        self.trims = 0
        self.metrics = Metrics(lambda: self.state["models"])

    # ------------------------------------------------------------------ loading

    def load(self):
        from tgems.serve.models import build_served

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
        trimmer = asyncio.create_task(self._trim())
        try:
            yield
        finally:
            trimmer.cancel()
            await asyncio.to_thread(loader.join)
            for m in (self.state["models"] or {}).values():  # requests are finished: let the queues drain, stop
                await asyncio.to_thread(m.scheduler.stop)

    async def _trim(self):
        while True:
            await asyncio.sleep(TRIM_EVERY_S)
            if not await asyncio.to_thread(release_heap):
                return
            self.trims += 1

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
                if is_disk_full(e):  # the server's own disk (uploads spool there past 1 MB): not the client's doing
                    why = DISK_FULL
                    self.log(f"tgems serve: {why} ({name}: {getattr(e, 'filename', None) or 'an upload'})")
                    resp = JSONResponse(error_body(why, 507, None), status_code=507)
                else:
                    self.log(f"tgems serve: internal error on {name}: {type(e).__name__}: {e}")
                    resp = JSONResponse(error_body(f"internal error: {type(e).__name__}", 500, None), status_code=500)
            self.metrics.observe_request(name, resp.status_code, time.perf_counter() - t0)
            return resp
        return handle

    async def run_rows(self, request, model, pixels, policy, auditable=False):
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
