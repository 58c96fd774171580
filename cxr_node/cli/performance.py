"""``cxr-node performance``: how right the model is at this site, from readers' labels
(cxr_node.onboarding.performance)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import TextIO

from cxr_node.cli._db import open_database
from cxr_node.config import Settings
from cxr_node.errors import ConfigError


def iso_time(value: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO 8601 date or time (e.g. 2026-11-01)") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def station_name(settings: Settings, given: str) -> str:
    """A station by name, or by the AE title of exactly one configured station."""
    if any(s.name == given for s in settings.stations):
        return given
    by_aet = [s for s in settings.stations if s.ae_title == given.strip()]
    if len(by_aet) > 1:
        raise ConfigError(f"AE title {given!r} is {len(by_aet)} stations ({', '.join(s.name for s in by_aet)}): "
                          "give the station's name")
    return by_aet[0].name if by_aet else given.strip()


def register(sub, common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser("performance", parents=[common], help="sensitivity, specificity, AUC ... at this site, "
                       "from readers' labels", description="For the analysed films that have a reader's label "
                       "(cxr-node feedback): per class sensitivity, specificity, PPV and NPV with Wilson 95%% "
                       "intervals, AUC with a bootstrap interval, the confusion matrix, ECE, and the urgent "
                       "flag's precision and recall. Counts are always shown, and a note says when they are too "
                       "few to mean much. Computed from the database rows the audit trail mirrors (image.triaged, "
                       "feedback.added); --format json lists every film used.")
    p.add_argument("--station", metavar="NAME_OR_AE", help="only films from this station")
    p.add_argument("--since", type=iso_time, metavar="ISO", help="only films analysed at or after this time")
    p.add_argument("--until", type=iso_time, metavar="ISO", help="only films analysed before this time")
    p.add_argument("--model", metavar="VERSION", help="only films analysed by this model version")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--out", metavar="DIR", help="also write performance.json, roc.png, reliability.png, "
                   "confusion.png there")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples for the AUC "
                   "intervals (default 1000)")
    p.set_defaults(run=run)


def run(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    from cxr_node.onboarding import performance

    station = station_name(settings, args.station) if args.station else None
    with open_database(settings) as db, db.session() as s:
        films = performance.labelled_films(s, station=station, since=args.since, until=args.until,
                                           model_version=args.model)
        labels = _labels(settings, films)
    critical = _critical(settings)
    report = performance.compute(films, labels, critical, n_boot=args.bootstrap)
    report["filters"] = {"station": station, "since": args.since.isoformat() if args.since else None,
                         "until": args.until.isoformat() if args.until else None, "model": args.model}
    if args.out:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "performance.json").write_text(json.dumps(report, indent=1) + "\n")
        if films:
            performance.write_plots(report, d)
    if args.format == "json":
        json.dump(report, out, indent=1)
        out.write("\n")
    else:
        where = ", ".join(f"{k} {v}" for k, v in report["filters"].items() if v) or "all stations"
        performance.write_table(report, out, header=f"performance ({where})")
        if args.out:
            out.write(f"written to {args.out}: performance.json" + (", roc.png, reliability.png, confusion.png"
                                                                   if films else "") + "\n")
    return 0


def _labels(settings: Settings, films) -> list[str]:  # noqa: ANN001
    if films:
        return list(films[0].probabilities)
    from cxr_node.onboarding.site_calibration import ModelInfo

    return list(ModelInfo.from_checkpoint(settings.model.checkpoint).labels)


def _critical(settings: Settings) -> list[str]:
    from cxr_node.onboarding.site_calibration import ModelInfo

    return list(ModelInfo.from_checkpoint(settings.model.checkpoint).critical)
