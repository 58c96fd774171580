"""Offline triage: Predictor on the real CR films, and the real CLI as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers_model import LABELS, bundled_or_tiny, make_checkpoint

REPO = Path(__file__).resolve().parents[2]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").is_file() else sys.executable


@pytest.fixture(scope="module")
def films():
    from pydicom.data import get_testdata_file

    return {n: Path(get_testdata_file(n)) for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_J2KI.dcm")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return bundled_or_tiny(tmp_path_factory.mktemp("triage"))


def triage(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "cxr_node", "triage", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "2"})


def test_uncompressed_and_j2k_lossless_give_same_probabilities(films, checkpoint):
    from cxr_node.model.infer import Predictor

    pred = Predictor(checkpoint)
    a, b = pred.predict([pred.preprocess(films["RG1_UNCR.dcm"]), pred.preprocess(films["RG1_J2KR.dcm"])])
    assert np.max(np.abs(np.array(a.probabilities) - np.array(b.probabilities))) < 1e-3
    assert a.top_label == b.top_label and pred.policy.apply(a).urgent == pred.policy.apply(b).urgent
    assert a.model_version == pred.meta["version"]


def test_cli_table_with_bad_file_and_overlay(films, checkpoint, tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    rgb = tmp_path / "colour.png"
    from PIL import Image

    a = np.zeros((100, 100, 3), np.uint8)
    a[..., 1] = 255
    Image.fromarray(a).save(rgb)
    ov = tmp_path / "overlays"
    p = triage(str(films["RG1_UNCR.dcm"]), str(bad), str(rgb), str(films["RG3_J2KI.dcm"]),
               "--checkpoint", str(checkpoint), "--overlay-dir", str(ov), "--device", "cpu")
    assert p.returncode == 1, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split()[:4] == ["file", "COVID", "Normal", "Viral"]
    uncr = next(line for line in lines if "RG1_UNCR.dcm" in line)
    probs = [float(v) for v in uncr.split()[1:4]]
    assert abs(sum(probs) - 1.0) < 3e-3
    assert any(tag in uncr for tag in ("URGENT", " no "))
    assert "broken.dcm" in p.stderr and "not a readable DICOM file" in p.stderr
    assert "colour.png" in p.stderr and "colour image" in p.stderr
    assert any("broken.dcm" in line and "ERROR" in line for line in lines)
    # the tibia is refused by the daemon's header rule, with the reason, and the others are still processed
    assert "RG3_J2KI.dcm" in p.stderr and "BodyPartExamined is EXTREMITY" in p.stderr
    assert any("RG3_J2KI.dcm" in line and "NOT ANALYSED" in line and "EXTREMITY" in line for line in lines)
    assert not (ov / "RG3_J2KI.gradcam.png").exists()
    img = np.asarray(Image.open(ov / "RG1_UNCR.gradcam.png"))
    # the film (512 px high, enlarged to 768 rows so the legend reads) with the legend strip below it
    assert img.ndim == 3 and img.shape[2] == 3 and img.shape[0] > 768
    assert img.shape[1] == round(round(1841 * 512 / 1955) * 768 / 512)
    legend = img[768:]
    assert (legend[..., 0] > 200).any() and (np.abs(legend[..., 0].astype(int) - legend[..., 2]) > 100).any()
    coloured = (np.abs(img[..., 0].astype(int) - img[..., 2]) > 30).mean()
    grey = (img[..., 0] == img[..., 1]).mean()
    assert 0.0 < coloured < 1.0 and grey > 0.05  # heat above the threshold, plain grey film below it


def test_cli_json_and_exit_zero_when_all_good(films, checkpoint):
    p = triage(str(films["RG1_UNCR.dcm"]), "--checkpoint", str(checkpoint), "--format", "json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    [r] = doc["results"]
    assert set(r["probabilities"]) == set(doc["labels"])
    assert r["top_label"] == max(r["probabilities"], key=r["probabilities"].get)
    assert isinstance(r["urgent"], bool) and r["model_version"] == doc["model_version"]


def test_cli_any_film_triages_a_non_chest_film(films, checkpoint):
    p = triage(str(films["RG3_J2KI.dcm"]), "--checkpoint", str(checkpoint), "--format", "json", "--any-film")
    assert p.returncode == 0, p.stderr
    [r] = json.loads(p.stdout)["results"]
    assert "error" not in r and abs(sum(r["probabilities"].values()) - 1.0) < 3e-3


def test_cli_reports_a_photograph_as_not_analysed_with_exit_zero(checkpoint, tmp_path):
    """A PNG that is not a chest film (a photograph) is refused by its pixels, not forced into the
    model's classes; a refusal is an answer, not an error, so the exit status stays 0."""
    from PIL import Image
    from skimage import data

    photo = tmp_path / "camera.png"
    Image.fromarray(data.camera()).save(photo)
    p = triage(str(photo), "--checkpoint", str(checkpoint), "--format", "json")
    assert p.returncode == 0, p.stderr
    [r] = json.loads(p.stdout)["results"]
    assert "probabilities" not in r and "urgent" not in r
    assert "lung field" in r["refused"]
    assert "camera.png: not analysed" in p.stderr


