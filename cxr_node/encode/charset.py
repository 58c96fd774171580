"""The character set of a film's text, made one the results can be written in (issue 30).

A film may declare any Specific Character Set (0008,0005): a Defined Term of PS3.3 C.12.1.1.2, a
term nobody defined (``BOGUS``), or a combination the standard does not allow (``ISO 2022 IR 87``
alone: a multi-byte set with code extensions needs a first value). highdicom copies the film's
value into the Secondary Capture and the SR and refuses what it does not accept (ValueError),
which failed the study three times and left the PACS without a result.

:func:`prepare` decodes every text value of the film with what it declares, as far as pydicom
can (an unknown term is read as the default repertoire; bytes a set cannot decode become U+FFFD),
then keeps the declared set for the results when highdicom accepts it and every value decoded
cleanly, and otherwise declares ``ISO_IR 192`` (UTF-8, which holds every decoded value), saying
so in the note it returns (the pipeline logs it and records it in the film's audit row).
Only when even that fails is the film refused (:func:`fallback`), with its text read as Latin-1,
so that the SR can still say the film was not analysed.
"""

from __future__ import annotations

import logging
import warnings

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

log = logging.getLogger(__name__)

UTF8 = "ISO_IR 192"
_TEXT_VRS = ("SH", "LO", "ST", "LT", "UT", "UC", "PN")


def declared(ds: Dataset) -> list[str]:
    """The film's Specific Character Set terms, as sent ([] for none: the default repertoire)."""
    value = ds.get("SpecificCharacterSet")
    if value is None:
        return []
    terms = [str(v).strip() for v in (value if isinstance(value, MultiValue) else [value])]
    return [] if terms in ([""], ["ISO_IR 6"]) else terms


def writable(terms: list[str]) -> str | None:
    """Why highdicom (and the standard) would not take ``terms`` for a new object, or None."""
    from pydicom.charset import python_encoding

    unknown = [t for t in terms if t and t not in python_encoding]
    if unknown:
        return f"{', '.join(repr(t[:32]) for t in unknown)} is not a Defined Term"
    try:
        from highdicom.valuerep import _check_specific_character_set  # the check its constructors run

        _check_specific_character_set(terms[0] if len(terms) == 1 else terms)
    except ValueError as e:
        return f"is not a combination highdicom writes ({str(e)[:100]})"
    return None


def prepare(ds: Dataset) -> str | None:
    """Decode ``ds``'s text values in place and make its Specific Character Set one the results
    can be written in; a note saying what was done when it had to change, else None."""
    terms = declared(ds)
    if not terms:
        if "SpecificCharacterSet" in ds:  # empty, or ISO_IR 6 spelt out: the default, which highdicom
            del ds.SpecificCharacterSet  # writes by leaving the attribute out (its enum has neither)
        return None
    with warnings.catch_warnings(record=True) as caught:  # pydicom warns, quoting the bytes: counted, not logged
        warnings.simplefilter("always")
        ds.decode()
    lossy = sum(1 for w in caught if "decode" in str(w.message).lower() or "encoding" in str(w.message).lower())
    why = writable(terms)
    if why is None and not lossy:
        return None
    shown = "\\".join(terms)[:64]
    read = "read as the default repertoire" if why and "Defined Term" in why else "decoded as declared"
    if lossy:
        read += f", {lossy} value(s) with characters that did not decode replaced by U+FFFD"
    _rewrite(ds)
    return (f"SpecificCharacterSet {shown!r}: {why or 'has values that do not decode'}; text {read}; "
            f"results written in {UTF8} (UTF-8)")


def _rewrite(ds: Dataset) -> None:
    """Declare UTF-8 on ``ds`` whose text values are decoded already (person names re-made so that
    pydicom encodes them anew rather than writing their original bytes)."""
    for elem in ds.iterall():
        if elem.VR == "PN" and elem.value is not None:
            elem.value = ([PersonName(str(v)) for v in elem.value] if isinstance(elem.value, MultiValue)
                          else PersonName(str(elem.value)))
    ds.SpecificCharacterSet = UTF8


def fallback(ds: Dataset) -> None:
    """Last resort for a film whose text :func:`prepare` could not handle: every top-level text
    value read byte for byte as Latin-1 (which decodes anything), declared UTF-8."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if getattr(raw, "VR", None) in _TEXT_VRS and isinstance(getattr(raw, "value", None), bytes):
            text = raw.value.decode("latin-1").rstrip("\0 ")
            ds[tag] = DataElement(tag, raw.VR, PersonName(text) if raw.VR == "PN" else text)
    _rewrite(ds)


def make_writable(ds: Dataset, sop_instance_uid: str):
    """:func:`prepare` for the pipeline: ``(note, refusal)``, the note saying how the film's text was
    made writable when that took a change (logged), and the refusal when it could not be done
    (:func:`fallback`; the film's SR still says so)."""
    from cxr_node.eligibility.rules import unreadable

    try:
        note = prepare(ds)
    except Exception as e:  # the last resort: text read as Latin-1, the film refused with its reason
        fallback(ds)
        note = f"the character set could not be handled ({type(e).__name__}); text read as Latin-1"
        log.warning("film %s: %s; refused", sop_instance_uid, note)
        return note, unreadable(f"character set: {note}")
    if note:
        log.warning("film %s: %s", sop_instance_uid, note)
    return note, None
