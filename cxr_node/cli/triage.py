"""``cxr-node triage FILE...``: offline triage of DICOM, PNG or JPEG files.

Per file: class probabilities, top class, urgent flag, priority and model version; with
``--overlay-dir`` a PNG of the film with the Grad-CAM heat map (inside the lung fields), the
legend and a colour scale, as the daemon's Secondary Capture shows it.

Films go through the daemon's own eligibility rules (:mod:`cxr_node.eligibility.rules`): the DICOM
header (body part, view), two plausible lung fields, and the model's out-of-domain score. A
refused film gets a "not analysed" line with the reason, no probabilities and no flag; refusals
do not change the exit status. ``--any-film`` skips the rules. A file that cannot be read at all
gets an error line (stderr, and in the output); the other files are still processed and the exit
status is 1.

A directory stands for the regular files directly in it (sorted; not recursive; hidden files and
DICOMDIR left out). A file that is neither DICOM Part 10 nor PNG/JPEG (a text file, an empty
file) gets an error line saying what it is, instead of pydicom's advice to use ``force=True``,
which a CLI user cannot follow.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

from cxr_node.errors import CxrNodeError, PreprocessError

log = logging.getLogger(__name__)

_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def register(sub, common) -> None:
    tri = sub.add_parser("triage", parents=[common], help="triage image files offline (DICOM, PNG or JPEG)",
                         description="Per file: class probabilities, top class, urgent flag and model "
                         "version. A file that cannot be used gets an error line; the others are "
                         "still processed and the exit status is 1. A directory stands for the files "
                         "directly in it (not recursive). Films that are not frontal chest films "
                         "(DICOM header, no plausible lung fields, outside the model's training "
                         "distribution) are reported as not analysed, with the reason, as the "
                         "daemon does; they do not make the exit status non-zero.")
    tri.add_argument("files", nargs="+", metavar="FILE", help="DICOM, PNG or JPEG files, or directories of them")
    tri.add_argument("--checkpoint", metavar="PATH", help="model checkpoint (default: [model] checkpoint)")
    tri.add_argument("--overlay-dir", metavar="DIR", help="write a Grad-CAM overlay PNG per file here")
    tri.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    tri.add_argument("--format", choices=["table", "json"], default="table")
    tri.add_argument("--any-film", action="store_true",
                     help="analyse every readable film, even one the eligibility rules refuse")
    tri.set_defaults(run=run_triage)


def expand(names: list[str]) -> list[str]:
    """FILE arguments with each directory replaced by the regular files directly in it, sorted
    (hidden files and DICOMDIR left out). An empty directory stays, to get its error line."""
    out: list[str] = []
    for name in names:
        p = Path(name)
        if not p.is_dir():
            out.append(name)
            continue
        files = sorted(str(f) for f in p.iterdir()
                       if f.is_file() and not f.name.startswith(".") and f.name.upper() != "DICOMDIR")
        out.extend(files or [name])
    return out


def unusable(path: Path) -> str | None:
    """Why ``path`` cannot be an image, in words a user can act on; None when it may be one (the
    decoders then report any problem inside the file)."""
    if path.is_dir():
        return "is a directory with no files in it"
    if not path.exists():
        return "file not found"
    if not path.is_file():
        return "not a regular file"
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    if head[128:132] == b"DICM" or head.startswith(_IMAGE_MAGIC) or path.suffix.lower() in _IMAGE_SUFFIXES:
        return None
    if not head:
        return "empty file: pass DICOM (Part 10), PNG or JPEG files"
    if b"\0" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            return "a text file, not an image: pass DICOM (Part 10), PNG or JPEG files"
    return ("neither a DICOM Part 10 file (no 'DICM' marker at byte 128) nor a PNG/JPEG image: "
            "pass DICOM, PNG or JPEG files")


def _overlay_path(out_dir: Path, src: Path, used: set[str]) -> Path:
    stem = src.stem or "image"
    name = f"{stem}.gradcam.png"
    n = 2
    while name in used:
        name = f"{stem}-{n}.gradcam.png"
        n += 1
    used.add(name)
    return out_dir / name


def _not_frontal_chest(path: Path, settings: Any) -> str | None:
    """The daemon's header rule for a DICOM file; None for a usable film or a non-DICOM file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from cxr_node.eligibility.rules import header_reason, settings_rules

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None  # PNG/JPEG, or a DICOM problem that preprocessing reports precisely
    return header_reason(ds, **settings_rules(settings))


