"""``cxr-node feedback import|add|list``: what the radiologist said, for local performance and site
calibration (cxr_node.onboarding.feedback)."""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from cxr_node.cli._db import open_database
from cxr_node.config import Settings
from cxr_node.errors import ConfigError


def register(sub, common: argparse.ArgumentParser) -> None:
    fb = sub.add_parser("feedback", parents=[common], help="import or add readers' labels for analysed studies",
                        description="Readers' labels for studies (or single films): one of the model's labels, "
                        "Normal, Abnormal (something is wrong, no class named) or Other (none of the model's "
                        "classes); on the abnormal axis every label but Normal counts as abnormal. Each is stored with who and when, audited (feedback.added), and "
                        "superseded by a later label for the same study (history kept). `cxr-node performance` "
                        "and `cxr-node calibrate-site` use them.")
    fbs = fb.add_subparsers(dest="feedback_command", metavar="ACTION", required=True)
    fi = fbs.add_parser("import", parents=[common], help="import a CSV file of labels (all rows or none)",
                        description="CSV columns: study_uid or accession_number, optional sop_instance_uid, "
                        "label, optional reader, optional time (ISO 8601; default now). Every row is checked "
                        "first: an unknown study or label, or two labels for one study, is reported with its "
                        "line and nothing is imported. Rows repeating a label already in force are listed as "
                        "duplicates and skipped.")
    fi.add_argument("file", metavar="FILE.csv")
    fi.add_argument("--dry-run", action="store_true", help="check and report, store nothing")
    fi.add_argument("--format", choices=["table", "json"], default="table")
    fa = fbs.add_parser("add", parents=[common], help="add one label")
    who = fa.add_mutually_exclusive_group(required=True)
    who.add_argument("--study", metavar="STUDY_UID")
    who.add_argument("--accession", metavar="ACCESSION_NUMBER")
    fa.add_argument("--label", required=True, help="one of the model's labels, Normal, Abnormal or Other")
    fa.add_argument("--reader", help="who said it (a name or ID; stored and audited)")
    fa.add_argument("--film", metavar="SOP_INSTANCE_UID", help="label one film of the study, not the study")
    fa.add_argument("--time", metavar="ISO", help="when the reader said it (default now)")
    fl = fbs.add_parser("list", parents=[common], help="labels in force, or one study's whole history")
    fl.add_argument("--study", metavar="STUDY_UID", help="this study's history, superseded labels included")
    fl.add_argument("--format", choices=["table", "json"], default="table")
    fb.set_defaults(run=run)


def _labels(settings: Settings, db) -> list[str] | None:
    """None: the labels the model gave each study (from the database). The checkpoint's only when
    nothing was analysed yet."""
    from cxr_node.onboarding import feedback

    with db.session() as s:
        if feedback.model_labels(s):
            return None
    from cxr_node.onboarding.site_calibration import ModelInfo

    return list(ModelInfo.from_checkpoint(settings.model.checkpoint).labels)


def run(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    from cxr_node.onboarding import feedback

    with open_database(settings) as db:
        if args.feedback_command == "import":
            rep = feedback.import_csv(db, args.file, labels=_labels(settings, db), dry_run=args.dry_run)
            if args.format == "json":
                json.dump(rep.as_dict(), out, indent=1)
                out.write("\n")
            else:
                for line in rep.problems:
                    out.write(f"problem    {line}\n")
                for line in rep.duplicates:
                    out.write(f"duplicate  {line}\n")
                if rep.problems:
                    out.write(f"{args.file}: {len(rep.problems)} problem(s) in {rep.rows} row(s): nothing imported; "
                              "fix the lines above and import the file again\n")
                elif args.dry_run:
                    out.write(f"{args.file}: {rep.rows} row(s) checked: {rep.stored} would be stored "
                              f"({rep.superseded} superseding an earlier label), {len(rep.duplicates)} duplicate(s); "
                              "nothing stored (--dry-run)\n")
                else:
                    out.write(f"{args.file}: {rep.stored} label(s) stored ({rep.superseded} superseding an earlier "
                              f"label), {len(rep.duplicates)} duplicate(s) skipped, {rep.rows} row(s)\n")
            return 1 if rep.problems else 0
        if args.feedback_command == "add":
            res = feedback.add_label(db, args.study, args.label, args.reader, args.film, accession_number=args.accession,
                                     labelled_at=args.time, source="cli", labels=_labels(settings, db))
            if res.feedback is None:
                d = res.duplicate_of
                out.write(f"study {d.study_uid}: already labelled {d.label!r} (feedback #{d.id}); nothing stored\n")
            else:
                f = res.feedback
                sup = (f"; supersedes {res.superseded.label!r} (#{res.superseded.id})" if res.superseded else "")
                out.write(f"study {f.study_uid}: labelled {f.label!r}{' by ' + f.reader if f.reader else ''} "
                          f"(feedback #{f.id}){sup}\n")
            return 0
        return _list(db, args, out)


def _list(db, args: argparse.Namespace, out: TextIO) -> int:
    from sqlalchemy import select

    from cxr_node.db.models import Feedback
    from cxr_node.onboarding import feedback

    with db.session() as s:
        if args.study:
            rows = feedback.history(s, args.study)
            if not rows:
                raise ConfigError(f"no feedback for study {args.study}")
        else:
            rows = list(s.scalars(select(Feedback).where(Feedback.superseded_at.is_(None)).order_by(Feedback.id)))
    recs = [{"id": r.id, "study_uid": r.study_uid, "sop_instance_uid": r.sop_instance_uid, "label": r.label,
             "reader": r.reader, "labelled_at": r.labelled_at.isoformat(timespec="seconds"),
             "recorded_at": r.recorded_at.isoformat(timespec="seconds"), "source": r.source,
             "superseded_by": r.superseded_by} for r in rows]
    if args.format == "json":
        json.dump(recs, out, indent=1)
        out.write("\n")
        return 0
    for r in recs:
        sup = f"  superseded by #{r['superseded_by']}" if r["superseded_by"] else ""
        out.write(f"#{r['id']:<5} {r['study_uid']}{' film ' + r['sop_instance_uid'] if r['sop_instance_uid'] else ''}  "
                  f"{r['label']}  {r['reader'] or '-'}  {r['labelled_at']}  ({r['source']}){sup}\n")
    out.write(f"({len(recs)} label{'s' if len(recs) != 1 else ''})\n")
    return 0