def test_cli_refuses_tampered_checkpoint(films, tmp_path):
    import torch

    ck = make_checkpoint(tmp_path / "ok.pt", input_size=64)
    raw = torch.load(ck, weights_only=True)
    raw["state_dict"]["class_layers.out.bias"][0] += 0.5
    torch.save(raw, tmp_path / "evil.pt")
    p = triage(str(films["RG1_UNCR.dcm"]), "--checkpoint", str(tmp_path / "evil.pt"))
    assert p.returncode == 1
    assert "sha256 mismatch" in p.stderr and p.stdout == ""


def test_run_triage_in_process_uses_settings_defaults(films, tmp_path):
    import io

    from cxr_node.cli.triage import run_triage

    ck = make_checkpoint(tmp_path / "m.pt", input_size=64, thresholds={"COVID": 0.0})
    settings = SimpleNamespace(model=SimpleNamespace(checkpoint=ck, device="cpu", lung_checkpoint=None,
                                                     ood_reference=None))
    args = SimpleNamespace(files=[str(films["RG1_UNCR.dcm"]), str(tmp_path / "missing.png")], checkpoint=None,
                           overlay_dir=None, device=None, format="json")
    out = io.StringIO()
    assert run_triage(settings, args, out) == 1
    doc = json.loads(out.getvalue())
    ok, missing = doc["results"]
    assert ok["urgent"] is True and ok["priority"] == "urgent"  # threshold 0 -> always urgent
    assert doc["labels"] == LABELS and "file not found" in missing["error"]


def test_cli_directory_and_files_that_are_not_images(films, checkpoint, tmp_path):
    """A directory stands for the files in it; a text file (whatever its name) and an empty file
    get a line saying what they are, never pydicom's "Use force=True"; an empty directory says so."""
    import shutil

    d = tmp_path / "films"
    d.mkdir()
    shutil.copy(films["RG1_UNCR.dcm"], d / "a-film.dcm")
    (d / "notes.txt").write_text("patient list, see ward 3\n")
    (d / "report.dcm").write_text("this is not DICOM\n")
    (d / ".hidden").write_text("skipped")
    (d / "sub").mkdir()  # not recursive
    empty_file = tmp_path / "empty.png.part"
    empty_file.write_bytes(b"")
    empty_dir = tmp_path / "nothing-here"
    empty_dir.mkdir()
    p = triage(str(d), str(empty_file), str(empty_dir), "--checkpoint", str(checkpoint), "--format", "json")
    assert p.returncode == 1, p.stderr
    rows = {Path(r["file"]).name: r for r in json.loads(p.stdout)["results"]}
    assert set(rows) == {"a-film.dcm", "notes.txt", "report.dcm", "empty.png.part", "nothing-here"}
    assert "error" not in rows["a-film.dcm"] and abs(sum(rows["a-film.dcm"]["probabilities"].values()) - 1) < 3e-3
    for name in ("notes.txt", "report.dcm"):
        assert rows[name]["error"] == f"{name}: a text file, not an image: pass DICOM (Part 10), PNG or JPEG files"
    assert rows["empty.png.part"]["error"].startswith("empty.png.part: empty file")
    assert rows["nothing-here"]["error"] == "nothing-here: is a directory with no files in it"
    assert "force=True" not in p.stderr + p.stdout
    assert f"cxr-node triage: {d / 'report.dcm'}: cannot use this file: a text file" in p.stderr


def test_unusable_names_what_a_file_is(tmp_path):
    from cxr_node.cli.triage import unusable

    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert unusable(binary).startswith("neither a DICOM Part 10 file (no 'DICM' marker at byte 128)")
    assert unusable(tmp_path / "gone.dcm") == "file not found"
    dicm = tmp_path / "x"
    dicm.write_bytes(b"\0" * 128 + b"DICM")
    assert unusable(dicm) is None  # a DICOM preamble: the decoder reports what is wrong inside
