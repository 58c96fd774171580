"""The multi-source builder (grouping, dedup, label conflicts), other label sets, balanced sampling,
--preprocess, the v3 augmentation and the leave-source-out harness, on generated data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_model import make_sources, make_tb_sources, make_tree

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--input-size", "32", "--batch-size", "8", "--threads", "1"]


def run_module(mod: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([PY, "-m", mod, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout, env=ENV)
    if p.returncode != 0:
        raise AssertionError(f"{mod} {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr[-4000:]}")
    return p


def build(srcs: dict[str, Path], out: Path, *extra: str) -> list[dict[str, str]]:
    from training.data.sources import main

    args = ["build", *[a for name, d in srcs.items() for a in ("--source", f"{name}={d}")], "--out", str(out), *extra]
    assert main(args) == 0
    return list(csv.DictReader(open(out, newline="")))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    srcs = make_sources(root / "data")
    rows = build(srcs, root / "merged.csv")
    return {"root": root, "srcs": srcs, "manifest": root / "merged.csv", "rows": rows}


def _by_id(rows):
    return {r["id"]: r for r in rows}


def test_builder_resolves_copies_and_label_conflicts(sources):
    r = _by_id(sources["rows"])
    # NIH Pneumonia vs covid19-radiography Normal: the NIH copy is kept, with the RSNA re-read label
    nih = r["nih:Pneumonia/00000001_000.png"]
    assert nih["label"] == "Normal" and nih["raw_label"] == "Pneumonia" and not nih["exclude"]
    assert "label conflict" in nih["note"] and "from covid19-radiography" in nih["note"]
    c19 = r["covid19-radiography:Normal/Normal-0.png"]
    assert c19["exclude"] == "duplicate" and c19["duplicate_of"] == "nih:Pneumonia/00000001_000.png"
    # Hannover COVID vs ieee8023 No Finding (same stem): the Hannover copy and label
    han = r["hannover:COVID/h002.png"]
    assert han["label"] == "COVID" and not han["exclude"] and "label conflict" in han["note"]
    assert r["ieee8023:No Finding/h002.png"]["duplicate_of"] == "hannover:COVID/h002.png"
    assert r["ieee8023:COVID/h001.png"]["duplicate_of"] == "hannover:COVID/h001.png"
    # copies in covid19-radiography of Hannover / ieee8023 / NIH films are dropped, the originals kept
    assert r["covid19-radiography:COVID/COVID-0.png"]["duplicate_of"] == "hannover:COVID/h000.png"
    assert r["covid19-radiography:COVID/COVID-2.png"]["duplicate_of"] == "ieee8023:COVID/i000.png"
    assert not r["covid19-radiography:COVID/COVID-3.png"]["exclude"]
    assert r["covid19-radiography:Normal/Normal-1.png"]["duplicate_of"] == "nih:No Finding/00000002_000.png"
    assert "note" in r["nih:No Finding/00000002_000.png"] and not r["nih:No Finding/00000002_000.png"]["note"]
    # the ieee8023 No Finding rule
    assert r["ieee8023:No Finding/x000.png"]["exclude"].startswith("ieee8023 No Finding")
    # label mapping of the known kinds
    kept = [x for x in sources["rows"] if not x["exclude"]]
    assert {x["label"] for x in kept} == {"COVID", "Normal", "Other pneumonia", "Viral Pneumonia"}
    assert {x["label"] for x in kept if x["source"] == "nih"} == {"Normal", "Other pneumonia"}
    assert r["ieee8023:COVID/i001.png"]["site"] == "ieee8023/Italy"
    assert r["ieee8023:COVID/h001.png"]["site"] == "Hannover Medical School"
    summary = json.loads(sources["manifest"].with_suffix(".json").read_text())
    assert summary["label_conflicts"] == 2 and summary["kept"] == len(kept)


def test_builder_groups_never_straddle_splits(sources):
    r = _by_id(sources["rows"])
    g = lambda i: r[i]["group"]  # noqa: E731
    # a film and its cross-folder copy; a patient's films; a copy joins the patient's group
    assert g("hannover:COVID/h001.png") == g("ieee8023:COVID/h001.png")
    assert g("hannover:COVID/h000.png") == g("hannover:COVID/h001.png") == g("hannover:COVID/h002.png")  # patient hp0
    assert g("nih:Pneumonia/00000001_000.png") == g("nih:Pneumonia/00000001_001.png") \
        == g("covid19-radiography:Normal/Normal-0.png")
    assert g("covid19-radiography:COVID/COVID-2.png") == g("covid19-radiography:COVID/COVID-3.png")  # near-dup
    # patient ids are per source: ieee8023 patient "1" is not nih patient 00000001 nor hannover's
    assert g("ieee8023:COVID/i001.png") != g("nih:Pneumonia/00000001_000.png")
    splits: dict[str, set] = {}
    for x in sources["rows"]:
        if not x["exclude"]:
            splits.setdefault(x["group"], set()).add(x["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert {x["split"] for x in sources["rows"] if not x["exclude"]} == {"train", "val", "test"}
    # the trainer's reader: excluded rows skipped, the manifest's split used
    from training.data.records import manifest_split, read_dataset

    recs = read_dataset(sources["manifest"])
    assert len(recs) == sum(1 for x in sources["rows"] if not x["exclude"])
    assert all(Path(x.path).is_file() for x in recs) and {x.source for x in recs} == set(sources["srcs"])
    assert manifest_split(recs) == {x.relpath: x.split for x in recs}


def test_builder_options_and_plain_trees(sources, tmp_path):
    srcs = sources["srcs"]
    rows = build(srcs, tmp_path / "keep.csv", "--ieee8023-no-finding", "normal", "--relabel", "Normal=non-COVID",
                 "--relabel", "Other pneumonia=non-COVID", "--relabel", "Viral Pneumonia=non-COVID")
    r = _by_id(rows)
    x000 = r["ieee8023:No Finding/x000.png"]
    assert not x000["exclude"] and x000["label"] == "non-COVID"
    assert {x["label"] for x in rows if not x["exclude"]} == {"COVID", "non-COVID"}
    # a plain folder-per-class tree is a generic source: its labels stay as written (no NIH mapping)
    tree = make_tree(tmp_path / "tb", per_class=4, labels=["Normal", "Pneumonia", "Tuberculosis"])
    rows = build({"tb": tree}, tmp_path / "out" / "tb.csv", "--relative", "--drop-label", "Normal")
    kept = [x for x in rows if not x["exclude"]]
    assert {x["label"] for x in kept} == {"Pneumonia", "Tuberculosis"} and len(kept) == 8
    assert all(not Path(x["path"]).is_absolute() for x in rows)
    from training.data.records import read_dataset

    assert all(Path(x.path).is_file() for x in read_dataset(tmp_path / "out" / "tb.csv"))
    from training.data.sources import main

    with pytest.raises(SystemExit, match="NAME=DIR"):
        main(["build", "--source", str(tree), "--out", str(tmp_path / "x.csv")])


FIVE = ["COVID", "Normal", "Viral Pneumonia", "Other pneumonia", "Tuberculosis"]


@pytest.mark.parametrize("labels,critical,augment", [
    (["COVID", "non-COVID"], "COVID", "v3"),
    (["Normal", "Pneumonia", "Tuberculosis"], "Tuberculosis", "v3"),
    (FIVE, "COVID,Tuberculosis", "v4"),  # the v4 recipe's five labels, two critical classes
])
def test_other_label_sets_train_from_a_tree(tmp_path, labels, critical, augment):
    """Any label set trains from a folder-per-class tree, with --preprocess, --balance and --augment
    v3/v4; calibration gives every critical class its own operating point, and triage flags a film
    urgent by either."""
    from cxr_node.model.checkpoint import read_checkpoint
    from cxr_node.model.policy import TriagePolicy
    from training.train.cli import build_parser
    from training.train.loop import train

    tree = make_tree(tmp_path / "d", per_class=8, labels=labels)
    args = build_parser().parse_args(["--data", str(tree), "--out", str(tmp_path / "run"), "--epochs", "1",
                                        "--critical", critical, "--max-batches", "2", "--augment", augment,
                                        "--balance", "class", "--preprocess", "clahe_clip_limit=0.02", *TINY])
    train(args)
    crits = critical.split(",")
    meta = read_checkpoint(tmp_path / "run" / "best.pt")["meta"]
    assert meta["labels"] == sorted(labels) and meta["critical_labels"] == crits
    assert meta["preprocess"]["clahe_clip_limit"] == 0.02 and meta["augment"] == augment
    assert meta["balance"] == "class"
    run_module("training.train.calibrate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", str(tree),
               "--threads", "1")
    meta = read_checkpoint(tmp_path / "run" / "best.pt")["meta"]
    assert meta["critical_labels"] == crits and set(crits) <= set(meta["thresholds"])
    policy = TriagePolicy.from_meta(meta)
    for c in crits:  # a film over one critical threshold only is urgent, naming that class
        d = policy.decide([1.0 if n == c else 0.0 for n in meta["labels"]])
        assert d.urgent and d.reasons[0].startswith(c)


def test_critical_classes_rule():
    from training.train.sampling import critical_classes

    assert critical_classes(["COVID,Tuberculosis"], FIVE) == ["COVID", "Tuberculosis"]
    assert critical_classes(["COVID", "Tuberculosis"], ["COVID", "Normal"]) == ["COVID"]  # a fold without TB
    assert critical_classes(None, ["Normal", "Tuberculosis"]) == ["Normal"]
    with pytest.raises(SystemExit, match="none is a label"):
        critical_classes(["Tuberculosis"], ["COVID", "Normal"])


def test_v4_augment_downscales_every_class_half_the_time():
    """v4 = v3 with the down-scale-and-up-scale at probability 0.5 over 0.3-0.9, for every film."""
    import torch

    from training.train.augment import RandResolutionDrop, make_v3_augment, make_v4_augment

    drops = [t for t in make_v4_augment(32).transforms if isinstance(t, RandResolutionDrop)]
    assert len(drops) == 1 and drops[0].prob == 0.5 and drops[0].scale_range == (0.3, 0.9)
    v3 = [t for t in make_v3_augment(32).transforms if isinstance(t, RandResolutionDrop)]
    assert v3[0].prob == 0.25
    x = torch.rand(1, 32, 32)
    drops[0].set_random_state(seed=0)
    hits = 0
    for _ in range(200):
        y = drops[0](x)
        hits += int(not torch.equal(y, x))
    assert 70 <= hits <= 130


def test_preprocess_option_validates():
    from training.common import parse_preprocess

    p = parse_preprocess(["clahe_clip_limit=0.03", "percentiles=[1, 99]", "normalize=none"], 64)
    assert p["clahe_clip_limit"] == 0.03 and p["percentiles"] == [1, 99] and p["normalize"] == "none"
    assert p["input_size"] == 64
    with pytest.raises(SystemExit, match="no_such_key"):
        parse_preprocess(["no_such_key=1"], 64)
    with pytest.raises(SystemExit, match="normalize"):
        parse_preprocess(["normalize=minmax"], 64)
    with pytest.raises(SystemExit, match="--input-size"):
        parse_preprocess(["input_size=32"], 64)


def test_balanced_sampling_weights_and_sampler():
    from training.train.sampling import BalancedSampler, sample_weights

    labels = ["COVID"] * 60 + ["COVID"] * 10 + ["Normal"] * 30
    sources = ["a"] * 60 + ["b"] * 10 + ["a"] * 30
    w = sample_weights(labels, sources, "source,class")
    mass = lambda s, c: sum(wi for wi, si, ci in zip(w, sources, labels) if si == s and ci == c)  # noqa: E731
    assert abs(mass("a", "COVID") - 0.25) < 1e-9 and abs(mass("b", "COVID") - 0.25) < 1e-9
    assert abs(mass("a", "Normal") - 0.5) < 1e-9
    wc = sample_weights(labels, sources, "class")
    assert abs(sum(wc[:70]) - 0.5) < 1e-9
    with pytest.raises(SystemExit, match="source column"):
        sample_weights(labels, [""] * 100, "source,class")
    s = BalancedSampler(w, 4000, seed=1)
    s.set_epoch(1)
    draw = list(s)
    assert draw == list(s) and len(draw) == len(s) == 4000
    share_b = np.mean([i >= 60 and i < 70 for i in draw])
    assert 0.22 < share_b < 0.28  # 10 of 100 films drawn a quarter of the time
    s.set_epoch(2)
    assert list(s) != draw
    r0, r1 = BalancedSampler(w, 11, 1, 0, 2), BalancedSampler(w, 11, 1, 1, 2)
    assert len(r0) == 6 and len(r1) == 5 and sorted(list(r0) + list(r1)) == sorted(BalancedSampler(w, 11, 1))


def test_v3_augment_is_seedable_and_changes_the_image():
    import torch
    from helpers_model import synthetic_film

    from training.train import augment as A

    x = torch.from_numpy(synthetic_film(0, np.random.default_rng(0), 64) / 255.0).float()[None]
    aug = A.make_v3_augment(64)
    outs = []
    for seed in (1, 1, 2):
        aug.set_random_state(seed=seed)
        outs.append(aug(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert outs[0].shape == x.shape and 0 <= float(outs[0].min()) and float(outs[0].max()) <= 1
    diffs = []
    for seed in range(20):
        aug.set_random_state(seed=seed)
        diffs.append(float((aug(x) - x).abs().mean()))
    assert np.mean(diffs) > 0.02
    for cls in (A.RandGamma, A.RandContrast, A.RandBlurSharpen, A.RandGaussianNoiseX, A.RandJPEG,
                A.RandResolutionDrop, A.RandBorderOcclusion, A.RandMarker):
        t = cls(prob=1.0)
        t.set_random_state(seed=3)
        y = t(x)
        t.set_random_state(seed=3)
        assert torch.equal(y, t(x)), cls.__name__
        assert float((y - x).abs().max()) > 0.01, cls.__name__
    d = A.RandMarkerd(["a", "b"], prob=1.0)
    d.set_random_state(seed=5)
    out = d({"a": x, "b": x.clone()})
    assert torch.equal(out["a"], out["b"]) and not torch.equal(out["a"], x)


def test_wilson_and_threshold_rules():
    from training.evaluate.metrics import threshold_for_sensitivity_rule, wilson_interval

    lo, hi = wilson_interval(8, 8)
    assert abs(lo - 0.6756) < 1e-3 and hi == 1.0
    lo, hi = wilson_interval(50, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(200, bool), np.zeros(200, bool)]
    s = np.r_[rng.normal(1, 1, 200), rng.normal(-1, 1, 200)]
    t_point = threshold_for_sensitivity_rule(y, s, 0.8, "point")
    t_margin = threshold_for_sensitivity_rule(y, s, 0.8, "margin", 0.05)
    t_wilson = threshold_for_sensitivity_rule(y, s, 0.8, "wilson")
    assert (s[y] >= t_point).mean() >= 0.8 and (s[y] >= t_margin).mean() >= 0.85
    k = int((s[y] >= t_wilson).sum())
    assert wilson_interval(k, 200)[0] >= 0.8 and t_wilson < t_point


def test_lso_fold_leaves_out_groups_and_sites_of_the_holdout(sources):
    from training.evaluate.lso.folds import held_out, read_rows, training_rows

    rows = read_rows(sources["manifest"])
    test = held_out("ieee8023", rows)
    assert {r["site"] for r in test} == {"ieee8023/Italy", "ieee8023/Spain", "ieee8023/Canada"}
    train = training_rows(rows, test, [], None, None, 0)
    ids = {r["id"] for r in train}
    # COVID-3 is a near-duplicate of COVID-2, a copy of the held-out ieee8023 film i000
    assert r_split(rows, "covid19-radiography:COVID/COVID-3.png") != "test"  # else the check below is void
    assert "covid19-radiography:COVID/COVID-3.png" not in ids
    assert {r["id"] for r in rows if r["source"] == "covid19-radiography" and not r["exclude"]
            and r["split"] != "test" and r["group"] != r_group(rows, "covid19-radiography:COVID/COVID-3.png")} <= ids
    assert not {r["group"] for r in train} & {r["group"] for r in test}
    han = held_out("hannover", rows)
    assert "ieee8023:COVID/h900.png" in {r["id"] for r in han}  # a Hannover film from another folder
    assert not any(r["source"] == "hannover" for r in training_rows(rows, han, [], None, None, 0))
    assert {r["source"] for r in training_rows(rows, han, ["nih"], ["Normal"], None, 0)} == {"nih"}


def r_split(rows, rid):
    return next(r["split"] for r in rows if r["id"] == rid)


def r_group(rows, rid):
    return next(r["group"] for r in rows if r["id"] == rid)


def test_lso_harness_end_to_end(sources, tmp_path):
    """Train without each held-out source (1 tiny epoch), calibrate on the fold's val, predict the
    hold-out, report; then a fixed checkpoint on a hold-out; then a threshold from the LSO predictions."""
    man = sources["manifest"]
    out = tmp_path / "lso"
    run_module("training.evaluate.lso", "run", "--manifest", str(man), "--out", str(out), "--holdout", "hannover",
               "--holdout", "nih", "--max-per-source-class", "4", "--n-boot", "20",
               *[f"--train-arg={a}" for a in ["--epochs=1", "--input-size=32", "--batch-size=8", "--threads=1",
                                             "--augment=v3", "--balance=source,class"]])
    rep = json.loads((out / "report.json").read_text())
    kept = [x for x in sources["rows"] if not x["exclude"]]
    # by default only the hold-outs' train and val films are predicted: their test split stays closed
    tv = [x for x in kept if x["split"] in ("train", "val")]
    n_han = sum(1 for x in tv if x["site"] == "Hannover Medical School")  # ieee8023's h900 too
    n_nih = sum(1 for x in tv if x["source"] == "nih")
    assert 0 < n_nih < sum(1 for x in kept if x["source"] == "nih")
    assert rep["per_holdout"]["hannover"]["covid_flagged_urgent"]["n"] == n_han
    assert rep["per_holdout"]["nih"]["n"] == n_nih
    assert set(rep["per_holdout"]["nih"]["non_covid"]) == {"Normal", "Other pneumonia"}
    assert rep["per_holdout"]["nih"]["urgent_on_normals"]["n"] == sum(1 for x in tv if x["source"] == "nih"
                                                                      and x["label"] == "Normal")
    pooled = rep["pooled"]
    assert pooled["n"] == n_han + n_nih and 0 <= pooled["ece_covid_binary"] <= 1
    assert len(pooled["covid_auc"]["ci95"]) == 2 and set(rep["goals"]) == {
        "pooled_covid_auc >= 0.80", "within_source_covid_auc >= 0.80 (every hold-out with both classes)",
        "urgent_on_normals <= 0.20 with covid_flagged >= 0.70", "ece_covid_binary <= 0.05"}
    assert "| hannover |" in (out / "report.md").read_text()
    # no film of the fold's training data shares a group (patient, copy) or site with the hold-out
    for h in ("hannover", "nih"):
        # all splits (none of them may be trained on); a source's hold-out is its sites, from any folder
        test = [x for x in kept if x["source"] == h
                or (h == "hannover" and x["site"] == "Hannover Medical School")]
        train = list(csv.DictReader(open(out / h / "train-manifest.csv")))
        assert train and not {x["group"] for x in train} & {x["group"] for x in test}
        assert not {x["site"] for x in train} & {x["site"] for x in test}
        assert {x["split"] for x in train} <= {"train", "val"}
        assert rep["folds"][h]["n_test"] == sum(1 for x in test if x["split"] != "test")
    # the Hannover copy in ieee8023 ("Hannover Medical School") is out of the hannover fold's training
    hannover_train = {Path(x["path"]).name for x in csv.DictReader(open(out / "hannover" / "train-manifest.csv"))}
    assert not {"h001.png", "h900.png"} & hannover_train

    # a fixed checkpoint, trained on "covid19-radiography": the ieee8023 film that is also there is left out
    ck = out / "hannover" / "run" / "best.pt"
    ev = tmp_path / "ev"
    run_module("training.evaluate.lso", "evaluate", "--checkpoint", str(ck), "--manifest", str(man), "--out", str(ev),
               "--holdout", "ieee8023", "--seen-source", "covid19-radiography", "--n-boot", "20", "--threads", "1",
               "--holdout-splits", "train,val,test")
    rep2 = json.loads((ev / "report.json").read_text())
    n_ieee = sum(1 for x in kept if x["source"] == "ieee8023" and x["site"] != "Hannover Medical School")
    assert rep2["left_out_as_seen"] == {"ieee8023": 1} and rep2["pooled"]["n"] == n_ieee - 1
    ids = {x["id"] for x in csv.DictReader(open(ev / "ieee8023-predictions.csv"))}
    assert "ieee8023:COVID/i000.png" not in ids and "ieee8023:COVID/i001.png" in ids
    assert "ieee8023:COVID/h900.png" not in ids  # a Hannover film: part of the hannover hold-out

    # the critical threshold chosen on the pooled LSO predictions, with the Wilson rule
    cal = tmp_path / "cal.pt"
    run_module("training.train.calibrate", "--checkpoint", str(ck), "--data", str(out / "hannover" / "train-manifest.csv"),
               "--out", str(cal), "--lso-predictions", str(out / "predictions.csv"), "--sensitivity-rule", "wilson",
               "--target-sensitivity", "0.5", "--threads", "1")
    from cxr_node.model.checkpoint import read_checkpoint

    c = read_checkpoint(cal)["meta"]["calibration"]
    assert c["sensitivity_rule"] == "wilson" and "pooled LSO predictions" in c["operating_points"]["COVID"]["rule"]
    preds = list(csv.DictReader(open(out / "predictions.csv")))
    y = np.array([x["label"] == "COVID" for x in preds])
    s = np.array([float(x["p_COVID"]) for x in preds])
    from training.evaluate.metrics import wilson_interval

    th = c["operating_points"]["COVID"]["threshold"]
    k = int((s[y] >= th).sum())
    assert wilson_interval(k, int(y.sum()))[0] >= 0.5 or k == y.sum()


def _fake_predictions(path: Path, seed: int = 0, shift: dict[str, float] | None = None) -> Path:
    """Predictions of three hold-outs as training.evaluate.lso writes them: hannover (COVID only), nih
    (Normal only), ieee8023 (both). ``shift`` moves one hold-out's COVID scores."""
    rng = np.random.default_rng(seed)
    labels = ["COVID", "Normal", "Viral Pneumonia"]
    rows = []
    for h, labs in (("hannover", ["COVID"] * 40), ("nih", ["Normal"] * 50), ("ieee8023", ["COVID"] * 30 + ["Normal"] * 10)):
        for i, lab in enumerate(labs):
            z = rng.normal(0, 1, 3)
            z[0] += (1.5 if lab == "COVID" else 0.0) + (shift or {}).get(h, 0.0)
            p = np.exp(z) / np.exp(z).sum()
            rows.append({"holdout": h, "id": f"{h}:{i}", "label": lab, "raw_label": lab, "source": h, "site": h,
                         "group": f"{h}-{i}", "split": "train", "top": labels[int(p.argmax())], "urgent": "0",
                         "threshold_COVID": "0.5", **{f"p_{n}": f"{v:.6f}" for n, v in zip(labels, p)}})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_crossfit_operating_points_never_see_their_own_holdout(tmp_path):
    """`lso crossfit`: each hold-out's threshold and temperature come from the other hold-outs only
    (moving a hold-out's own scores leaves them unchanged), reach the Wilson rule on those films,
    and decide that hold-out's urgent flags; report.md names them."""
    from cxr_node.model.calibration import wilson_interval
    from training.evaluate.lso.folds import read_predictions
    from training.evaluate.lso.report import crossfit

    base = read_predictions([_fake_predictions(tmp_path / "a.csv")])
    moved = read_predictions([_fake_predictions(tmp_path / "b.csv", shift={"ieee8023": 3.0})])
    rows_a, info_a = crossfit(base, 0.70, "wilson")
    rows_b, info_b = crossfit(moved, 0.70, "wilson")
    assert info_a["per_holdout"]["ieee8023"] == info_b["per_holdout"]["ieee8023"]  # its own films never count
    assert info_a["per_holdout"]["hannover"] != info_b["per_holdout"]["hannover"]  # ieee8023's do for the others
    assert info_a["per_holdout"]["nih"]["fitted_on_holdouts"] == ["hannover", "ieee8023"]
    assert info_a["per_holdout"]["nih"]["fitted_on_critical"] == 70
    # hannover's threshold: ieee8023's 30 COVID films, after the fitted temperature, reach the rule
    from cxr_node.model.calibration import logits_from, softmax

    f = info_a["per_holdout"]["hannover"]
    others = [r for r in base if r["holdout"] != "hannover" and r["label"] == "COVID"]
    P = np.array([[float(r[f"p_{n}"]) for n in ("COVID", "Normal", "Viral Pneumonia")] for r in others])
    pc = softmax(logits_from(P, 1.0), f["temperature"])[:, 0]
    k = int((pc >= f["threshold"] - 1e-9).sum())
    assert wilson_interval(k, len(pc))[0] >= 0.70 and wilson_interval(k - 1, len(pc))[0] < 0.70
    for r in rows_a:  # every re-scored row is flagged by its hold-out's threshold
        th = info_a["per_holdout"][r["holdout"]]["threshold"]
        assert r["urgent"] == str(int(float(r["p_COVID"]) >= th)) and r["threshold_COVID"] == f"{th:.6f}"
    assert len(rows_a) == len(base) and info_a["all"]["fitted_on_films"] == len(base)
    # the CLI: report plus the operating-point table; no COVID outside a hold-out is refused
    run_module("training.evaluate.lso", "crossfit", "--predictions", str(tmp_path / "a.csv"), "--out", str(tmp_path / "cf"),
               "--n-boot", "50")
    md = (tmp_path / "cf" / "report.md").read_text()
    assert "Operating points cross-fitted" in md and "| nih | hannover, ieee8023 | 80 (70) |" in md
    from training.evaluate.lso.cli import main as lso_main

    with pytest.raises(SystemExit, match="no predictions in splits val"):  # --splits filters (all are train)
        lso_main(["crossfit", "--predictions", str(tmp_path / "a.csv"), "--out", str(tmp_path / "cf2"),
                  "--splits", "val"])
    # prediction files from before the split column existed count as train, in report as in crossfit
    old_rows = [{k: v for k, v in r.items() if k != "split"} for r in base]
    with open(tmp_path / "old.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(old_rows[0]))
        w.writeheader()
        w.writerows(old_rows)
    assert lso_main(["report", "--predictions", str(tmp_path / "old.csv"), "--out", str(tmp_path / "old"),
                     "--n-boot", "20", "--splits", "train,val"]) == 0
    assert json.loads((tmp_path / "old" / "report.json").read_text())["pooled"]["n"] == len(base)
    only = [r for r in base if r["holdout"] != "ieee8023"]
    with pytest.raises(SystemExit, match="no COVID films outside the hold-out"):
        crossfit(only, 0.70, "wilson")


def test_shenzhen_and_openist_rules(tmp_path):
    """The two issue-20 folders: one site each (openist's "unknown" becomes a named collection, so it
    never merges with another unknown site), Shenzhen's patient id from the stem where the manifest
    has none (one film per case), five labels with the older folders, and each is a hold-out."""
    srcs = {**make_sources(tmp_path / "data"), **make_tb_sources(tmp_path / "data")}
    rows = build(srcs, tmp_path / "m.csv")
    kept = [r for r in rows if not r["exclude"]]
    assert {r["label"] for r in kept} == set(FIVE)
    sz = [r for r in kept if r["source"] == "shenzhen"]
    op = [r for r in kept if r["source"] == "openist"]
    assert {r["site"] for r in sz} == {"Shenzhen No.3 People's Hospital"}
    assert {r["label"] for r in sz} == {"Normal", "Tuberculosis"} and {r["label"] for r in op} == {"Normal"}
    assert all(r["patient_id"] == Path(r["path"]).stem for r in sz)
    assert len({r["group"] for r in sz}) == len(sz) and len({r["group"] for r in op}) == len(op)
    assert len({r["site"] for r in op}) == 1 and "OpenIST" in op[0]["site"]
    from training.evaluate.lso.folds import held_out, read_rows

    man = read_rows(tmp_path / "m.csv")
    assert {r["id"] for r in held_out("shenzhen", man)} == {r["id"] for r in sz}
    assert {r["id"] for r in held_out("openist", man)} == {r["id"] for r in op}


def test_lso_five_labels_two_critical_classes(tmp_path):
    """training.evaluate.lso run with the v4 recipe's critical classes: the shenzhen fold trains without any
    TB film (four labels; its TB films are reported as flagged or not through COVID), the openist fold
    has TB with its own threshold; both folds' predictions share one header; the report gives the TB
    figures, and crossfit takes TB's threshold from the given cross-validation predictions."""
    srcs = {**make_sources(tmp_path / "data"), **make_tb_sources(tmp_path / "data")}
    build(srcs, tmp_path / "m.csv")
    out = tmp_path / "lso"
    run_module("training.evaluate.lso", "run", "--manifest", str(tmp_path / "m.csv"), "--out", str(out),
               "--holdout", "shenzhen", "--holdout", "openist", "--max-per-source-class", "4", "--n-boot", "20",
               "--holdout-splits", "train,val,test",
               *[f"--train-arg={a}" for a in ["--epochs=1", "--input-size=32", "--batch-size=8", "--threads=1",
                                             "--augment=v4", "--balance=source,class",
                                             "--critical=COVID,Tuberculosis"]])
    sz = list(csv.DictReader(open(out / "shenzhen" / "predictions.csv")))
    op = list(csv.DictReader(open(out / "openist" / "predictions.csv")))
    assert list(sz[0]) == list(op[0]) and {"threshold_COVID", "threshold_Tuberculosis", "p_Tuberculosis"} <= set(sz[0])
    assert all(r["threshold_Tuberculosis"] == "" and r["p_Tuberculosis"] == "0.000000" for r in sz)
    assert all(float(r["threshold_Tuberculosis"]) > 0 for r in op)
    for r in op:  # urgent = either critical class at its own threshold
        assert r["urgent"] == str(int(float(r["p_COVID"]) >= float(r["threshold_COVID"])
                                      or float(r["p_Tuberculosis"]) >= float(r["threshold_Tuberculosis"])))
    from cxr_node.model.checkpoint import read_checkpoint

    assert read_checkpoint(out / "shenzhen" / "run" / "best.pt")["meta"]["critical_labels"] == ["COVID"]
    assert read_checkpoint(out / "openist" / "run" / "best.pt")["meta"]["critical_labels"] == ["COVID", "Tuberculosis"]
    rep = json.loads((out / "report.json").read_text())
    tb = rep["per_holdout"]["shenzhen"]["other_critical"]["Tuberculosis"]
    assert tb["flagged_urgent"]["n"] == sum(r["label"] == "Tuberculosis" for r in sz)
    assert tb["films_whose_model_lacks_the_class"] == tb["flagged_urgent"]["n"] and "auc" not in tb
    assert "Tuberculosis" in rep["per_holdout"]["shenzhen"]["non_covid"]
    assert rep["per_holdout"]["openist"]["urgent_on_normals"]["n"] == len(op)
    assert "| shenzhen | Tuberculosis |" in (out / "report.md").read_text()
    # crossfit: TB films lie in one hold-out only, so TB's threshold comes from --fit-critical rows
    from training.evaluate.lso.folds import read_predictions
    from training.evaluate.lso.report import crossfit

    cv = [dict(r, holdout="shenzhen-cv") for r in op] + [
        dict(r, holdout="shenzhen-cv", label="Tuberculosis", p_Tuberculosis="0.9") for r in op]
    preds = read_predictions([out / "predictions.csv"])
    preds += [dict(r, holdout=h, label="COVID", p_COVID="0.8") for r in op for h in ("hannover", "ieee8023")]
    rows, info = crossfit(preds, 0.7, "point", extra_fit={"Tuberculosis": cv})
    assert "grouped cross-validation" in info["per_holdout"]["openist"]["how"]["Tuberculosis"]
    th = info["per_holdout"]["openist"]["thresholds"]["Tuberculosis"]
    assert all(r["threshold_Tuberculosis"] == f"{th:.6f}" for r in rows if r["holdout"] == "openist")
    assert all(r["threshold_Tuberculosis"] == "" for r in rows if r["holdout"] == "shenzhen")


def test_frozen_feature_configuration_end_to_end(tmp_path):
    """training.evaluate.frozen: features of a checkpoint once per film (plus squashed 128 px copies), then
    each recipe as a head per leave-source-out fold, the checkpoint itself, and the grouped Shenzhen
    split; predictions in training.evaluate.lso's format, so its report and crossfit read them."""
    from helpers_model import make_checkpoint

    srcs = {**make_sources(tmp_path / "data", n=10), **make_tb_sources(tmp_path / "data", n=12)}
    build(srcs, tmp_path / "m.csv")
    ck = make_checkpoint(tmp_path / "ck.pt", input_size=32)
    feats = tmp_path / "f.npz"
    run_module("training.evaluate.frozen", "extract", "--manifest", str(tmp_path / "m.csv"), "--out", str(feats),
               "--checkpoint", str(ck), "--degrade", "openist", "--cache-dir", str(tmp_path / "cache"),
               "--splits", "train,val,test")
    z = np.load(feats)
    n_open = sum(1 for r in csv.DictReader(open(tmp_path / "m.csv")) if r["source"] == "openist")
    assert z["features"].shape[1] == 1024 and sum(str(i).endswith("#as-shenzhen") for i in z["ids"]) == n_open
    for recipe in ("v4", "v2-bundled"):
        out = tmp_path / recipe
        run_module("training.evaluate.frozen", "lso", "--manifest", str(tmp_path / "m.csv"), "--features", str(feats),
                   "--recipe", recipe, "--out", str(out), "--holdout", "shenzhen", "--holdout", "openist",
                   "--holdout-splits", "train,val,test", "--n-boot", "20")
        rep = json.loads((out / "report.json").read_text())
        assert set(rep["per_holdout"]) == {"shenzhen", "openist"}
        assert rep["per_holdout"]["openist"]["urgent_on_normals"]["n"] == n_open
        deg = rep["folds"]["openist"]["degraded"]
        assert deg["films"] == n_open and "urgent_as_shenzhen" in deg
    folds = json.loads((tmp_path / "v4" / "folds.json").read_text())
    assert "Tuberculosis" not in folds["shenzhen"]["labels"] and "Tuberculosis" in folds["openist"]["critical"]
    assert "mean_p_tb_as_shenzhen" in folds["openist"]["degraded"]
    cv = tmp_path / "cv"
    run_module("training.evaluate.frozen", "shenzhen-cv", "--manifest", str(tmp_path / "m.csv"), "--features", str(feats),
               "--out", str(cv), "--folds", "2", "--n-boot", "20")
    rep = json.loads((cv / "report.json").read_text())
    tb = rep["per_holdout"]["shenzhen-cv"]["other_critical"]["Tuberculosis"]
    assert tb["auc"]["n_pos"] == sum(1 for r in csv.DictReader(open(tmp_path / "m.csv"))
                                     if r["source"] == "shenzhen" and r["label"] == "Tuberculosis"
                                     and r["split"] in ("train", "val"))
    # the site-adaptation goal figure reads the same features (ieee8023 COVID vs other pneumonias)
    so = tmp_path / "so"
    run_module("training.onboarding.calibration", "--adaptation", str(feats), "--manifest", str(tmp_path / "m.csv"),
               "--checkpoint", str(ck), "--out", str(so), "--repeats", "2", "--max-labelled", "8", "--n-boot", "20")
    rep = json.loads((so / "report.json").read_text())
    assert "ieee8023 (all countries)" in rep["sites"] and (so / "report.md").read_text().startswith("Site head")
