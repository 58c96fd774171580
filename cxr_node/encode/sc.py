"""The Grad-CAM Secondary Capture: the film in grey at its own resolution (at most ``max_rows``
rows, ``[outbox] sc_max_rows``), a heat map only for the finding that raised the flag (none for a
routine call), over the strongest part of the map inside the lungs, and a legend in a strip below
the film (so it covers no lung), scaled to the film, with "NOT FOR DIAGNOSTIC USE", the call and
the operating point it was compared with ("URGENT: abnormal 87% (operating point 40%); pattern most
like COVID-19", :func:`cxr_node.encode.wording.headline`, and "operating point not yet calibrated
at this site" when the station has no calibration of its own), every class as a pattern, what the
map shows and the model, all burned into the pixels (:mod:`cxr_node.encode.overlay`).

highdicom's SCImage does most of it; what it leaves out (dciodvfy reports it otherwise) is set here:
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
MAX_ROWS = 2048  # the default of [outbox] sc_max_rows


def render(film: np.ndarray, prediction, model: ModelIdentity, box=None, lung_mask=None,
           max_rows: int = MAX_ROWS) -> np.ndarray:
    """RGB uint8 (H + legend, W, 3): the overlay (heat only inside the lungs) plus the legend strip."""
    from cxr_node.encode import wording
    from cxr_node.encode.overlay import render_figure

    thresholds = {n: t for n, t in model.thresholds.items() if not wording.is_normal(n)} \
        if model.abnormal_threshold is None else \
        {n: t for n, t in model.thresholds.items() if n in model.pattern_triggers}
    return render_figure(film, prediction, model.name, model.version, box=box, lung_mask=lung_mask,
                         max_side=max_rows, calibration=_legend_calibration(model),
                         thresholds=thresholds, call=wording.call_for(prediction, model))


def _legend_calibration(model: ModelIdentity) -> str | None:
    """The legend names a site calibration; the model's own operating points need no mention."""
    return None if model.calibration == "model" else f"{model.calibration} calibration"


def build_sc(source: Dataset, film: np.ndarray, prediction, model: ModelIdentity, *,
             instance_number: int, box=None, lung_mask=None, max_rows: int = MAX_ROWS) -> Dataset:
    """The Secondary Capture for one analysed film (``film``: best at the source's resolution,
    :attr:`cxr_node.model.preprocess.Prepared.film`). Its UIDs depend only on the source film and the
    model's weights, so building it twice gives the same object identity."""
    import highdicom as hd

    pixels = render(film, prediction, model, box=box, lung_mask=lung_mask, max_rows=max_rows)
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
    sc.DerivationDescription = (f"Grad-CAM heat map of {model.name} {model.version} for the finding that raised "
                                f"the flag (none for a routine call) blended over the film; "
                                f"operating points: {model.calibration}")[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    for kw in ("AccessionNumber", "StudyID", "ReferringPhysicianName", "StudyDate", "StudyTime"):
        if kw in source and kw not in sc:
            setattr(sc, kw, source.get(kw))
    return sc
