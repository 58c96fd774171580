"""SQLAlchemy models. The schema is owned by Alembic (``migrations/``); never create_all()."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UID = String(64)
AET = String(16)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use datetime.now(timezone.utc)")
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class AuditEvent(Base):
    """One row per thing that happened. Append-only. Holds UIDs, patient ID, AE titles and
    hosts, never patient names."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True, default=utcnow)
    event: Mapped[str] = mapped_column(String(40), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    association_id: Mapped[str | None] = mapped_column(String(36), index=True)
    calling_aet: Mapped[str | None] = mapped_column(AET, index=True)
    called_aet: Mapped[str | None] = mapped_column(AET)
    host: Mapped[str | None] = mapped_column(String(64))
    port: Mapped[int | None] = mapped_column(Integer)
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    series_uid: Mapped[str | None] = mapped_column(UID)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    transfer_syntax: Mapped[str | None] = mapped_column(UID)
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict | None] = mapped_column(JSON)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str | None] = mapped_column(String(64))


class Study(Base):
    __tablename__ = "studies"

    study_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    state_changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    priority: Mapped[str | None] = mapped_column(String(16))
    processed_version: Mapped[int | None] = mapped_column(Integer)
    last_sr_uid: Mapped[str | None] = mapped_column(UID)
    last_error: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(128))  # the node processing it
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)  # set when analysed (0005)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # claims of this version (0007)
    retry_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, index=True)  # failed: queued again then (0007)
    # the sender's DIMSE Priority as a scheduling rank, 0 HIGH 1 MEDIUM 2 LOW (0012; cxr_node.study.scheduling)
    upstream_rank: Mapped[int | None] = mapped_column(Integer)


class Instance(Base):
    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    series_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)  # relative to the spool directory
    bytes: Mapped[int] = mapped_column(BigInteger)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    triage_eligible: Mapped[bool] = mapped_column(Boolean)
    not_for_triage_reason: Mapped[str | None] = mapped_column(Text)
    study_version: Mapped[int] = mapped_column(Integer)
    association_id: Mapped[str | None] = mapped_column(String(36))
    calling_aet: Mapped[str | None] = mapped_column(AET)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    removed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # retention deleted the file
    dimse_priority: Mapped[int | None] = mapped_column(Integer)  # the C-STORE request's Priority: 0 medium, 1 high, 2 low (0014)


class ImageResult(Base):
    """What happened to one image of one study version: analysed (with the prediction) or not (why)."""

    __tablename__ = "image_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    analysed: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)  # for people; never parsed
    refusal_code: Mapped[str | None] = mapped_column(String(32), index=True)  # RefusalCode value (0008)
    model_version: Mapped[str | None] = mapped_column(String(128))
    top_label: Mapped[str | None] = mapped_column(String(64))
    urgent: Mapped[bool | None] = mapped_column(Boolean)
    priority: Mapped[str | None] = mapped_column(String(16))
    probabilities: Mapped[dict | None] = mapped_column(JSON)
    abnormal: Mapped[float | None] = mapped_column(Float)  # p(abnormal), models with that output (0010)
    # the finding a worklist row names, decided at triage time (0016): "abnormal" or a class, and its p
    finding: Mapped[str | None] = mapped_column(String(64))
    finding_probability: Mapped[float | None] = mapped_column(Float)
    sc_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    # site onboarding (0005): which station sent it, which calibration triaged it (the temperature the
    # probabilities were made with, so the logits can be recovered), and what drift watches
    station: Mapped[str | None] = mapped_column(String(64), index=True)
    calibration: Mapped[str | None] = mapped_column(String(64))   # "model" or "site <station> v<N>"
    temperature: Mapped[float | None] = mapped_column(Float)
    ood_score: Mapped[float | None] = mapped_column(Float)
    image_stats: Mapped[dict | None] = mapped_column(JSON)        # rows, cols, intensity mean and std


