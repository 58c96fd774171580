"""cxr_node.receive.associate_check in-process: the answer for each field of an A-ASSOCIATE-RQ
(the same table test_hostile_rq.py walks against the daemon), without a socket."""

from __future__ import annotations

import pytest
from test_hardening import associate_rq
from test_hostile_rq import AC, FIELDS, rq

from cxr_node.receive.associate_check import check_associate_rq, first_byte_answer

#: answered before the check (the first byte) or after it (by the node's configuration)
NOT_HERE = {"PDU type 0x02", "PDU type 0x09", "called AE another node's"}


@pytest.mark.parametrize("name", [n for n in FIELDS if n not in NOT_HERE])
def test_each_field_gets_its_answer(name):
    pdu, want = FIELDS[name]
    body = pdu[:6 + int.from_bytes(pdu[2:6], "big")]  # what the node reads: the declared length
    fixed, answer = check_associate_rq(body)
    assert (AC if answer is None else answer.pdu) == want, (name, answer)
    if answer is not None:
        assert answer.reason and len(answer.reason) < 300


def test_first_byte_and_version_fix():
    assert first_byte_answer(0x02).pdu[-1] == 2 and first_byte_answer(0x47).pdu[-1] == 1
    fixed, answer = check_associate_rq(rq(version=b"\0\3"))
    assert answer is None and fixed[6:8] == b"\0\1"
    assert check_associate_rq(associate_rq(b"OK")) == (associate_rq(b"OK"), None)
