"""Optional Prometheus metrics (prometheus-client) on a localhost port: ``[metrics] port``.

Counters live in this process (associations, instances, bytes, send failures, inference time);
studies by state and outbox depth are read from the database at each scrape, so they are right
across restarts and across nodes sharing one database. A registry of its own, passed explicitly.
"""

from __future__ import annotations

import logging

from cxr_node.db.session import Database
from cxr_node.errors import ConfigError, db_error_text

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, db: Database) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram
        except ImportError as e:
            raise ConfigError("[metrics] port is set but prometheus-client is not installed "
                              "(pip install 'cxr-node[metrics]')") from e
        self.registry = CollectorRegistry()
        r = self.registry
        self.associations = Counter("cxr_node_associations", "Associations by outcome", ["outcome"], registry=r)
        self.instances = Counter("cxr_node_instances", "Received instances by outcome", ["outcome"], registry=r)
        self.bytes = Counter("cxr_node_received_bytes", "Bytes of instances stored", registry=r)
        self.send_failures = Counter("cxr_node_send_failures", "Failed result sends by kind", ["kind"], registry=r)
        self.takeovers = Counter("cxr_node_takeovers", "Studies and outbox items this node took over from nodes "
                                 "whose lease had expired", ["kind"], registry=r)
        self.inference = Histogram("cxr_node_inference_seconds", "Preprocess + predict + Grad-CAM per image",
                                   buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=r)
        r.register(_DatabaseCollector(db))

    def serve(self, port: int) -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr="127.0.0.1", registry=self.registry)
        log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", port)


class _DatabaseCollector:
    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        from sqlalchemy import func, select

        from cxr_node.db.models import ImageResult, Notification, OutboxItem, StationRow, Study
        from cxr_node.eligibility.refusal import RefusalCode
        from cxr_node.study import leases

        studies = GaugeMetricFamily("cxr_node_studies", "Studies by state", labels=["state"])
        outbox = GaugeMetricFamily("cxr_node_outbox_items", "Outbox items by state", labels=["state"])
        notes = GaugeMetricFamily("cxr_node_notifications", "Urgent notifications (HL7 v2, FHIR) by channel and state",
                                  labels=["channel", "state"])
        refused = GaugeMetricFamily("cxr_node_films_not_analysed", "Films not analysed, by kind of reason",
                                    labels=["reason"])
        drifted = GaugeMetricFamily("cxr_node_station_drifted", "1 when the station's films or the model's answers "
                                    "moved past [onboarding] drift_threshold (see cxr-node status)", labels=["station"])
        psi = GaugeMetricFamily("cxr_node_station_psi", "Population stability index of a statistic of the station's "
                                "recent films against its reference", labels=["station", "statistic"])
        shadow = GaugeMetricFamily("cxr_node_station_shadow", "1 when the station is in shadow mode (results kept, "
                                   "not sent)", labels=["station"])
        up = GaugeMetricFamily("cxr_node_node_live", "1 while the node's lease is current (nodes sharing this "
                               "database; cxr-node status lists them)", labels=["node"])
        age = GaugeMetricFamily("cxr_node_node_heartbeat_age_seconds", "Seconds since the node last renewed its "
                                "lease", labels=["node"])
        held = GaugeMetricFamily("cxr_node_node_held", "What the node holds under its lease: studies being analysed, "
                                 "outbox items being sent", labels=["node", "kind"])
        try:
            with self.db.session() as s:
                for state, n in s.execute(select(Study.state, func.count()).group_by(Study.state)):
                    studies.add_metric([state], n)
                counts = dict(s.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all())
                note_counts = s.execute(select(Notification.channel, Notification.state, func.count())
                                        .group_by(Notification.channel, Notification.state)).all()
                kinds: dict[str, int] = {}
                for code, n in s.execute(select(ImageResult.refusal_code, func.count())
                                         .where(ImageResult.analysed.is_(False)).group_by(ImageResult.refusal_code)):
                    kind = RefusalCode.of(code).value
                    kinds[kind] = kinds.get(kind, 0) + n
                station_rows = [(r.name, r.mode, r.drift_state, dict((r.drift_detail or {}).get("psi") or {}))
                                for r in s.scalars(select(StationRow))]
                nodes = leases.fleet(s)
        except Exception as e:  # a scrape must not take the daemon down; the log says why it is empty
            log.error("metrics: database query failed: %s", db_error_text(e))
            return
        for state in ("pending", "sent", "dead"):
            outbox.add_metric([state], counts.get(state, 0))
        for channel, state, n in note_counts:
            notes.add_metric([channel, state], n)
        for kind, n in sorted(kinds.items()):
            refused.add_metric([kind], n)
        for name, mode, state, values in station_rows:
            shadow.add_metric([name], 1 if mode == "shadow" else 0)
            if state is not None:
                drifted.add_metric([name], 1 if state == "drifted" else 0)
            for stat, v in values.items():
                psi.add_metric([name, stat], float(v))
        for n in nodes:
            up.add_metric([n["node"]], 1 if n["state"] == leases.LIVE else 0)
            if n["heartbeat_age_seconds"] is not None:
                age.add_metric([n["node"]], n["heartbeat_age_seconds"])
            held.add_metric([n["node"], "studies"], n["studies"])
            held.add_metric([n["node"], "outbox"], n["outbox"])
        yield from (up, age, held)
        yield studies
        yield outbox
        yield notes
        yield refused
        yield drifted
        yield psi
        yield shadow
