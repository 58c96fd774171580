"""Logging set-up for the daemon and the CLI.

Log lines carry UIDs, AE titles, hosts and statuses, never patient names or other
demographics. Three things keep it that way, on the one handler installed here:

* pynetdicom's own loggers are held at WARNING: at DEBUG they dump whole PDUs and datasets.
* Python warnings are routed through :func:`_show_warning`: a warning raised inside a library
  that reads or writes datasets (pydicom, highdicom, pynetdicom) is logged without its text,
  which quotes element values (highdicom: ``The string "Smith John" is unlikely to represent the
  intended person name``); any other warning has its quoted parts redacted. pydicom also logs
  its warnings on its own logger; those records get the same redaction.
* :class:`SafeFormatter` escapes control characters in every message, so a peer-supplied string
  (an AE title with a newline, an escape sequence) cannot forge or hide a log line.

And hostile peers cannot flood it (issue 18: 2,000 hostile packets made 2.7 MB of log, one
traceback each, some printed raw to stderr by threads that died): :class:`PeerNoiseFilter` turns
pynetdicom's warnings and errors into one line each, naming the peer, at most one per peer,
message and minute, their tracebacks at DEBUG; :func:`_thread_exception` (``threading.excepthook``)
does the same for an exception that ends a thread.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from collections import Counter
from typing import Any

#: Libraries whose warnings and log records may quote dataset values.
DATASET_LIBRARIES = ("pydicom", "highdicom", "pynetdicom")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`")
_WITHHELD = "<redacted>"


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``)."""
    return _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"
                                               if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}"), text)


def redact_quoted(text: str) -> str:
    """``text`` with everything in quotes replaced: library messages quote the values they judge."""
    return _QUOTED.sub(_WITHHELD, text)


class SafeFormatter(logging.Formatter):
    """A formatter whose output has one line per record, whatever the message holds: control
    characters in the message are escaped; a traceback keeps its lines, each indented by ``  | ``
    (so no continuation line can pass for a record of its own) and escaped too."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        s = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        blocks = [record.exc_text, self.formatStack(record.stack_info) if record.stack_info else None]
        for block in filter(None, blocks):
            s += "".join("\n  | " + escape_controls(line) for line in block.splitlines())
        return s


class DatasetValueFilter(logging.Filter):
    """Redacts quoted text in records from the dataset libraries' own loggers (pydicom logs each
    warning it raises, with the value)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in ("pydicom", "highdicom"):
            record.msg = redact_quoted(record.getMessage())
            record.args = None
        return True


def _library_of(filename: str) -> str | None:
    parts = os.path.normpath(filename).split(os.sep)
    return next((lib for lib in DATASET_LIBRARIES if lib in parts), None)


#: Library warnings nobody running cxr-node can act on, dropped (module regex, message regex, why).
IGNORED_WARNINGS = (
    # highdicom checks the person names it is given: a modality's ReferringPhysicianName "ward" (no
    # caret) gets a UserWarning per Secondary Capture. The SC and SR copy the film's names as they are.
    (r"highdicom\.", r"(?s)The string .* is unlikely to represent the intended person name"),
)
_library_warnings_seen: set[str] = set()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Replacement for :func:`warnings.showwarning`: one log record on ``py.warnings``. A library
    warning whose text is withheld is a WARNING the first time its code location warns, then DEBUG."""
    name = getattr(category, "__name__", "Warning")
    where = f"{os.path.basename(filename)}:{lineno}"
    lib = _library_of(filename)
    level = logging.WARNING
    if lib:
        text = f"{name} from {lib} ({where}); text withheld: it may quote dataset values"
        key = f"{lib}:{where}"
        if key in _library_warnings_seen:
            level = logging.DEBUG
        else:
            _library_warnings_seen.add(key)
            text += " (later ones from there at DEBUG)"
    else:
        text = f"{name} ({where}): {redact_quoted(str(message))}"
    logging.getLogger("py.warnings").log(level, "%s", text)


class HighdicomInfoToDebug(logging.Filter):
    """highdicom logs each module it copies into a new object ("copy attributes of module ...") at
    INFO, seven lines per film: for cxr-node that is DEBUG detail. Its INFO records become DEBUG
    records, shown only when the root level is DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


