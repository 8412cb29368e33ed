"""Prometheus metrics of one server: its own registry (so several apps can live in one process, as in the
tests), request counters and histograms observed by the routes, and scheduler figures read at scrape time."""
from __future__ import annotations

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _SchedulerCollector:
    """Per model: batch occupancy and steps per layer, rows in flight and waiting, FLOPs saved, audit, and the
    exit-layer histogram (from the scheduler's counts, so its buckets are that model's layers)."""

    def __init__(self, models_ref):
        self.models_ref = models_ref

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        steps = CounterMetricFamily("tgems_layer_steps", "Blocks run at this layer", labels=["model", "layer"])
        rows = CounterMetricFamily("tgems_layer_rows", "Rows run through this layer", labels=["model", "layer"])
        occ = GaugeMetricFamily("tgems_layer_occupancy", "Mean rows per step at this layer / max batch size",
                                labels=["model", "layer"])
        inflight = GaugeMetricFamily("tgems_rows_inflight", "Rows past layer 0, not yet answered", labels=["model"])
        waiting = GaugeMetricFamily("tgems_rows_waiting", "Rows waiting to enter layer 0", labels=["model"])
        cancelled = CounterMetricFamily("tgems_rows_cancelled", "Rows dropped because their client left",
                                        labels=["model"])
        flops = CounterMetricFamily("tgems_flops", "Encoder FLOPs of answered rows", labels=["model"])
        saved = CounterMetricFamily("tgems_flops_saved", "Full-encoder FLOPs minus FLOPs run, answered rows",
                                    labels=["model"])
        audit_n = CounterMetricFamily("tgems_audit_rows", "Early exits audited at full depth", labels=["model"])
        audit_k = CounterMetricFamily("tgems_audit_disagreements", "Audited exits whose answer differs from "
                                      "the full model's", labels=["model"])
        audit_lo = GaugeMetricFamily("tgems_audit_disagreement_lower", "Anytime-valid (1 - delta) lower bound on "
                                     "the live disagreement; above max_drop: evidence of a violation (the alarm)",
                                     labels=["model"])
        audit_hi = GaugeMetricFamily("tgems_audit_disagreement_upper", "Anytime-valid (1 - delta) upper bound on "
                                     "the live disagreement; below max_drop: the guarantee confirmed live",
                                     labels=["model"])
        audit_eps = GaugeMetricFamily("tgems_audit_max_drop", "The calibrated max_drop the bounds are held to",
                                      labels=["model"])
        audit_alarm = GaugeMetricFamily("tgems_audit_alarm", "1 while the lower bound is above max_drop",
                                        labels=["model"])
        exits = HistogramMetricFamily("tgems_exit_layer", "Layer each answered image exited at (buckets: the "
                                      "model's layers)", labels=["model"])
        for name, m in (self.models_ref() or {}).items():
            s = m.scheduler
            with s.cond:
                st = {k: (list(v) if isinstance(v, list) else v) for k, v in s.stats.items()}
                n_in, n_wait, a = s.inflight, s.pending, s.audit.summary()
            for d in range(s.L):
                layer = str(d + 1)
                steps.add_metric([name, layer], st["steps"][d])
                rows.add_metric([name, layer], st["rows"][d])
                if st["steps"][d]:
                    occ.add_metric([name, layer], st["rows"][d] / (st["steps"][d] * s.B))
            inflight.add_metric([name], n_in)
            waiting.add_metric([name], n_wait)
            cancelled.add_metric([name], st["cancelled"])
            flops.add_metric([name], st["flops"])
            saved.add_metric([name], st["flops_full"] - st["flops"])
            audit_n.add_metric([name], a["n"])
            audit_k.add_metric([name], a["disagree"])
            if a["n"]:
                audit_lo.add_metric([name], a["lower"])
                audit_hi.add_metric([name], a["upper"])
            if a["max_drop"] is not None:
                audit_eps.add_metric([name], a["max_drop"])
                audit_alarm.add_metric([name], float(a["exceeded"]))
            counts = st["exit_layers"]
            cum = [sum(counts[:l + 1]) for l in range(1, s.L + 1)]
            exits.add_metric([name], [(str(float(l)), cum[l - 1]) for l in range(1, s.L + 1)] + [("+Inf", cum[-1])],
                             sum_value=float(sum(l * c for l, c in enumerate(counts))))
        yield from (steps, rows, occ, inflight, waiting, cancelled, flops, saved, audit_n, audit_k, audit_lo, audit_hi,
                    audit_eps, audit_alarm, exits)


class Metrics:
    def __init__(self, models_ref):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("tgems_requests", "HTTP requests by route and status code", ["route", "code"],
                                registry=self.registry)
        self.errors = Counter("tgems_errors", "HTTP requests answered with a 4xx or 5xx, by route and code",
                              ["route", "code"], registry=self.registry)
        self.latency = Histogram("tgems_request_seconds", "Time from request to response", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Histogram("tgems_queue_seconds", "Time an image waited before its first block", ["model"],
                               buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_SchedulerCollector(models_ref))

    def observe_request(self, route: str, code: int, seconds: float):
        self.requests.labels(route, str(code)).inc()
        if code >= 400:
            self.errors.labels(route, str(code)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_row(self, model: str, res):
        self.queue.labels(model).observe(res.queue_s)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
