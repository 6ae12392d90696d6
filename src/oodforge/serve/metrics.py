"""The Prometheus metrics a served guard exposes at ``GET /metrics`` (one registry per server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

P_VALUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    """Requests, latency, images, decisions, the rolling OOD rate, p-values, batch sizes and the drift alarm."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("oodforge_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("oodforge_request_seconds", "Request latency", ["endpoint"], registry=r,
                                 buckets=LATENCY_BUCKETS)
        self.images = Counter("oodforge_images", "Images predicted", registry=r)
        self.decisions = Counter("oodforge_decisions", "Decisions by value", ["decision"], registry=r)
        self.ood_rate = Gauge("oodforge_ood_rate", "Share of the monitoring window decided out", registry=r)
        self.p_values = Histogram("oodforge_p_value", "Conformal p-values of predicted images", registry=r,
                                  buckets=P_VALUE_BUCKETS)
        self.batch_size = Histogram("oodforge_batch_size", "Images per model batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.alarm = Gauge("oodforge_drift_alarm", "1 while the drift alarm is raised", registry=r)
        self.alarms = Counter("oodforge_drift_alarms", "Drift alarms raised", registry=r)

    def observe_rows(self, rows: list[dict]) -> None:
        """Count a batch's predictions."""
        self.images.inc(len(rows))
        for row in rows:
            if row.get("decision") is not None:
                self.decisions.labels(row["decision"]).inc()
                self.p_values.observe(row["p_value"])

    def observe_monitor(self, state: dict, raised: bool) -> None:
        """Mirror the drift monitor's state."""
        self.ood_rate.set(state["ood_rate"])
        self.alarm.set(1.0 if state["alarm"] else 0.0)
        if raised:
            self.alarms.inc()

    def text(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