class PerKeyRate:
    """At most one event per key and ``interval`` seconds; counts the ones held back. The one rate
    limiter of the node: log lines per peer (here and in the receiver's guard) and the console's
    once-per-user audit of a search."""

    def __init__(self, interval: float = 60.0, max_keys: int = 10000) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[Any, float] = {}
        self._held: Counter = Counter()
        self._lock = threading.Lock()

    def take(self, key: Any) -> int | None:
        """How many were held back since the last one let through, or None to hold this one."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -self.interval) < self.interval:
                self._held[key] += 1
                return None
            if len(self._last) >= self.max_keys:  # a scan of many addresses cannot grow this
                for k in [k for k, t in self._last.items() if now - t >= self.interval]:
                    del self._last[k]
                    self._held.pop(k, None)
            self._last[key] = now
            return self._held.pop(key, 0)


_quiet = threading.local()


class quiet_libraries:
    """Within this block, in this thread, the dataset libraries' log records are dropped: for a
    check whose failure the caller reports itself, in one line (the receiver decoding a peer's
    A-ASSOCIATE-RQ before pynetdicom sees it)."""

    def __enter__(self) -> None:
        _quiet.active = True

    def __exit__(self, *exc: object) -> None:
        _quiet.active = False


def peer_of(thread: threading.Thread | None) -> str | None:
    """``host:port`` of the DICOM peer a pynetdicom thread serves (its association thread, or the
    DUL thread of that association), else None."""
    assoc = getattr(thread, "assoc", thread)
    remote = getattr(assoc, "remote", None) if type(assoc).__name__.endswith("Association") else None
    try:
        return f"{remote['address']}:{remote['port']}" if remote and remote.get("address") else None
    except (TypeError, KeyError):
        return None


_tracebacks = logging.getLogger("cxr_node.tracebacks")


class PeerNoiseFilter(logging.Filter):
    """On the handler: pynetdicom's records at WARNING and above become one line naming the peer,
    at most one per (peer, message) and minute (the line says how many were held back); their
    tracebacks go to DEBUG (``cxr_node.tracebacks``), logged just before the line."""

    def __init__(self) -> None:
        super().__init__()
        self._rate = PerKeyRate()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(DATASET_LIBRARIES):
            return True
        if getattr(_quiet, "active", False):
            return False
        if record.levelno < logging.WARNING or not record.name.startswith("pynetdicom"):
            return True
        peer = peer_of(threading.current_thread())
        host = peer.rsplit(":", 1)[0] if peer else None
        held = self._rate.take((host, record.name, str(record.msg)[:200]))
        exc, record.exc_info, record.exc_text = record.exc_info, None, None
        if held is None:
            return False
        if exc and _tracebacks.isEnabledFor(logging.DEBUG):
            _tracebacks.debug("traceback of the next line", exc_info=exc)
        record.msg = record.getMessage() + (f" [peer {peer}]" if peer else "") + \
            (f" ({held} more like it in the last minute)" if held else "")
        record.args = None
        return True


_thread_rate = PerKeyRate()


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook``: one ERROR line per (peer or thread, exception type) and minute,
    the traceback at DEBUG; instead of Python's traceback printed raw to stderr."""
    if args.exc_type is SystemExit:
        return
    peer = peer_of(args.thread)
    name = args.thread.name if args.thread else "?"
    held = _thread_rate.take((peer.rsplit(":", 1)[0] if peer else name, args.exc_type))
    if held is None:
        return
    log = logging.getLogger("cxr_node.threads")
    if _tracebacks.isEnabledFor(logging.DEBUG):
        _tracebacks.debug("traceback of the next line", exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
    log.error("thread %s ended by %s: %s%s%s", name, args.exc_type.__name__, args.exc_value,
              f" [peer {peer}]" if peer else "", f" ({held} more like it in the last minute)" if held else "")


def configure(level: str = "INFO") -> None:
    root = logging.getLogger()
    if getattr(configure, "_done", False):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    handler.addFilter(DatasetValueFilter())
    handler.addFilter(PeerNoiseFilter())
    threading.excepthook = _thread_exception
    root.addHandler(handler)
    root.setLevel(level)
    warnings.showwarning = _show_warning
    for module, message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    for name in ("highdicom", "highdicom.base"):  # filters do not propagate: the logger that emits them
        logging.getLogger(name).addFilter(HighdicomInfoToDebug())
    for noisy in ("pynetdicom", "apscheduler", "alembic", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "job skipped: maximum number of running instances reached" every tick while a job runs
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    # "Run time of job ... was missed by 0:00:01" when a busy machine starts a 2 s job late: the
    # job runs at its next tick, and there is nothing to do about it
    logging.getLogger("apscheduler.executors.default").setLevel(logging.ERROR)
    configure._done = True  # type: ignore[attr-defined]
