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
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Replacement for :func:`warnings.showwarning`: one log record on ``py.warnings``."""
    name = getattr(category, "__name__", "Warning")
    where = f"{os.path.basename(filename)}:{lineno}"
    lib = _library_of(filename)
    if lib:
        text = f"{name} from {lib} ({where}); text withheld: it may quote dataset values"
    else:
        text = f"{name} ({where}): {redact_quoted(str(message))}"
    logging.getLogger("py.warnings").warning("%s", text)


class HighdicomInfoToDebug(logging.Filter):
    """highdicom logs each module it copies into a new object ("copy attributes of module ...") at
    INFO, seven lines per film: for cxr-node that is DEBUG detail. Its INFO records become DEBUG
    records, shown only when the root level is DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def configure(level: str = "INFO") -> None:
    root = logging.getLogger()
    if getattr(configure, "_done", False):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    handler.addFilter(DatasetValueFilter())
    root.addHandler(handler)
    root.setLevel(level)
    warnings.showwarning = _show_warning
    for name in ("highdicom", "highdicom.base"):  # filters do not propagate: the logger that emits them
        logging.getLogger(name).addFilter(HighdicomInfoToDebug())
    for noisy in ("pynetdicom", "apscheduler", "alembic", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "job skipped: maximum number of running instances reached" every tick while a job runs
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    configure._done = True  # type: ignore[attr-defined]
