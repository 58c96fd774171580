"""What the console writes without a browser: shortened UIDs that stay distinct on a page."""

from __future__ import annotations

from cxr_node.web.console import _short_uid


def test_shortened_uids_stay_distinct_among_the_pages_uids():
    a = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
    b = "1.3.6.1.4.1.5962.1.2.9.20040826182059.5457"  # same first and last 8 characters
    c = "2.25.325654422379457868796959711303925787926"
    assert _short_uid(a) == _short_uid(b) == "1.3.6.1.\u2026059.5457"  # alone, the short form
    page = [a, b, c, a, None]
    shown = {u: _short_uid(u, page) for u in (a, b, c)}
    assert shown[a] == "1.3.6.1.\u20265059.5457" and shown[b] == "1.3.6.1.\u20262059.5457"
    assert shown[c] == "2.25.325\u202625787926" and len(set(shown.values())) == 3
    assert _short_uid("1.2.3", page) == "1.2.3" and _short_uid(None) == ""
