"""Training, resume, DDP (gloo, 2 processes), calibration and evaluation on a tiny generated dataset."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_model import LABELS, make_manifest, make_tree

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
TRAIN_ARGS = ["--input-size", "64", "--batch-size", "8", "--threads", "2", "--lr", "3e-3"]


def run_module(mod: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    p = subprocess.run([PY, "-m", mod, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    if p.returncode != 0:
        raise AssertionError(f"{mod} {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One epoch on a generated manifest dataset; shared by the tests below."""
    root = tmp_path_factory.mktemp("tiny")
    manifest = make_manifest(root / "data", per_class=12)
    run = root / "run"
    p = run_module("training.train", "--data", str(manifest), "--out", str(run), "--epochs", "1", *TRAIN_ARGS)
    return {"root": root, "manifest": manifest, "run": run, "log": p.stderr}


def test_one_epoch_writes_checkpoints_split_and_curves(tiny):
    run = tiny["run"]
    for name in ("best.pt", "last.pt", "split.csv", "split.json", "history.json", "curves.png"):
        assert (run / name).is_file(), name
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1] and hist[0]["images_per_s"] > 0
    assert "class weights (inverse frequency)" in tiny["log"]
    assert "val_macro_auc" in tiny["log"]
    from cxr_node.model.checkpoint import read_checkpoint

    meta = read_checkpoint(run / "best.pt")["meta"]
    assert meta["labels"] == LABELS and meta["input_size"] == 64 and meta["preprocess"]["input_size"] == 64
    assert len(meta["data_manifest_sha256"]) == 64 and meta["metrics"]["epoch"] == 1


def test_split_is_stratified_grouped_and_saved(tiny):
    rows = list(csv.DictReader(open(tiny["run"] / "split.csv")))
    assert len(rows) == 36
    by_group: dict[str, set] = {}
    for r in rows:
        by_group.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_group.values())  # no group straddles splits
    # the patient groups (3 films each) and near-dup pairs really are groups
    assert max(sum(1 for r in rows if r["group"] == g) for g in by_group) >= 3
    counts = json.loads((tiny["run"] / "split.json").read_text())["counts"]
    for label in LABELS:
        assert counts["train"][label] >= counts["val"][label] >= 1
        assert counts["test"][label] >= 1
    assert json.loads((tiny["run"] / "split.json").read_text())["seed"] == 42


def test_grouped_split_unit():
    from training.data.records import Record, grouped_stratified_split

    recs = [Record(f"/x/{i}", "A" if i % 4 else "B", f"g{i // 5}", f"{i}") for i in range(200)]
    a1 = grouped_stratified_split(recs, seed=3)
    assert a1 == grouped_stratified_split(recs, seed=3)  # fixed seed, same split
    assert a1 != grouped_stratified_split(recs, seed=4)
    for g in {r.group for r in recs}:
        assert len({a1[r.relpath] for r in recs if r.group == g}) == 1
    n = {s: sum(1 for v in a1.values() if v == s) for s in ("train", "val", "test")}
    assert 120 <= n["train"] <= 160 and 20 <= n["val"] <= 40 and 20 <= n["test"] <= 40


