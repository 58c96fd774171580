"""One root exception for cxr-node, and a subclass per stage.

Each carries a message that says what went wrong and, where it can, what to do about it.
"""


class CxrNodeError(Exception):
    """Root of every error cxr-node raises on purpose."""


class ConfigError(CxrNodeError):
    """The configuration file is missing, unreadable or breaks a rule."""


class DatabaseError(CxrNodeError):
    """The audit database cannot be reached or is not at the expected schema."""


class SchemaError(DatabaseError):
    """The database answers but is not at the schema this version needs (`cxr-node db upgrade`)."""


class SpoolError(CxrNodeError):
    """An instance could not be made durable (disk full, permissions, I/O error)."""


class InvalidInstanceError(CxrNodeError):
    """A received dataset cannot be understood (does not decode, lacks required UIDs)."""


class SOPClassMismatchError(CxrNodeError):
    """The dataset's SOP Class or Instance UID disagrees with the C-STORE request."""


class PreprocessError(CxrNodeError):
    """An image is not a usable 2-D greyscale radiograph. ``code`` is the refusal code the pipeline
    records (:class:`cxr_node.eligibility.refusal.RefusalCode` value): ``pixels``, or
    ``unreadable`` for a header element that cannot be read."""

    def __init__(self, message: str, code: str = "pixels") -> None:
        super().__init__(message)
        self.code = code


class CheckpointError(CxrNodeError):
    """A model checkpoint is missing, incomplete, mismatched or tampered with."""


class NetworkError(CxrNodeError):
    """A DICOM peer could not be reached or refused us."""


def db_error_text(exc: BaseException, limit: int = 300) -> str:
    """One log line for a database error: the driver's own message, whitespace collapsed, without
    SQLAlchemy's "Background on this error" link (parameters are hidden by the engine)."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).split("(Background on this error")[0]
    text = " ".join(text.split())
    name = type(orig if orig is not None else exc).__name__
    out = f"{name}: {text}" if text else name
    return out if len(out) <= limit else out[: limit - 3] + "..."
