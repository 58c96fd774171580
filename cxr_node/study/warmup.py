"""Warm-up at start-up: one synthetic film through the stages a real study takes, so that the
first study after start costs what the next ones do (``[model] preload``).

The first film in a fresh process paid for lazy imports and first calls: pydicom's pixel handlers,
MONAI's transforms, both networks and Grad-CAM, scipy.ndimage, matplotlib's colour map, PIL's
font, highdicom and the Part 10 writer (about 5 s more than the next film on 2 cores before the
model was warmed up, about 1 s after, bench/e2e.py). The film is a grey gradient made here, in
memory; nothing is written, recorded or sent.
"""

from __future__ import annotations

import io
import logging

log = logging.getLogger(__name__)


def synthetic_film(rows: int = 320, cols: int = 288):
    """A CR film (MONOCHROME2, 12 bits) of a smooth gradient, as a decoded Part 10 dataset."""
    import numpy as np
    from pydicom import dcmread
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.PatientID = "CR", "CHEST", "PA", "WARMUP"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    y, x = np.mgrid[0:rows, 0:cols]
    ds.PixelData = (4095 * (0.2 + 0.6 * np.sin(np.pi * x / cols) * (y / rows))).astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf)


def warm_up(predictor, segmenter, identity, sc_max_rows: int, stop=None) -> None:
    """Decode, preprocess (with the lung segmenter), infer with Grad-CAM, triage, and build and
    encode a Secondary Capture (with a heat map) for the synthetic film. A failure is logged and
    costs only the first study's speed. ``stop`` (a threading.Event): set when the node stops, so
    that the warm-up gives up between stages instead of holding the exit up."""
    import numpy as np

    from cxr_node.encode import overlay
    from cxr_node.encode.sc import build_sc
    from cxr_node.model.preprocess import prepare

    def stopping() -> bool:
        return stop is not None and stop.is_set()

    try:
        ds = synthetic_film()
        pr = prepare(ds, predictor.params, segmenter)
        if stopping():
            return
        pred = predictor.policy.apply(list(predictor.predict([pr.x], explain=True))[0])
        if stopping():
            return
        film = pr.film if pr.film is not None else pr.display
        mask = pr.lungs.mask if pr.lungs is not None else np.ones(film.shape, dtype=np.float32)
        sc = build_sc(ds, film, pred, identity, instance_number=1, box=pr.box, lung_mask=mask, max_rows=sc_max_rows)
        sc.save_as(io.BytesIO(), enforce_file_format=True)
        if pred.cam is not None:  # the heat map even when the film's call is routine
            overlay.render_overlay(film, pred.cam, box=pr.box, lung_mask=mask, top_fraction=overlay.TOP_FRACTION)
    except Exception as e:  # only a warm-up: the first study pays for what it did not reach
        log.warning("warm-up on a synthetic film stopped early (%s: %s); the first study may be slower",
                    type(e).__name__, e)
        log.debug("warm-up failure", exc_info=True)
