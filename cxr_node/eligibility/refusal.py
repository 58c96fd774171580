"""Why a film was not analysed: a :class:`Refusal` is a code and a text.

The code is made by the rule that refuses (:mod:`cxr_node.eligibility.rules`, the pipeline's
stages) and travels unchanged to every reader: ``image_results.refusal_code``, the SR's coded
reason (:data:`cxr_node.encode.sr.REASON_CODES`), drift, Prometheus and ``status``. The text is
for people (audit trail, console, logs) and may be reworded freely; nothing reads meaning out of it.
(In the style of highdicom's ``sr/enum.py``: coded values are enums.)
"""

from __future__ import annotations

import enum


class RefusalCode(str, enum.Enum):
    """The kinds of refusal, in the order the rules are checked (cheap first)."""

    SOP_CLASS = "sop_class"            #: not a radiograph SOP class cxr-node triages (at receipt)
    NOT_CHEST = "not_chest"            #: BodyPartExamined names another body part: not a chest film
    HEADER = "header"                  #: ViewPosition: a chest film, but not a frontal one
    UNREADABLE = "unreadable"          #: the spooled file or a header element cannot be read
    PIXELS = "pixels"                  #: pixels unusable (decoding, colour, size, blank, the model failed)
    NO_LUNG_FIELDS = "no_lung_fields"  #: no two plausible lung fields
    OUT_OF_DOMAIN = "out_of_domain"    #: outside the model's training distribution
    OTHER = "other"                    #: none of the above (rows from before codes were stored)

    @classmethod
    def of(cls, value: str | None) -> "RefusalCode":
        """The code stored as ``value`` (OTHER for None or an unknown value)."""
        try:
            return cls(value)
        except ValueError:
            return cls.OTHER

    @property
    def is_pixel_rule(self) -> bool:
        """Refused on what the pixels look like (what drift watches), not on the header."""
        return self in (RefusalCode.PIXELS, RefusalCode.NO_LUNG_FIELDS, RefusalCode.OUT_OF_DOMAIN)


class Refusal(str):
    """One film's refusal: the text for people (a ``str``, as the audit trail, the console and
    older callers use it) carrying ``code`` for machines. Readers take the code, never the words.
    Like pydicom's ``UID``, a str with meaning attached."""

    code: RefusalCode

    def __new__(cls, code: RefusalCode, text: str) -> "Refusal":
        if not isinstance(code, RefusalCode):
            raise TypeError(f"Refusal code must be a RefusalCode (got {code!r})")
        if not text:
            raise ValueError("a Refusal must say why, for the people who read it")
        self = super().__new__(cls, text)
        self.code = code
        return self

    def __getnewargs__(self) -> tuple[RefusalCode, str]:  # pickling and copying keep the code
        return self.code, self.text

    @property
    def text(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Refusal({self.code.name}, {self.text!r})"