def run_triage(settings: Any, args: Any, out: TextIO) -> int:
    """Triage ``args.files``; write a table or JSON to ``out``. Returns 0, or 1 if any file failed."""
    fmt = getattr(args, "format", "table") or "table"
    ckpt = Path(args.checkpoint) if getattr(args, "checkpoint", None) else Path(settings.model.checkpoint)
    # the inputs first, before the model loads (seconds): a file that cannot be an image is said once,
    # on stderr (JSON keeps a row for it), and with nothing usable the model is not loaded at all
    files = expand(list(args.files))
    unusable_rows: dict[str, dict[str, Any]] = {}
    for f in files:
        why = unusable(Path(f))
        if why:
            unusable_rows[f] = {"file": str(f), "error": f"{Path(f).name}: {why}"}
            sys.stderr.write(f"cxr-node triage: {f}: cannot use this file: {why}\n")
    if len(unusable_rows) == len(files):
        if fmt == "json":
            out.write(json.dumps({"model_version": None, "checkpoint": str(ckpt), "labels": [],
                                  "results": list(unusable_rows.values())}, indent=2) + "\n")
        return 1

    from PIL import Image

    from cxr_node.eligibility.rules import lung_reason, ood_reason
    from cxr_node.encode.identity import ModelIdentity
    from cxr_node.encode.sc import render
    from cxr_node.model.infer import Predictor
    from cxr_node.model.lungs import LungSegmenter
    from cxr_node.model.preprocess import prepare

    device = getattr(args, "device", None) or settings.model.device
    # CheckpointError -> the CLI reports it, exit 1
    predictor = Predictor(ckpt, device=device,
                          ood_reference=None if getattr(args, "checkpoint", None) else settings.model.ood_reference)
    segmenter = LungSegmenter(settings.model.lung_checkpoint, device=predictor.device)
    any_film = getattr(args, "any_film", False)
    threshold = predictor.ood.threshold if predictor.ood is not None and not any_film else None
    overlay_dir = Path(args.overlay_dir) if getattr(args, "overlay_dir", None) else None
    if overlay_dir is not None:
        overlay_dir.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    failed = 0
    used: set[str] = set()
    for f in files:
        path = Path(f)
        row: dict[str, Any] = {"file": str(f)}
        if f in unusable_rows:  # said above
            failed += 1
            if fmt == "json":
                rows.append(unusable_rows[f])
            continue
        reason = None if any_film else _not_frontal_chest(path, settings)
        try:
            pr = None if reason else prepare(path, predictor.params, segmenter)
            reason = reason or (None if any_film else lung_reason(pr.lungs))
            pred = None if reason else predictor.predict([pr.x], explain=overlay_dir is not None)[0]
            reason = reason or ood_reason(pred.ood_score, threshold)
            pred = None if reason else predictor.policy.apply(pred)
        except PreprocessError as e:
            failed += 1
            msg = str(e)
            if not msg.startswith(path.name) and not msg.startswith(str(path)):
                msg = f"{path.name}: {msg}"
            row["error"] = msg
            sys.stderr.write(f"cxr-node triage: {f}: cannot use this file: {e}\n")
            rows.append(row)
            continue
        if reason:
            row["refused"] = str(reason)
            row["refusal_code"] = reason.code.value
            sys.stderr.write(f"cxr-node triage: {f}: not analysed: {reason} (--any-film analyses it anyway)\n")
            rows.append(row)
            log.info("not analysed %s: %s", path.name, reason)
            continue
        row.update(pred.as_dict())
        if overlay_dir is not None and pred.cam is not None:
            op = _overlay_path(overlay_dir, path, used)
            try:
                mask = pr.lungs.mask if pr.lungs is not None and pr.lungs.box is not None else None
                # the Secondary Capture's own picture and wording (the call, whose operating point)
                model = ModelIdentity.from_meta(predictor.meta)
                Image.fromarray(render(pr.display, pred, model, box=pr.box, lung_mask=mask)).save(op)
                row["overlay"] = str(op)
            except OSError as e:
                raise CxrNodeError(f"cannot write overlay {op}: {e.strerror or e}") from e
        rows.append(row)
        log.info("triaged %s: %s %.3f urgent=%s", path.name, pred.top_label, pred.top_probability, pred.urgent)

    if fmt == "json":
        out.write(json.dumps({"model_version": predictor.version, "checkpoint": str(ckpt),
                              "labels": list(predictor.labels), "results": rows}, indent=2) + "\n")
    else:
        _write_table(out, rows, predictor.labels, predictor.version)
    return 1 if failed else 0


def _write_table(out: TextIO, rows: list[dict[str, Any]], labels: tuple[str, ...], version: str) -> None:
    heads = ["file", *labels, "top", "urgent", "priority", "model"]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["file"], f"ERROR: {r['error']}"])
            continue
        if "refused" in r:
            table.append([r["file"], f"NOT ANALYSED: {r['refused']}"])
            continue
        probs = r["probabilities"]
        line = [r["file"], *(f"{probs[n]:.3f}" for n in labels), r["top_label"],
                "URGENT" if r["urgent"] else "no", r["priority"], r["model_version"]]
        if "overlay" in r:
            line.append(r["overlay"])
        table.append(line)
    ok = [t for t in table if len(t) > 2]
    widths = [max([len(h)] + [len(t[i]) for t in ok if i < len(t)]) for i, h in enumerate(heads)]
    out.write("  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip() + "\n")
    for t in table:
        if len(t) == 2:
            out.write(f"{t[0].ljust(widths[0])}  {t[1]}\n")
        else:
            out.write("  ".join(c.ljust(w) for c, w in zip(t, widths + [0])).rstrip() + "\n")
