"""The TID 1500 Imaging Measurement Report for one study version (Comprehensive 3D SR).

One measurement group per analysed film: tracking identifier and UID, algorithm identification
(TID 4019, with the operating thresholds as parameters), the finding (top class) and per-class
present/absent at the model's operating point as qualitative evaluations, each class
probability as a NUM with UCUM unit "1", and the film and its Secondary Capture as source
images. A film that was sent for triage but not analysed (no lung fields, outside the training
distribution, a header that is not a frontal chest film, unusable pixels) gets a group of its own
whose finding is "Not analysed" with the reason as a coded evaluation, so it never looks like a
film with no finding. A revised study (a late image) gets a new SR naming the earlier one in
PredecessorDocumentsSequence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from cxr_node.encode.identity import DEVICE_NAME, MANUFACTURER, ModelIdentity, contributing_equipment, with_type2
from cxr_node.eligibility.refusal import Refusal, RefusalCode

SR_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "cxr-node triage report - NOT FOR DIAGNOSTIC USE"
PRIVATE_SCHEME = "99CXRNODE"

FINDING = Code("121071", "DCM", "Finding")
PROCEDURE_REPORTED = Code("363679005", "SCT", "Imaging procedure")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
UNIT_ONE = Code("1", "UCUM", "no units")

#: Standard codes for the labels we know; any other label gets a code in our private scheme.
KNOWN_LABELS = {
    "covid": Code("840539006", "SCT", "COVID-19"),
    "covid-19": Code("840539006", "SCT", "COVID-19"),
    "viral pneumonia": Code("75570004", "SCT", "Viral pneumonia"),
    "normal": Code("17621005", "SCT", "Normal"),
}


def label_code(label: str) -> Code:
    known = KNOWN_LABELS.get(label.strip().lower())
    if known:
        return known
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label.strip()).strip("-").upper()[:16] or "LABEL"
    return Code(slug, PRIVATE_SCHEME, label[:64])


def probability_code(label: str) -> Code:
    c = label_code(label)
    return Code(f"P-{c.value}"[:16], PRIVATE_SCHEME, f"Probability of {c.meaning}"[:64])


NOT_ANALYSED = Code("NOTANALYSED", PRIVATE_SCHEME, "Not analysed")
REASON_NOT_ANALYSED = Code("REASON", PRIVATE_SCHEME, "Reason not analysed")
#: Coded reason per refusal code (cxr_node.eligibility.refusal.RefusalCode); the text is in the audit trail.
_NO_LUNGS = Code("NOLUNGS", PRIVATE_SCHEME, "No plausible lung fields found")
REASON_CODES = {
    RefusalCode.NO_LUNG_FIELDS: _NO_LUNGS,
    RefusalCode.OUT_OF_DOMAIN: Code("OOD", PRIVATE_SCHEME, "Outside the model's training distribution"),
    RefusalCode.HEADER: Code("HEADER", PRIVATE_SCHEME, "Header: not a frontal chest film"),
    RefusalCode.PIXELS: Code("PIXELS", PRIVATE_SCHEME, "Pixels unusable"),
    RefusalCode.UNREADABLE: Code("UNREADABLE", PRIVATE_SCHEME, "File or header element unreadable"),
}
OTHER_REASON = Code("OTHER", PRIVATE_SCHEME, "Not analysed for another reason")


def reason_code(refusal: Refusal) -> Code:
    """The SR's coded reason for a refusal: from its code, never from its wording."""
    return REASON_CODES.get(refusal.code, OTHER_REASON)


@dataclass(frozen=True)
class RefusedFilm:
    source: Dataset        # the film as received (header)
    reason: Refusal        # why it was not analysed: the code is what the SR carries


@dataclass(frozen=True)
class AnalysedFilm:
    source: Dataset        # the film as received (header is enough; pixels not needed)
    sc: Dataset            # its Secondary Capture
    prediction: object     # cxr_node.model.infer.Prediction


def _ref(ds: Dataset) -> Dataset:
    """A minimal dataset naming an object: what highdicom needs for evidence and predecessors."""
    r = Dataset()
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        setattr(r, kw, ds.get(kw))
    return r


def _request(source: Dataset) -> list[Dataset]:
    """ReferencedRequestSequence items copied from the source's request context, if it has one:
    one per Request Attributes item, else one from the Accession Number alone."""
    def item(req: Dataset | None) -> Dataset:
        it = Dataset()
        it.StudyInstanceUID = source.StudyInstanceUID
        it.AccessionNumber = source.get("AccessionNumber", "")
        it.RequestedProcedureID = req.get("RequestedProcedureID", "") if req else ""
        it.PlacerOrderNumberImagingServiceRequest = ""
        it.FillerOrderNumberImagingServiceRequest = ""
        it.RequestedProcedureDescription = req.get("RequestedProcedureDescription", "") if req else ""
        it.RequestedProcedureCodeSequence = []
        it.ReferencedStudySequence = []  # Type 2 in the Referenced Request macro
        return it

    requests = list(source.get("RequestAttributesSequence", []) or [])
    if requests:
        return [item(r) for r in requests]
    return [item(None)] if source.get("AccessionNumber") else []


