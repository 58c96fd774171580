"""The Grad-CAM Secondary Capture: the film in grey, the heat map only where it matters, and a
legend in a strip below the film (so it covers no lung) with "NOT FOR DIAGNOSTIC USE", the top
class and its probability, and the model's name and version, all burned into the pixels.

highdicom's SCImage does most of it; what it leaves out (dciodvfy complains without it) is set here:
BurnedInAnnotation YES, BodyPartExamined CHEST, SourceImageSequence, and Contributing Equipment
with the Device UID of the weights.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from cxr_node.encode.identity import MANUFACTURER, ModelIdentity, contributing_equipment, with_type2

SC_SERIES_NUMBER = 9901
SC_SERIES_DESCRIPTION = "cxr-node Grad-CAM overlay - NOT FOR DIAGNOSTIC USE"
MAX_SIDE = 1024


def _fit(film: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    from PIL import Image

    h, w = film.shape
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return film
    img = Image.fromarray(np.clip(film * 255.0, 0, 255).astype(np.uint8))
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def legend_lines(prediction, model: ModelIdentity) -> list[tuple[str, tuple[int, int, int]]]:
    flag = "URGENT" if prediction.urgent else prediction.priority.upper()
    probs = "  ".join(f"{label} {p:.0%}" for label, p in zip(prediction.labels, prediction.probabilities))
    return [
        ("NOT FOR DIAGNOSTIC USE", (255, 210, 0)),
        (f"{prediction.top_label} {prediction.top_probability:.0%}  [{flag}]", (255, 255, 255)),
        (probs, (200, 200, 200)),
        (f"{model.name} {model.version} - heat map: Grad-CAM for {prediction.cam_label or prediction.top_label}",
         (200, 200, 200)),
    ]


def render(film: np.ndarray, prediction, model: ModelIdentity) -> np.ndarray:
    """RGB uint8 (H + legend, W, 3): overlay plus the legend strip."""
    from PIL import Image, ImageDraw, ImageFont

    from cxr_node.overlay import render_overlay

    film = _fit(film)
    if prediction.cam is None:
        raise ValueError("the prediction has no Grad-CAM map (predict with explain=True)")
    rgb = render_overlay(film, prediction.cam)
    h, w, _ = rgb.shape
    lines = legend_lines(prediction, model)
    size = max(10, min(28, w // 40))
    font = ImageFont.load_default(size=size)
    strip_h = int(len(lines) * size * 1.35 + size)
    canvas = Image.new("RGB", (w, h + strip_h), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = h + size // 2
    for text, colour in lines:
        while draw.textlength(text, font=font) > w - size and len(text) > 8:  # never run off the edge
            text = text[:-4] + "..."
        draw.text((size // 2, y), text, fill=colour, font=font)
        y += int(size * 1.35)
    return np.asarray(canvas, dtype=np.uint8)


def build_sc(source: Dataset, film: np.ndarray, prediction, model: ModelIdentity, *,
             instance_number: int) -> Dataset:
    """The Secondary Capture for one analysed film. Its UIDs depend only on the source film and
    the model's weights, so building it twice gives the same object identity."""
    import highdicom as hd

    pixels = render(film, prediction, model)
    source = with_type2(source)
    orientation = None
    po = source.get("PatientOrientation")
    if po and len(po) == 2 and all(str(x) for x in po):
        orientation = (str(po[0]), str(po[1]))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=model.sc_series_uid(source.StudyInstanceUID),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=model.sc_uid(source.SOPInstanceUID),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[contributing_equipment(model)],
    )
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.BodyPartExamined = "CHEST"
    sc.DerivationDescription = f"Grad-CAM heat map of {model.name} {model.version} blended over the film"[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    for kw in ("AccessionNumber", "StudyID", "ReferringPhysicianName", "StudyDate", "StudyTime"):
        if kw in source and kw not in sc:
            setattr(sc, kw, source.get(kw))
    return sc
