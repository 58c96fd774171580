"""Issue 30, point 3: no study fails for good because of its Specific Character Set.

Before: a film declaring ``BOGUS`` or ``ISO 2022 IR 87`` alone was stored with 0x0000, then the
study failed three times inside highdicom's Secondary Capture builder (ValueError) and ended
``failed`` with no SC and no SR. Now every Defined Term, unknown terms and multi-valued ISO 2022
sets get their SC and SR in the PACS, the patient's name decoded, in a character set that holds
it; a change is said in the film's audit row. One daemon and one Orthanc for the whole set.
"""

from __future__ import annotations

import io
import warnings

import pytest
from conftest import Node, Orthanc, free_port, storescu
from conftest import wait_until as _wait
from dicomgen import make_cr, uid
from helpers_model import bundled_or_tiny
from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes, encode_string, python_encoding

from cxr_node.encode import charset

UTF8 = "ISO_IR 192"
NAMES = ["Müller^Jürgen", "Πέτρος^Ιωάννου", "Иванов^Иван", "محمد^علي", "כהן^דוד", "山田^太郎", "ﾔﾏﾀﾞ^ﾀﾛｳ",
         "김^민수", "王^小明", "สมชาย^ใจดี"]
#: kept as declared: highdicom writes them and the standard allows them alone or so combined
KEPT = {"ISO_IR 13", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126", "ISO_IR 127",
        "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 166", "ISO_IR 192", "ISO_IR 203", "GB18030", "GBK",
        "ISO 2022 IR 58", "ISO 2022 IR 6\\ISO 2022 IR 87", "ISO 2022 IR 13\\ISO 2022 IR 87",
        "ISO 2022 IR 100\\ISO 2022 IR 126", "ISO 2022 IR 6\\ISO 2022 IR 87\\ISO 2022 IR 159"}


