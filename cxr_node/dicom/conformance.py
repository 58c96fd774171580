"""The DICOM Conformance Statement (PS3.2 Annex A layout), written from the code itself:
``cxr-node conformance > docs/conformance.md``.

Every table is read from where the behaviour lives: the accepted presentation contexts from the
receiver's AE (:func:`cxr_node.receive.scp.build_ae`), the statuses from
:mod:`cxr_node.dicom.status`, the association rules from :mod:`cxr_node.receive.scp` and the
config schema, the objects written from the SC and SR builders run on a made-up film
(:mod:`cxr_node.dicom.samples`). ``tests/dicom/test_conformance.py`` fails when the checked-in
document and this output differ: regenerate it after changing any of them.
"""

from __future__ import annotations

from typing import Any, Iterable

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.uid import UID

SUPPLEMENT = "PS3.2 (Conformance), Annex A layout"


def _uid(u: str) -> str:
    return UID(u).name or u


def _table(head: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    head = list(head)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return out + [""]


def _status_rows(table: dict[int, str]) -> list[tuple[str, str]]:
    return [(f"0x{code:04X}", text) for code, text in sorted(table.items(), key=lambda kv: (kv[0] != 0, kv[0]))]


def _attributes(obj: Dataset, source: Dataset) -> list[tuple[str, str, str]]:
    """(tag, keyword, where the value comes from) for every top-level attribute of ``obj``."""
    rows = []
    for elem in obj:
        if elem.tag.group == 0x0002:
            continue
        kw = keyword_for_tag(elem.tag) or "(private)"
        src = source.get(elem.tag)
        image = elem.tag.group in (0x0028, 0x7FE0)  # the SC's own pixels, whatever the film's were
        if elem.VR == "SQ":
            origin = "sequence, written by cxr-node"
        elif not image and src is not None and str(src.value) == str(elem.value) and elem.value not in ("", None):
            origin = "copied from the film"
        elif elem.value in ("", None):
            origin = "empty (Type 2)"
        else:
            origin = "written by cxr-node"
        rows.append((f"({elem.tag.group:04X},{elem.tag.element:04X})", kw, origin))
    return rows


def statement() -> str:
    """The whole conformance statement, as Markdown."""
    from pathlib import Path

    from pynetdicom.sop_class import Verification

    from cxr_node import __version__
    from cxr_node.config import parse, schema_defaults
    from cxr_node.dicom import samples
    from cxr_node.dicom import status as dimse
    from cxr_node.eligibility.rules import TRIAGE_SOP_CLASSES
    from cxr_node.encode import sr as srmod
    from cxr_node.encode.sc import SC_SERIES_DESCRIPTION, SC_SERIES_NUMBER
    from cxr_node.outbox.send import echo_ae
    from cxr_node.receive import scp

    settings = parse({}, base_dir=Path("/"))
    defaults = schema_defaults()
    node, outbox = defaults["node"], defaults["outbox"]
    ae = scp.build_ae(settings)
    accepted = [(cx.abstract_syntax, list(cx.transfer_syntax)) for cx in ae.supported_contexts]
    storage = [a for a, _ in accepted if a != Verification]
    s = samples.build()
    sc_ts, sr_ts = str(s.sc.file_meta.TransferSyntaxUID), str(s.sr.file_meta.TransferSyntaxUID)
    out: list[str] = []
    w = out.append

    w("# cxr-node DICOM Conformance Statement")
    w("")
    w(f"cxr-node {__version__}. Written by `cxr-node conformance` from the code ({SUPPLEMENT}); do not edit by "
      "hand: `tests/dicom/test_conformance.py` fails when this file and the code disagree.")
    w("")
    w("## 1 Overview")
    w("")
    w("cxr-node is a PACS companion for chest X-rays: it receives images as a Storage SCP, triages each "
      "frontal chest film with an AI model (research triage, not diagnosis), and sends a Grad-CAM "
      "Secondary Capture per analysed film and a TID 1500 Structured Report per study back to the PACS "
      "as a Storage SCU.")
    w("")
    out += _table(["Networking: SOP classes", "User of service (SCU)", "Provider of service (SCP)"], [
        ("Verification", "Yes (`cxr-node echo`)", "Yes"),
        (f"Storage: {len(storage)} SOP classes (every one pynetdicom knows)", "No", "Yes"),
        (_uid(str(s.sc.SOPClassUID)), "Yes (results)", "Yes (stored, triaged)"),
        (_uid(str(s.sr.SOPClassUID)), "Yes (results)", "Yes (stored, not triaged)"),
    ])
    w("Media interchange: none.")
    w("")
    w("## 2 Implementation model")
    w("")
    w("### 2.1 Application data flow")
    w("")
    w("    modality or PACS --C-STORE--> [CXRNODE AE: Storage SCP] --> spool (fsync) + database --> Success")
    w("      --> study complete (association released, or quiet period) --> eligibility --> model --> SC + SR")
    w("      --> outbox (durable) --> [CXRNODE AE: Storage SCU] --C-STORE--> each configured destination")
    w("")
    w("### 2.2 Functional definition of the AE")
    w("")
    w(f"One application entity, AE title `{node['ae_title']}` by default (`[node] ae_title`), listening on "
      f"TCP port {node['port']} (`[node] port`). As SCP it answers C-ECHO and stores every instance of an "
      "accepted storage SOP class; only after the instance is on disk (fsynced) and in the database does it "
      "answer Success. Instances of these SOP classes are triaged (others are stored and marked not for "
      "triage):")
    w("")
    out += [f"- {_uid(u)} `{u}`" for u in sorted(TRIAGE_SOP_CLASSES)] + [""]
    w("As SCU it sends the results of each analysed study to every `[[destinations]]` entry (C-STORE), and "
      "`cxr-node echo --to NAME` checks a destination (C-ECHO).")
    w("")
    w("### 2.3 Sequencing of real-world activities")
    w("")
    w(f"A study is complete once the association that delivered it is released and nothing more arrives for "
      f"`[study] release_grace_seconds` ({defaults['study']['release_grace_seconds']} s), or after "
      f"`[study] quiet_seconds` ({defaults['study']['quiet_seconds']} s) without a new instance. Then it is "
      "analysed and its results are queued. An instance that arrives later reopens the study: a new SR version "
      "names the previous one in its Predecessor Documents Sequence.")
    w("")
    w("## 3 AE specification: CXRNODE")
    w("")
    w("### 3.1 SOP classes and transfer syntaxes as SCP")
    w("")
    w("Every storage SOP class below is accepted with these transfer syntaxes, in this order of preference "
      "(the first one the requestor also proposed is accepted):")
    w("")
    syntaxes = next(ts for a, ts in accepted if a != Verification)
    out += _table(["Transfer syntax", "UID"], [(_uid(t), f"`{t}`") for t in syntaxes])
    w(f"Verification (`{Verification}`): " + ", ".join(_uid(t) for a, ts in accepted if a == Verification
                                                          for t in ts) + ".")
    w("")
    w(f"<details><summary>The {len(storage)} storage SOP classes accepted</summary>")
    w("")
    out += _table(["SOP class", "UID", "Triaged"], [(_uid(a), f"`{a}`", "yes" if a in TRIAGE_SOP_CLASSES else "no")
                                                   for a in sorted(storage, key=_uid)])
    w("</details>")
    w("")
    w("### 3.2 SOP classes and transfer syntaxes as SCU")
    w("")
    w("Each association to a destination proposes only the SOP classes of the files it carries, each with the "
      "one transfer syntax the file was written in:")
    w("")
    out += _table(["SOP class", "UID", "Transfer syntax", "Series"], [
        (_uid(str(s.sc.SOPClassUID)), f"`{s.sc.SOPClassUID}`", _uid(sc_ts), f"{SC_SERIES_NUMBER} \"{SC_SERIES_DESCRIPTION}\""),
        (_uid(str(s.sr.SOPClassUID)), f"`{s.sr.SOPClassUID}`", _uid(sr_ts),
         f"{srmod.SR_SERIES_NUMBER} \"{srmod.SR_SERIES_DESCRIPTION}\""),
        ("Verification", f"`{Verification}`", ", ".join(_uid(t) for cx in echo_ae(settings).requested_contexts
                                                          for t in cx.transfer_syntax), "-"),
    ])
    w("### 3.3 Association policies")
    w("")
    w("- Application context: DICOM Application Context Name `1.2.840.10008.3.1.1.1`.")
    w(f"- Implementation Class UID `{ae.implementation_class_uid}`, Implementation Version Name "
      f"`{ae.implementation_version_name}`, sent in every A-ASSOCIATE-RQ and -AC (as SCP and as SCU) and "
      "written in the file meta of the SC and SR.")
    w(f"- Maximum PDU received: {ae.maximum_pdu_size} bytes (`[node] max_pdu`; 0 = no limit). A P-DATA-TF PDU "
      "longer than that, or any other PDU over 1 MiB, is aborted (A-ABORT) before it is read.")
    w(f"- Associations at once: {ae.maximum_associations} (`[node] max_associations`); one more is rejected "
      "transient, local limit exceeded (result 2, source 3, reason 2: pynetdicom). At most "
      f"{node['max_connections_per_host']} connections per peer address (`[node] max_connections_per_host`); "
      "more are closed at once.")
    w(f"- Timeouts (seconds): A-ASSOCIATE-RQ complete within {node['association_request_timeout']} of the "
      f"connection; network {ae.network_timeout}, ACSE {ae.acse_timeout}, DIMSE {ae.dimse_timeout}.")
    w("- Asynchronous operations: not supported (one operation at a time per association). No SOP class "
      "extended negotiation, no user identity negotiation.")
    w("")
    w("#### Association acceptance: why an A-ASSOCIATE-RQ is rejected")
    w("")
    out += _table(["Result, source, reason", "When"], [
        (", ".join(map(str, scp.REJECT_CALLED_AET)) + " (permanent, service user, called AE title not recognised)",
         "the called AE title is not ours"),
        (", ".join(map(str, scp.REJECT_CALLING_AET)) + " (permanent, service user, calling AE title not recognised)",
         "`[node] allowed_calling_aets` is set and does not list the calling AE title"),
        (", ".join(map(str, scp.REJECT_HOST)) + " (permanent, service user, no reason given)",
         "`[node] allowed_hosts` is set and the peer address is not in it"),
    ])
    w("Every rejection and refused connection is audited (`association.rejected`, `connection.refused`).")
    w("")
    w("#### Association initiation: sending results")
    w("")
    w(f"The outbox sends each destination's pending files over one association, retrying with exponential "
      f"backoff (`[outbox] retry_base_seconds` {outbox['retry_base_seconds']}, at most "
      f"`max_attempts` {outbox['max_attempts']}); a permanent refusal is dead-lettered at once "
      "(`cxr-node outbox list|retry`). How it reads a destination's C-STORE status:")
    w("")
    read = sorted({dimse.SUCCESS, dimse.COERCED, dimse.ELEMENTS_DISCARDED, dimse.NOT_CHECKED, dimse.OUT_OF_RESOURCES,
                   dimse.DATASET_MISMATCH, dimse.CANNOT_UNDERSTAND, dimse.SOP_CLASS_NOT_SUPPORTED, dimse.NOT_AUTHORIZED,
                   dimse.INVALID_SOP_INSTANCE, dimse.PROCESSING_FAILURE, dimse.DUPLICATE_INSTANCE})
    out += _table(["Status", "Outcome", "Meaning"],
                  [(f"0x{c:04X}", {"sent": "sent", "transient": "retried later",
                                   "permanent": "dead letter"}[dimse.classify(c).kind], dimse.classify(c).reason)
                   for c in read] + [("0xA7xx, 0xA9xx, 0xCxxx", "as 0xA700, 0xA900, 0xC000", "the class's rule"),
                                     ("any other", "retried later", "unexpected status")])
    w("### 3.4 DIMSE statuses returned (C-STORE SCP)")
    w("")
    out += _table(["Status", "When"], _status_rows(dimse.RECEIVER))
    w("A failure's Error Comment (0000,0902) says why, and the instance gets an `instance.failed` audit row. "
      "A C-ECHO is answered 0x0000.")
    w("")
    w("### 3.5 Network interfaces and configuration")
    w("")
    w(f"TCP/IP on `[node] host` ({node['host']} by default: every interface) and `[node] port`. The AE title, "
      "port, allow-lists, limits and timeouts are in `config/cxr-node.toml`; `[[destinations]]` name the peers "
      "results go to (name, AE title, host, port, TLS).")
    w("")
    w("## 4 Media interchange")
    w("")
    w("Not supported.")
    w("")
    w("## 5 Character sets")
    w("")
    same = [n for n, o in (("SC", s.sc), ("SR", s.sr))
            if o.get("SpecificCharacterSet") == s.source.get("SpecificCharacterSet")]
    w("Received instances are stored byte for byte as received, whatever their Specific Character Set. The "
      "objects written copy the film's patient and study attributes as they are, and with them its Specific "
      f"Character Set (0008,0005): a film in `{s.source.SpecificCharacterSet}` gives "
      f"{' and '.join(same) or 'neither SC nor SR'} in `{s.source.SpecificCharacterSet}`. Text written by "
      "cxr-node itself (descriptions, codes, the report's comment) is in the default repertoire (ASCII).")
    w("")
    w("## 6 Security")
    w("")
    w("- DICOM TLS (PS3.15 Annex B, the BCP 195 TLS profiles as Python's ssl offers them): `[tls] certificate` "
      "and `private_key` switch the receiver to TLS; with `require_client_certificate` (default on) a peer "
      "needs a certificate signed by `[tls] ca_certificates`. A destination with `tls = true` is called over "
      "TLS, its certificate checked against the CA and its host name.")
    w("- Access: `[node] allowed_calling_aets` and `allowed_hosts` (CIDRs) limit who may associate.")
    w("- Audit: every association, instance, analysis, send and refusal is audited in a hash-chained trail; "
      "`cxr-node audit export --format dicom-audit` writes PS3.15 Annex A.5 audit messages.")
    w("- Patient names are never written to logs or the audit trail.")
    w("")
    w("## 7 Annex: objects created")
    w("")
    w(f"### 7.1 Secondary Capture ({_uid(str(s.sc.SOPClassUID))})")
    w("")
    w("One per analysed film, in the film's study, new series; RGB, 8 bits, the film with the Grad-CAM "
      "map inside the lung fields and a legend strip below (\"NOT FOR DIAGNOSTIC USE\", burned in). "
      "Its attributes, from the builder run on a sample film:")
    w("")
    out += _table(["Tag", "Attribute", "Value"], _attributes(s.sc, s.source))
    w(f"### 7.2 Structured Report ({_uid(str(s.sr.SOPClassUID))}): TID 1500")
    w("")
    t = srmod.TITLE
    w(f"One per study version, title ({t.value}, {t.scheme_designator}, \"{t.meaning}\"), completion COMPLETE, "
      "verification UNVERIFIED, preliminary flag PRELIMINARY as highdicom writes them; the first text item says "
      "the call in one sentence (docs/sr.md). Its content tree, from "
      "the builder run on a study with one analysed film (classes of the bundled model: "
      f"{', '.join(s.labels)}) and one refused film:")
    w("")
    w("```")
    for depth, rel, vt, name in samples.content_tree(s.sr):
        w("  " * depth + (f"{rel} " if rel else "") + f"{vt} {name}")
    w("```")
    w("")
    out += _table(["Tag", "Attribute", "Value"], _attributes(s.sr, s.source))
    w("### 7.3 Coded terminology")
    w("")
    w("Standard codes (DCM, SCT, UCUM) wherever one exists; where none does, the private scheme "
      f"`{srmod.PRIVATE_SCHEME}`, declared in the SR's Coding Scheme Identification Sequence:")
    w("")
    out += _table(["Code", "Meaning"], _private_codes(srmod))
    w("A class with no standard code is written as its label upper-cased in that scheme (e.g. `TUBERCULOSIS`).")
    w("")
    w("### 7.4 Private attributes")
    w("")
    w("None.")
    return "\n".join(out) + "\n"


def _private_codes(srmod) -> list[tuple[str, str]]:
    """Every code of the private scheme the SR module defines (constants and code tables)."""
    from pydicom.sr.coding import Code

    found: dict[str, str] = {}
    for value in vars(srmod).values():
        items = value.values() if isinstance(value, dict) else [value]
        for c in items:
            if isinstance(c, Code) and c.scheme_designator == srmod.PRIVATE_SCHEME:
                found.setdefault(c.value, c.meaning)
    return [(f"`{k}`", v) for k, v in sorted(found.items())]