def test_resume_continues_from_saved_epoch(tiny, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    p = run_module("training.train", "--data", str(tiny["manifest"]), "--out", str(run), "--epochs", "2",
                   "--resume", *TRAIN_ARGS)
    assert "resumed from" in p.stderr and "at epoch 1" in p.stderr
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[0] == json.loads((tiny["run"] / "history.json").read_text())[0]  # epoch 1 kept, not redone
    import torch

    st = torch.load(run / "last.pt", weights_only=True)["train_state"]
    assert st["epoch"] == 2 and st["optimizer"]["state"]  # optimizer moments were carried


def test_fine_tune_from_checkpoint_keeps_split_and_weights(tiny, tmp_path):
    """--init-from starts from the checkpoint's weights; --split-file keeps its split even under another
    seed (so its test films stay held out); --schedule cosine anneals the learning rate."""
    import torch

    src = tiny["run"]
    run = tmp_path / "ft"
    base = [a for a in TRAIN_ARGS if a not in ("--lr", "3e-3")]
    p = run_module("training.train", "--data", str(tiny["manifest"]), "--out", str(run), "--epochs", "2",
                   "--init-from", str(src / "last.pt"), "--split-file", str(src / "split.csv"), "--seed", "7",
                   "--schedule", "cosine", "--lr", "0", *base)
    assert "initialised from" in p.stderr
    split = lambda d: sorted((r["path"], r["split"]) for r in csv.DictReader(open(d / "split.csv")))  # noqa: E731
    assert split(run) == split(src)
    old = torch.load(src / "last.pt", weights_only=True)
    new = torch.load(run / "last.pt", weights_only=True)
    assert new["meta"]["init_from"]["sha256"] == old["sha256"] and new["meta"]["schedule"] == "cosine"
    # lr 0: AdamW moves nothing, so every convolution weight is the source's (batch-norm statistics may move)
    convs = [k for k, v in old["state_dict"].items() if k.endswith(".weight") and v.ndim == 4]
    assert convs and all(torch.equal(old["state_dict"][k], new["state_dict"][k]) for k in convs)

    # a checkpoint trained at another input size is refused with a message naming the mismatch
    bad = subprocess.run([PY, "-m", "training.train", "--data", str(tiny["manifest"]), "--out", str(tmp_path / "x"),
                          "--epochs", "1", "--init-from", str(src / "last.pt"), "--input-size", "32",
                          "--batch-size", "8", "--threads", "2"], capture_output=True, text=True, cwd=REPO,
                         timeout=240)
    assert bad.returncode != 0 and "--init-from" in bad.stderr and "input size" in bad.stderr


def test_calibrate_then_evaluate_then_triage(tiny, tmp_path):
    run = tiny["run"]
    cal = tmp_path / "cal.pt"
    run_module("training.train.calibrate", "--checkpoint", str(run / "best.pt"), "--data", str(tiny["manifest"]),
               "--out", str(cal), "--split-file", str(run / "split.csv"))
    from cxr_node.model.checkpoint import read_checkpoint

    meta = read_checkpoint(cal)["meta"]
    assert meta["calibrated"] is True and meta["calibration"]["split"] == "val"
    assert meta["temperature"] > 0 and set(meta["thresholds"]) <= set(LABELS) and "COVID" in meta["thresholds"]
    assert meta["calibration"]["operating_points"]["COVID"]["sensitivity"] >= 0.95
    out = tmp_path / "eval"
    run_module("training.evaluate", "--checkpoint", str(cal), "--data", str(tiny["manifest"]), "--out", str(out),
               "--split", "test", "--split-file", str(run / "split.csv"), "--n-boot", "50")
    m = json.loads((out / "metrics.json").read_text())
    n_test = sum(json.loads((run / "split.json").read_text())["counts"]["test"].values())
    assert m["n"] == n_test and m["split"] == "test"
    for key in ("accuracy", "macro_auc", "macro_auc_ci95", "macro_f1", "ece", "confusion_matrix"):
        assert key in m
    assert np.array(m["confusion_matrix"]).sum() == n_test
    for name in LABELS:
        pc = m["per_class"][name]
        for key in ("sensitivity", "specificity", "ppv", "npv", "auc", "f1", "auc_ci95"):
            assert key in pc
    for png in ("roc.png", "confusion.png", "reliability.png"):
        assert (out / png).stat().st_size > 1000
    # a plain folder-per-class tree with matching names evaluates too (split "all")
    tree = make_tree(tmp_path / "external", per_class=3, seed=5)
    run_module("training.evaluate", "--checkpoint", str(cal), "--data", str(tree), "--out", str(tmp_path / "ext"),
               "--n-boot", "20")
    assert json.loads((tmp_path / "ext" / "metrics.json").read_text())["n"] == 9
    # and the offline triage CLI reads the trained checkpoint
    film = next((tiny["manifest"].parent / "COVID").glob("*.png"))
    p = subprocess.run([PY, "-m", "cxr_node", "triage", str(film), "--checkpoint", str(cal), "--format", "json",
                        "--any-film"],  # tiny generated films have no lungs: this checks the checkpoint is read
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)["results"][0]
    assert set(res["probabilities"]) == set(LABELS) and res["model_version"] == meta["version"]


def test_ddp_gloo_two_processes(tmp_path):
    data = make_tree(tmp_path / "data", per_class=8)
    run = tmp_path / "run"
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "training.train", "--data", str(data), "--out", str(run), "--epochs", "1", "--device", "cpu",
           "--input-size", "64", "--batch-size", "4", "--threads", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-4000:]
    hist = json.loads((run / "history.json").read_text())
    assert hist[0]["world_size"] == 2
    assert p.stderr.count("INFO training.train: epoch 1/1") == 1  # only rank 0 logs the summary
    from cxr_node.model.checkpoint import load_checkpoint

    load_checkpoint(run / "best.pt")