def _name_bytes(terms: list[str]) -> tuple[str, bytes]:
    """A patient name the set can hold (not plain ASCII where it can hold more), encoded in it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encs = convert_encodings(terms)
        for name in NAMES:
            try:
                raw = encode_string(name, encs)
            except (UnicodeError, ValueError):
                continue
            if decode_bytes(raw, encs, []) == name and not raw.isascii():
                return name, raw
    return "Test^Patient", b"Test^Patient"


SEX_X = "ISO_IR 100 with PatientSex X"


def _cases() -> dict[str, tuple[str, bytes, str, str | None]]:
    """id -> (SpecificCharacterSet as sent, PatientName bytes, the name expected back, the set
    expected on the results: None for the default repertoire)."""
    out = {}
    for term in sorted(t for t in python_encoding if t):
        name, raw = _name_bytes([term])
        want = None if term == "ISO_IR 6" else term if term in KEPT else UTF8
        out[term] = (term, raw, name, want)
    for value in ("ISO 2022 IR 6\\ISO 2022 IR 87", "ISO 2022 IR 13\\ISO 2022 IR 87", "\\ISO 2022 IR 87",
                  "\\ISO 2022 IR 149", "ISO 2022 IR 6\\ISO 2022 IR 149", "\\ISO 2022 IR 58",
                  "ISO 2022 IR 100\\ISO 2022 IR 126", "ISO 2022 IR 6\\ISO 2022 IR 87\\ISO 2022 IR 159"):
        name, raw = _name_bytes(value.split("\\"))
        out[value] = (value, raw, name, value if value in KEPT else UTF8)
    # unknown terms: read as the default repertoire (pydicom reads it as Latin-1), written as UTF-8
    out["BOGUS"] = ("BOGUS", "Müller^Jürgen".encode("latin-1"), "Müller^Jürgen", UTF8)
    out["ISO 2022 IR 6\\BOGUS"] = ("ISO 2022 IR 6\\BOGUS", b"Smith^John", "Smith^John", UTF8)
    # bytes the declared set cannot decode: replaced, and written as UTF-8
    out["ISO_IR 192 with Latin-1 bytes"] = (UTF8, "Müller^J".encode("latin-1"), "M\ufffdller^J", UTF8)
    # not a character set, the same failure: highdicom refused PatientSex X (sent empty now)
    out[SEX_X] = ("ISO_IR 100", "Müller^Jürgen".encode("latin-1"), "Müller^Jürgen", "ISO_IR 100")
    return out


CASES = _cases()


def _even(b: bytes, pad: bytes = b" ") -> bytes:
    return b + pad * (len(b) % 2)


@pytest.fixture(scope="module")
def pacs_results(tmp_path_factory):
    """Every case as a film of its own study, sent to one daemon at once; the SR and SC of each in
    Orthanc, by case id."""
    root = tmp_path_factory.mktemp("charsets")
    node_port = free_port()
    orthanc = Orthanc(root / "orthanc", modalities={"cxrnode": ["CXRNODE", "127.0.0.1", node_port]}).start()
    ckpt = bundled_or_tiny(root / "model")
    node = Node(root / "node", port=node_port, quiet_seconds=1, extra=(
        f'[model]\ncheckpoint = "{ckpt}"\ndevice = "cpu"\n'
        "[outbox]\npoll_seconds = 0.5\nretry_base_seconds = 1\nretry_max_seconds = 2\nmax_attempts = 200\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'))
    try:
        node.start()
        films, studies = [], {}
        for i, (case, (value, raw, _, _)) in enumerate(CASES.items()):
            study, sop = uid(), uid()
            films.append(make_cr(root / f"films/{i}.dcm", study_uid=study, sop_uid=sop, rows=128, cols=128, seed=i,
                                 raw={"SpecificCharacterSet": ("CS", _even(value.encode())),
                                      "PatientName": ("PN", _even(raw)),
                                      **({"PatientSex": ("CS", b"X ")} if case == SEX_X else {})}))
            studies[case] = (study, sop)
        p = storescu(node.port, *films, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]

        def all_srs():
            srs = {}
            for case, (study, _) in studies.items():
                hits = orthanc.find(StudyInstanceUID=study, Modality="SR")
                if not hits:
                    return None
                srs[case] = hits[0]
            return srs

        srs = _wait(all_srs, 300, f"an SR for each of {len(studies)} studies in Orthanc", node, poll=2)
        out = {}
        for case, (study, sop) in studies.items():
            sr = dcmread(io.BytesIO(orthanc.file(srs[case]["ID"])))
            scs = [i for i in orthanc.find(StudyInstanceUID=study)
                   if i["ID"] != srs[case]["ID"] and i["MainDicomTags"].get("SOPInstanceUID", "").startswith("2.25.")]
            sc = dcmread(io.BytesIO(orthanc.file(scs[0]["ID"])), stop_before_pixels=True) if scs else None
            out[case] = (sr, sc, sop)
        rows = {r["sop_instance_uid"]: r for r in node.events("image.triaged") + node.events("image.skipped")}
        failed = node.events("study.failed")
        yield out, rows, failed, node
    finally:
        node.kill()
        orthanc.stop()


@pytest.mark.parametrize("case", list(CASES))
def test_every_character_set_gets_its_results_in_the_pacs(pacs_results, case):
    out, rows, failed, _ = pacs_results
    value, _, name, want = CASES[case]
    sr, sc, sop = out[case]
    assert sc is not None, f"{case}: no Secondary Capture (the film was not analysed): {rows.get(sop)}"
    for what, ds in (("SR", sr), ("SC", sc)):
        got_set = ds.get("SpecificCharacterSet")
        got_set = "\\".join(got_set) if isinstance(got_set, list) or (got_set and not isinstance(got_set, str)) \
            else got_set
        assert (got_set or None) == want, f"{case}: {what} in {got_set!r}, expected {want!r}"
        assert str(ds.PatientName) == name, f"{case}: {what} patient name decoded as {str(ds.PatientName)!r}"
        if case == SEX_X:
            assert ds.PatientSex == "", (what, ds.PatientSex)
    note = rows[sop]["detail"].get("character_set")
    if want in (None, value) and "\ufffd" not in name:
        assert note is None, (case, note)
    else:
        assert note and f"results written in {UTF8}" in note and repr(value[:64]) in note, (case, note)


def test_no_study_failed_and_no_patient_name_in_the_log(pacs_results):
    _, _, failed, node = pacs_results
    assert not failed, failed
    names = {n for _, _, n, _ in CASES.values()} - {"Test^Patient", "Smith^John"}
    leaked = [n for n in names if n.split("^")[0] in node.log]
    assert not leaked, leaked
    assert "Traceback" not in node.log


def test_fallback_reads_any_bytes_as_latin1():
    """The last resort (a film whose text prepare() cannot handle): Latin-1 decodes any byte."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds._dict[0x00100010] = RawDataElement(0x00100010, "PN", 4, b"\xff\xfe^A", 0, False, True)
    ds._dict[0x00080005] = RawDataElement(0x00080005, "CS", 6, b"BOGUS ", 0, False, True)
    charset.fallback(ds)
    assert str(ds.PatientName) == "\xff\xfe^A" and ds.SpecificCharacterSet == UTF8


@pytest.mark.parametrize("value,raw,name,note", [
    ("ISO_IR 6", b"Smith^John", "Smith^John", None),
    ("ISO_IR 100", "Müller^Jürgen".encode("latin-1"), "Müller^Jürgen", None),
    ("BOGUS", "Müller^Jürgen".encode("latin-1"), "Müller^Jürgen", "'BOGUS' is not a Defined Term"),
    ("ISO 2022 IR 87", b"\x1b$B;3ED\x1b(B", "山田", "not a combination highdicom writes"),
    ("ISO_IR 192", b"M\xfcller", "M\ufffdller", "replaced by U+FFFD"),
])
def test_prepare_in_process(value, raw, name, note):
    """The same decisions without a daemon: the name as decoded, the set the results get, the note."""
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds._dict[0x00080005] = RawDataElement(0x00080005, "CS", len(value), value.encode(), 0, False, True)
    ds._dict[0x00100010] = RawDataElement(0x00100010, "PN", len(raw), raw, 0, False, True)
    got = charset.prepare(ds)
    assert str(ds.PatientName) == name
    if note is None:
        assert got is None and ds.get("SpecificCharacterSet") in (None, value) and value != "ISO_IR 6" or \
            "SpecificCharacterSet" not in ds
    else:
        assert note in got and ds.SpecificCharacterSet == UTF8