def build_sr(films: Sequence[AnalysedFilm], model: ModelIdentity, *, study_version: int,
             predecessor: Dataset | None = None, refused: Sequence[RefusedFilm] = ()) -> Dataset:
    """The study's SR. ``predecessor`` (any dataset with the four UIDs) is the SR it revises;
    ``refused`` are the films sent for triage that were not analysed, each with its reason."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not films and not refused:
        raise ValueError("an SR needs at least one analysed or refused film")
    first = (films[0] if films else refused[0]).source
    study_uid = first.StudyInstanceUID
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid, name=DEVICE_NAME, manufacturer_name=MANUFACTURER, model_name=model.name[:64]),
    )
    params = [f"{label} threshold {t:.4f}" for label, t in model.thresholds.items()]
    params.append(f"calibration {model.calibration}"
                  + (f" temperature {model.temperature:.4f}" if model.temperature is not None else ""))
    algorithm = hd.sr.AlgorithmIdentification(name=model.name[:64], version=model.version[:64],
                                              parameters=params or None, manufacturer=MANUFACTURER)
    groups = []
    for i, film in enumerate(films, start=1):
        p = film.prediction
        evaluations = [hd.sr.QualitativeEvaluation(FINDING, label_code(p.top_label))]
        for label in p.labels:
            t = model.thresholds.get(label)
            if t is not None:
                evaluations.append(hd.sr.QualitativeEvaluation(
                    label_code(label), PRESENT if p.probability(label) >= t else ABSENT))
        measurements = [hd.sr.Measurement(name=probability_code(label), value=float(prob), unit=UNIT_ONE,
                                          algorithm_id=algorithm)
                        for label, prob in zip(p.labels, p.probabilities)]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=model.tracking_uid(film.source.SOPInstanceUID), identifier=f"cxr-node film {i}"),
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=evaluations,
            source_images=[
                hd.sr.SourceImageForMeasurementGroup(film.source.SOPClassUID, film.source.SOPInstanceUID),
                hd.sr.SourceImageForMeasurementGroup(film.sc.SOPClassUID, film.sc.SOPInstanceUID),
            ],
        ))
    for j, film in enumerate(refused, start=len(films) + 1):
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=model.tracking_uid(film.source.SOPInstanceUID), identifier=f"cxr-node film {j}"),
            algorithm_id=algorithm,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(FINDING, NOT_ANALYSED),
                                     hd.sr.QualitativeEvaluation(REASON_NOT_ANALYSED, reason_code(film.reason))],
            source_images=[hd.sr.SourceImageForMeasurementGroup(film.source.SOPClassUID, film.source.SOPInstanceUID)],
        ))
    # ImageLibrary entries need ImagerPixelSpacing in highdicom
    library = [f.source for f in list(films) + list(refused) if "ImagerPixelSpacing" in f.source]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
        referenced_images=library or None,
    )
    evidence = [with_type2(f.source) for f in films] + [f.sc for f in films] + [with_type2(f.source) for f in refused]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=model.sr_series_uid(study_uid),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=model.sr_uid(study_uid, study_version),
        instance_number=study_version,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        requested_procedures=_request(first) or None,
        previous_versions=[_ref(predecessor)] if predecessor is not None else None,
        contributing_equipment=[contributing_equipment(model)],
        series_description=SR_SERIES_DESCRIPTION,
    )
    for kw in ("AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName"):
        if kw in first and not sr.get(kw):
            setattr(sr, kw, first.get(kw))
    # PS3.3 8.2 / C.12.1: a private coding scheme used in the document is identified in the SOP Common
    # module's Coding Scheme Identification Sequence, so a reader can tell who owns "99CXRNODE"
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "cxr-node local codes (probability concepts, labels without a standard code)"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [item]
    return sr


def read_findings(sr_dataset: Dataset) -> list[dict]:
    """Read an SR we wrote back into plain findings, one dict per measurement group:
    ``tracking_uid``, ``finding`` (top class meaning), ``evaluations`` {class: Present/Absent},
    ``probabilities`` {class: p} and ``source_sop_uids``."""
    import highdicom as hd

    sr = hd.sr.Comprehensive3DSR.from_dataset(sr_dataset) if not isinstance(sr_dataset, hd.sr.Comprehensive3DSR) \
        else sr_dataset
    out = []
    for group in sr.content.get_image_measurement_groups():
        finding = None
        container = group[0]
        for item in container.ContentSequence:  # highdicom's getter skips DCM 121071 "Finding"
            name = item.ConceptNameCodeSequence[0]
            if item.ValueType == "CODE" and (name.CodeValue, name.CodingSchemeDesignator) == ("121071", "DCM"):
                finding = item.ConceptCodeSequence[0].CodeMeaning
        out.append({
            "tracking_uid": group.tracking_uid,
            "finding": finding,
            "evaluations": {q.name.meaning: q.value.meaning for q in group.get_qualitative_evaluations()},
            "probabilities": {m.name.meaning.removeprefix("Probability of "): float(m.value)
                              for m in group.get_measurements()},
            "source_sop_uids": [ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                                for ref in container.ContentSequence if ref.ValueType == "IMAGE"],
        })
    return out