def test_metrics_against_brute_force():
    from training.evaluate.metrics import (
        expected_calibration_error,
        fit_temperature,
        nll,
        roc_auc,
        threshold_for_sensitivity,
    )

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60).astype(bool)
    s = np.round(rng.random(60) + y * 0.4, 1)  # ties on purpose
    pos, neg = s[y], s[~y]
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert abs(roc_auc(y, s) - brute) < 1e-12
    t = threshold_for_sensitivity(y, s, 0.95)
    assert (s[y] >= t).mean() >= 0.95
    assert not any((s[y] >= u).mean() >= 0.95 for u in np.unique(s) if u > t)
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    ece, _ = expected_calibration_error(np.array([0, 1, 1]), p, n_bins=10)
    assert abs(ece - (abs(0.9 - 1) + abs(0.6 - 0) + abs(0.8 - 1)) / 3) < 1e-9
    logits = rng.normal(size=(200, 3)) * 4
    yy = np.array([rng.choice(3, p=np.exp(z / 4) / np.exp(z / 4).sum()) for z in logits])
    tt = fit_temperature(logits, yy)
    assert 2.5 < tt < 6.5 and nll(logits, yy, tt) <= nll(logits, yy, 1.0)


def test_film_pack_trains_without_the_source_images(tiny, tmp_path):
    """A pack holds the films exactly as the serving chain prepares them (PNG is lossless); a run with
    --film-pack reads them from it, so it trains after the source images are gone, and a run with other
    preprocessing parameters is refused with what to do."""
    import shutil

    from training.data import records as D
    from training.data.filmpack import FilmPack

    data = tmp_path / "data"
    shutil.copytree(tiny["manifest"].parent, data)
    manifest = data / tiny["manifest"].name
    split = D.load_split(tiny["run"] / "split.csv")  # give the manifest a source and a split, as merged ones have
    rows = list(csv.DictReader(open(manifest, newline="")))
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "source", "split"])
        w.writeheader()
        w.writerows({**r, "source": "gen", "split": split[r["path"]]} for r in rows)
    pack = tmp_path / "films.npz"
    run_module("training.data.pack", "build", "--manifest", str(manifest), "--out", str(pack), "--splits",
               "train,val,test", "--input-size", "64", "--cap", "gen:train=5", "--manifest-out",
               str(tmp_path / "packed.csv"), "--cache-dir", str(tmp_path / "cache"))
    fp = FilmPack(pack)
    rows = list(csv.DictReader(open(tmp_path / "packed.csv", newline="")))
    packed = [r for r in rows if not r.get("exclude")]
    assert len(fp) == len(packed) and all(r["path"] in fp for r in packed)
    per = {}
    for r in packed:
        per[(r["split"], r["label"])] = per.get((r["split"], r["label"]), 0) + 1
    assert max(n for (s, _), n in per.items() if s == "train") == 5
    assert sum(1 for r in rows if r.get("exclude") == "not in pack") > 0
    recs = D.read_manifest(tmp_path / "packed.csv")
    direct = D.build_cache(recs, fp.params, tmp_path / "direct", show_progress=False)
    assert all(np.array_equal(fp.get(r.path), direct[i]) for i, r in enumerate(recs))

    for f in data.rglob("*.png"):
        f.unlink()
    run = tmp_path / "run"
    run_module("training.train", "--data", str(tmp_path / "packed.csv"), "--film-pack", str(pack), "--out", str(run),
               "--epochs", "1", "--max-batches", "1", *TRAIN_ARGS)
    assert (run / "best.pt").is_file()
    p = subprocess.run([PY, "-m", "training.train", "--data", str(tmp_path / "packed.csv"), "--film-pack", str(pack),
                        "--out", str(tmp_path / "run2"), "--epochs", "1", *TRAIN_ARGS,
                        "--preprocess", "clahe_clip_limit=0.05"], capture_output=True, text=True, cwd=REPO,
                       timeout=240)
    assert p.returncode != 0 and "other preprocessing parameters" in p.stderr and "build a pack" in p.stderr


def test_resume_of_an_early_stopped_run_trains_nothing(tiny, tmp_path):
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    ck = torch.load(run / "last.pt", weights_only=True)
    ck["train_state"]["bad_epochs"] = 3
    torch.save(ck, run / "last.pt")
    p = run_module("training.train", "--data", str(tiny["manifest"]), "--out", str(run), "--epochs", "4",
                   "--patience", "3", "--resume", *TRAIN_ARGS)
    assert "had stopped early" in p.stderr
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1]