class OutboxItem(Base):
    """One object to send to one destination. The file is on disk before the row exists."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "destination", name="uq_outbox_sop_destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax: Mapped[str] = mapped_column(UID)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(8))  # sc | sr
    path: Mapped[str] = mapped_column(Text)  # relative to <data_dir>/outbox
    state: Mapped[str] = mapped_column(String(8), index=True)  # pending | sent | dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    removed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # retention deleted the file
    claimed_by: Mapped[str | None] = mapped_column(String(128), index=True)  # the node sending it now (0013)


class NodeRow(Base):
    """One serving node (``cxr-node serve``) and its lease: it renews ``heartbeat_at`` every
    ``[fleet] heartbeat_seconds``; once ``lease_seconds`` pass without a renewal (or it has stopped),
    another node takes over the studies and outbox items it holds (cxr_node.study.leases). ``marker``
    names a file under its data_dir holding ``token``: the proof, for a node joining, that both see
    one data_dir (0013)."""

    __tablename__ = "nodes"

    node_id: Mapped[str] = mapped_column(String(128), primary_key=True)  # host name and DICOM port
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    pid: Mapped[int] = mapped_column(Integer)
    ae_title: Mapped[str | None] = mapped_column(AET)
    version: Mapped[str | None] = mapped_column(String(32))
    data_dir: Mapped[str] = mapped_column(Text)  # as this node sees it
    marker: Mapped[str] = mapped_column(String(255))  # relative to data_dir
    token: Mapped[str] = mapped_column(String(64))
    lease_seconds: Mapped[float] = mapped_column(Float)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    stopped_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # a clean stop: holds nothing


class Notification(Base):
    """One urgent notification (or its correction) of one study version to one ``[[notifications]]``
    channel. The message is on disk (``path``, under the outbox directory) before the row exists (0014)."""

    __tablename__ = "notifications"
    __table_args__ = (UniqueConstraint("study_uid", "study_version", "channel", name="uq_notification_version_channel"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))  # hl7v2 | fhir
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    call: Mapped[str] = mapped_column(String(16))  # the node's call this message carries: urgent | review | routine
    priority: Mapped[str] = mapped_column(String(8))  # the priority sent (HL7 0485: S, A, R), never below upstream's
    correction: Mapped[bool] = mapped_column(Boolean)  # corrects an earlier notification of the study
    control_id: Mapped[str] = mapped_column(String(64))  # MSH-10 / the Bundle's id
    path: Mapped[str] = mapped_column(Text)  # relative to <data_dir>/outbox
    state: Mapped[str] = mapped_column(String(8), index=True)  # pending | sent | dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    last_status: Mapped[int | None] = mapped_column(Integer)  # HTTP status, or none for HL7 (the reason says the ACK)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    removed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # retention deleted the message file


class AuditChainHead(Base):
    """One row: the hash of the newest audit event. Locked by every writer of audit rows, so the
    chain is appended to one row at a time on any backend."""

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_id: Mapped[int | None] = mapped_column(Integer)
    last_hash: Mapped[str] = mapped_column(String(64))


class WebUser(Base):
    """A person who logs in to the web console (``cxr-node user add``). Only a password hash is kept."""

    __tablename__ = "web_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16))  # admin | radiologist | viewer
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    password_changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class WebSession(Base):
    """A logged-in browser. The cookie holds a random token; only its SHA-256 is stored here."""

    __tablename__ = "web_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the cookie token
    user_id: Mapped[int] = mapped_column(Integer, index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    host: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
class StationRow(Base):
    """A sending station as this node last saw it: its mode (audited when it changes) and its drift state."""

    __tablename__ = "stations"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    ae_title: Mapped[str | None] = mapped_column(AET)
    mode: Mapped[str] = mapped_column(String(8))  # active | shadow
    configured: Mapped[bool] = mapped_column(Boolean)  # listed in [[stations]] (else [onboarding] new_stations)
    mode_since: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    drift_state: Mapped[str | None] = mapped_column(String(8))  # ok | drifted | None (too few films)
    drift_detail: Mapped[dict | None] = mapped_column(JSON)
    drift_checked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    baseline: Mapped[dict | None] = mapped_column(JSON)  # the station's first window, when no site calibration
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Feedback(Base):
    """What a reader said about a study (or one film of it). Never updated but to be superseded:
    a later label for the same study (and film) sets ``superseded_at`` on the earlier one."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    label: Mapped[str] = mapped_column(String(64))
    reader: Mapped[str | None] = mapped_column(String(64))
    labelled_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)  # when the reader said it
    recorded_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)  # when this node stored it
    source: Mapped[str] = mapped_column(String(255))  # "cli", "csv FILE line N", "web"
    superseded_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, index=True)
    superseded_by: Mapped[int | None] = mapped_column(Integer)


class SiteCalibration(Base):
    """A station's own temperature and operating points, bound to the model weights they were fitted
    for. One active per station at most; older versions are kept for rollback and the record."""

    __tablename__ = "site_calibrations"
    __table_args__ = (UniqueConstraint("station", "version", name="uq_site_calibration_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    station: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(128))
    temperature: Mapped[float] = mapped_column(Float)
    thresholds: Mapped[dict] = mapped_column(JSON)
    report: Mapped[dict] = mapped_column(JSON)      # counts, rules, before/after figures with intervals
    reference: Mapped[dict | None] = mapped_column(JSON)  # drift reference: the calibration films' statistics
    active: Mapped[bool] = mapped_column(Boolean, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    retired_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class SiteHead(Base):
    """A station's site heads (``cxr-node adapt-site``): per critical class, a logistic head on the
    model's frozen penultimate features with its calibration folded in, and its operating threshold.
    Bound to the weights they were fitted on; one active per station; older versions kept (0009)."""

    __tablename__ = "site_heads"
    __table_args__ = (UniqueConstraint("station", "version", name="uq_site_head_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    station: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(128))
    heads: Mapped[dict] = mapped_column(JSON)    # class -> {weight: [...], bias, threshold, l2, platt}
    report: Mapped[dict] = mapped_column(JSON)   # counts, before/after figures with intervals, the gate
    active: Mapped[bool] = mapped_column(Boolean, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    retired_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
