"""Does a received dataset parse in the transfer syntax its presentation context negotiated?
(issue 18, point 3)

pydicom is lenient where other readers are not: it notices Explicit VR data on an Implicit VR
context (and the reverse) and reads it anyway, so the C-STORE handler's header read succeeded,
the node answered Success, and the stored file (whose meta says the negotiated syntax) did not
open in dcmtk's dcmdump. Uncompressed pixel data sent on a JPEG context went the same way.

:func:`encoding_fault` walks the element headers of the dataset as received, strictly in the
negotiated encoding: every tag, VR (Explicit VR) and length, in ascending tag order, sequences
and their items down to the last delimiter, never past the end of the data; Pixel Data must be
encapsulated (undefined length, fragments as items) exactly when the syntax is. It reads no value
(only the 8- or 12-byte headers, and each pixel fragment's item header), so it costs microseconds
for a 10 MB film: the receive path stays a raw write of ``event.encoded_dataset()``.
"""

from __future__ import annotations

import struct

from pydicom.uid import UID

#: VRs whose Explicit VR header is 12 bytes (2 reserved bytes and a 4-byte length), PS3.5 7.1.2
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
                        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
_VRS = _LONG_VRS | _SHORT_VRS
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")
_MAX_DEPTH = 16


class EncodingFault(ValueError):
    """The dataset does not parse in the negotiated transfer syntax; the message says where."""


def encoding_fault(data: bytes | memoryview, transfer_syntax: str) -> str | None:
    """Why ``data`` (a dataset without file meta) does not parse in ``transfer_syntax``, or None.
    Deflated syntaxes are not walked (their bytes are a zlib stream): pydicom's read of the
    inflated header is their check."""
    ts = UID(transfer_syntax)
    if ts.is_deflated or not ts.is_little_endian:
        return None
    try:
        _Walker(memoryview(data), ts.is_implicit_VR, ts.is_encapsulated).dataset(0, len(data), 0, top=True)
    except EncodingFault as e:
        return str(e)
    return None


class _Walker:
    def __init__(self, data: memoryview, implicit: bool, encapsulated: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.encapsulated = encapsulated
        self.syntax = "Implicit VR" if implicit else "Explicit VR"

    def _header(self, pos: int, end: int) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, value length, header length) of the element at ``pos``."""
        d = self.data
        if pos + 8 > end:
            raise EncodingFault(f"truncated element header at byte {pos}")
        group, elem = _TAG.unpack_from(d, pos)
        tag = group << 16 | elem
        if group == 0xFFFE:  # item and delimiters: always tag + 4-byte length
            return tag, None, _U32.unpack_from(d, pos + 4)[0], 8
        if self.implicit:
            return tag, None, _U32.unpack_from(d, pos + 4)[0], 8
        vr = bytes(d[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise EncodingFault(f"truncated element header at byte {pos}")
            return tag, vr, _U32.unpack_from(d, pos + 8)[0], 12
        if vr in _SHORT_VRS:
            return tag, vr, _U16.unpack_from(d, pos + 6)[0], 8
        raise EncodingFault(f"not {self.syntax}: ({group:04X},{elem:04X}) at byte {pos} has no valid VR")

    def dataset(self, pos: int, end: int, depth: int, top: bool = False, until_delimiter: bool = False) -> int:
        """Walk a dataset from ``pos``; returns the position after it (after its Item Delimitation
        when ``until_delimiter``)."""
        if depth > _MAX_DEPTH:
            raise EncodingFault(f"sequences nested deeper than {_MAX_DEPTH}")
        last = -1
        first = top
        while pos < end:
            if first and self.implicit and bytes(self.data[pos + 4:pos + 6]) in _VRS:
                # what pydicom's reader tests before it switches syntax silently
                raise EncodingFault("Explicit VR data on an Implicit VR context")
            tag, vr, length, head = self._header(pos, end)
            first = False
            if tag == _ITEM_END:
                if not until_delimiter:
                    raise EncodingFault(f"unexpected Item Delimitation at byte {pos}")
                return pos + 8
            if tag >> 16 == 0xFFFE:
                raise EncodingFault(f"unexpected item tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {pos}")
            if tag <= last:
                raise EncodingFault(f"not {self.syntax} or corrupt: ({tag >> 16:04X},{tag & 0xFFFF:04X}) at "
                                    f"byte {pos} is out of order")
            last = tag
            pos += head
            if top and tag == _PIXEL_DATA:
                pos = self._pixel_data(pos, end, length)
                continue  # what follows (Data Set Trailing Padding) is walked too
            if length == _UNDEFINED:
                if vr not in (None, b"SQ", b"UN"):
                    raise EncodingFault(f"undefined length on a {vr.decode()} element at byte {pos - head}")
                if vr == b"UN":  # PS3.5 6.2.2: its items are Implicit VR Little Endian
                    implicit, self.implicit = self.implicit, True
                    try:
                        pos = self._sequence(pos, end, depth + 1)
                    finally:
                        self.implicit = implicit
                else:
                    pos = self._sequence(pos, end, depth + 1)
                continue
            if length > end - pos:
                raise EncodingFault(f"truncated, or not {self.syntax}: ({tag >> 16:04X},{tag & 0xFFFF:04X}) "
                                    f"declares {length} bytes, {end - pos} remain")
            pos += length
        if until_delimiter:
            raise EncodingFault("truncated: an item without its Item Delimitation")
        return pos

    def _sequence(self, pos: int, end: int, depth: int) -> int:
        """Items of an undefined-length sequence from ``pos``; the position after its delimiter."""
        while True:
            tag, _, length, _ = self._header(pos, end)
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM:
                raise EncodingFault(f"expected an item in a sequence at byte {pos - 8}")
            if length == _UNDEFINED:
                pos = self.dataset(pos, end, depth, until_delimiter=True)
            elif length > end - pos:
                raise EncodingFault(f"truncated: a sequence item declares {length} bytes, {end - pos} remain")
            else:
                pos += length

    def _pixel_data(self, pos: int, end: int, length: int) -> int:
        if self.encapsulated:
            if length != _UNDEFINED:
                raise EncodingFault("Pixel Data is not encapsulated; the transfer syntax is compressed")
            while True:  # the fragments' item headers only
                tag, _, frag, _ = self._header(pos, end)
                pos += 8
                if tag == _SEQ_END:
                    return pos
                if tag != _ITEM or frag == _UNDEFINED or frag > end - pos:
                    raise EncodingFault(f"truncated or corrupt: encapsulated Pixel Data broken at byte {pos - 8}")
                pos += frag
        if length == _UNDEFINED:
            raise EncodingFault("Pixel Data is encapsulated; the transfer syntax is not compressed")
        if length > end - pos:
            raise EncodingFault(f"truncated: Pixel Data declares {length} bytes, {end - pos} remain")
        return pos + length
