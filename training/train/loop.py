"""The training loop (:func:`train`): split, cache, AdamW with class-weighted loss or balanced sampling,
mixed precision and DistributedDataParallel on CUDA, early stopping on the validation macro AUC."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from training.common import parse_preprocess, predict_logits
from training.train.sampling import (
    BalancedSampler,
    CachedDataset,
    class_weights,
    critical_classes,
    dist_info,
    plot_curves,
    sample_weights,
)

log = logging.getLogger("training.train")

# --------------------------------------------------------------------------- main


def train(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from monai.data import set_track_meta
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    from cxr_node.model.checkpoint import (
        atomic_torch_save,
        build_model,
        make_checkpoint,
        read_checkpoint,
        resolve_device,
    )
    from training.data import records as D
    from training.evaluate.metrics import macro_auc, softmax

    set_track_meta(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    world, rank, local_rank = dist_info()
    distributed = world > 1
    device = resolve_device(args.device)
    if distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
    is_main = rank == 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    amp = device.type == "cuda"
    channels_last = device.type == "cuda"

    if getattr(args, "film_pack", None):
        D.use_pack(args.film_pack)
    records = D.read_dataset(args.data)
    labels = sorted({r.label for r in records})
    label_idx = {n: i for i, n in enumerate(labels)}
    criticals = critical_classes(args.critical, labels, warn=rank == 0)
    params = parse_preprocess(getattr(args, "preprocess", []) or [], args.input_size)
    augment = "none" if args.no_augment else getattr(args, "augment", "v2")
    balance = getattr(args, "balance", "none")

    split_csv = out / "split.csv"
    if args.resume and split_csv.is_file():
        assign = D.load_split(split_csv)
    elif args.split_file:
        assign = D.load_split(Path(args.split_file))
        missing = [r.relpath for r in records if r.relpath not in assign]
        if missing:
            raise SystemExit(f"--split-file {args.split_file} has no row for {len(missing)} film(s), "
                             f"e.g. {missing[0]}: it was written for other data")
        if is_main:
            D.save_split(assign, records, out, args.seed, str(args.data))
    elif D.manifest_split(records) is not None:
        assign = D.manifest_split(records)  # the merged manifest's own grouped split
        if is_main:
            log.info("using the manifest's split column")
            D.save_split(assign, records, out, args.seed, str(args.data))
    else:
        assign = D.grouped_stratified_split(records, seed=args.seed)
        if is_main:
            D.save_split(assign, records, out, args.seed, str(args.data))
    idx = {s: [i for i, r in enumerate(records) if assign.get(r.relpath) == s] for s in D.SPLITS}
    targets = np.array([label_idx[r.label] for r in records], dtype=np.int64)

    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    if is_main:
        cache = D.build_cache(records, params, cache_dir)
    if distributed:
        dist.barrier()
    if not is_main:
        cache = D.build_cache(records, params, cache_dir, show_progress=False)

    tr_idx, va_idx = idx["train"], idx["val"]
    if not va_idx:
        raise SystemExit("the validation split is empty: model selection needs validation films")
    weights = class_weights(targets[tr_idx], len(labels))
    draw = None
    if balance != "none":
        draw = sample_weights([records[i].label for i in tr_idx], [records[i].source for i in tr_idx], balance)
        weights = np.ones(len(labels))  # the sampler balances; the loss does not weight again
    if is_main:
        log.info("labels %s; split train %d / val %d / test %d; critical class(es) %s", labels, len(tr_idx),
                 len(va_idx), len(idx["test"]), ", ".join(criticals))
        if draw is None:
            log.info("class weights (inverse frequency): %s",
                     ", ".join(f"{n}={w:.3f}" for n, w in zip(labels, weights)))
        else:
            mass = Counter()
            for i, w in zip(tr_idx, draw):
                mass[(records[i].source or "-", records[i].label)] += float(w)
            log.info("balanced sampling (%s): %s", balance,
                     ", ".join(f"{s}/{c}={m:.3f}" for (s, c), m in sorted(mass.items())))

    torch.manual_seed(args.seed)
    model = build_model(args.arch, len(labels)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if args.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(args.epochs, 1), eta_min=args.lr * 0.01)
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3,
                                                           patience=args.lr_patience)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    crit = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device))

    start_epoch, best_auc, bad_epochs, history = 1, -1.0, 0, []
    version = args.model_version or f"{args.arch}-{args.input_size}-{time.strftime('%Y%m%d', time.gmtime())}"
    last_path, best_path = out / "last.pt", out / "best.pt"
    if args.init_from and not args.resume:
        init = read_checkpoint(Path(args.init_from))
        m = init["meta"]
        if m["labels"] != labels or m["arch"] != args.arch or m["input_size"] != args.input_size:
            raise SystemExit(f"--init-from: {args.init_from} has labels/arch/input size "
                             f"{m['labels']}/{m['arch']}/{m['input_size']}, this run "
                             f"{labels}/{args.arch}/{args.input_size}")
        model.load_state_dict({k: v.float() for k, v in init["state_dict"].items()})
        if is_main:
            log.info("initialised from %s (%s, epoch %s)", args.init_from, m.get("version"),
                     m.get("metrics", {}).get("epoch"))
    if args.resume:
        if not last_path.is_file():
            raise SystemExit(f"--resume: {last_path} not found")
        ck = read_checkpoint(last_path)
        if ck["meta"]["labels"] != labels or ck["meta"]["arch"] != args.arch \
                or ck["meta"]["input_size"] != args.input_size:
            raise SystemExit(f"--resume: {last_path} was trained with labels/arch/input size "
                             f"{ck['meta']['labels']}/{ck['meta']['arch']}/{ck['meta']['input_size']}")
        model.load_state_dict(ck["state_dict"])
        st = ck["train_state"]
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if amp and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        start_epoch, best_auc, bad_epochs = st["epoch"] + 1, st["best_auc"], st["bad_epochs"]
        history = st["history"]
        version = ck["meta"]["version"]
        if is_main:
            log.info("resumed from %s at epoch %d (best val macro AUC %.4f)", last_path, st["epoch"], best_auc)
        if bad_epochs >= args.patience:
            start_epoch = args.epochs + 1  # it had stopped early: nothing left to train
            if is_main:
                log.info("the run had stopped early (no val macro AUC gain for %d epochs): nothing to resume",
                         bad_epochs)

    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    train_ds = CachedDataset(cache, tr_idx, targets[tr_idx], params, augment=augment, seed=args.seed)
    if draw is not None:
        sampler = BalancedSampler(draw, len(tr_idx), args.seed, rank, world)
    elif distributed:
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    else:
        sampler = None
    base_meta = {
        "labels": labels, "arch": args.arch, "input_size": args.input_size, "preprocess": params,
        "thresholds": {c: 0.5 for c in criticals}, "temperature": 1.0, "critical_labels": list(criticals),
        "data_manifest_sha256": D.manifest_sha256(records), "version": version,
        "calibrated": False, "seed": args.seed, "class_weights": [float(w) for w in weights],
        "train_counts": {n: int((targets[tr_idx] == i).sum()) for i, n in enumerate(labels)},
        "schedule": args.schedule, "lr": args.lr, "augment": augment, "balance": balance,
        "train_sources": dict(sorted(Counter(records[i].source or "-" for i in tr_idx).items())),
    }
    if args.init_from:
        base_meta["init_from"] = {"path": Path(args.init_from).name, "version": init["meta"].get("version"),
                                  "sha256": init["sha256"], "epoch": init["meta"].get("metrics", {}).get("epoch")}

    from tqdm import tqdm

    for epoch in range(start_epoch, args.epochs + 1):
        train_ds.epoch = epoch
        if sampler is not None:
            sampler.set_epoch(epoch)
            # a last batch of one film breaks batch norm: drop it then
            loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                                pin_memory=device.type == "cuda", drop_last=len(sampler) % args.batch_size == 1)
        else:
            g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=RandomSampler(train_ds, generator=g),
                                num_workers=args.workers, pin_memory=device.type == "cuda",
                                drop_last=len(train_ds) % args.batch_size == 1)
        net.train()
        t0 = time.perf_counter()
        seen, loss_sum = 0, 0.0
        n_batches = len(loader) if args.max_batches is None else min(len(loader), args.max_batches)
        bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{args.epochs}", unit="batch", disable=not is_main,
                   mininterval=10.0, file=sys.stderr)
        for b, (x, y) in enumerate(loader):
            if b >= n_batches:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, enabled=amp):
                loss = crit(net(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch} batch {b}")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
        bar.close()
        train_time = time.perf_counter() - t0
        stats = torch.tensor([loss_sum, seen, train_time], dtype=torch.float64, device=device)
        if distributed:
            dist.all_reduce(stats)
        train_loss = float(stats[0] / max(stats[1], 1))
        imgs_per_s = float(stats[1]) / (float(stats[2]) / world)

        # validation on rank 0; result broadcast so every rank steps its scheduler the same way
        val = torch.zeros(3, dtype=torch.float64, device=device)
        if is_main:
            logits = predict_logits(model, cache, va_idx, params, device, amp=amp, channels_last=channels_last)
            pv = softmax(logits)
            yv = targets[va_idx]
            val_auc = macro_auc(yv, pv)
            val_loss = float(-np.mean(np.log(np.clip(pv[np.arange(len(yv)), yv], 1e-12, None))))
            val_acc = float((pv.argmax(1) == yv).mean())
            val = torch.tensor([val_auc, val_loss, val_acc], dtype=torch.float64, device=device)
        if distributed:
            dist.broadcast(val, src=0)
        val_auc, val_loss, val_acc = (float(v) for v in val)
        if args.schedule == "cosine":
            sched.step()
        else:
            sched.step(val_auc)
        improved = val_auc > best_auc + 1e-5
        if improved:
            best_auc, bad_epochs = val_auc, 0
        else:
            bad_epochs += 1
        rec = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_macro_auc": val_auc,
               "val_accuracy": val_acc, "images_per_s": imgs_per_s, "train_seconds": float(stats[2]) / world,
               "lr": opt.param_groups[0]["lr"], "world_size": world, "device": device.type}
        history.append(rec)
        if is_main:
            log.info("epoch %d/%d loss %.4f val_loss %.4f val_macro_auc %.4f val_acc %.3f %.1f img/s lr %.2g%s",
                     epoch, args.epochs, train_loss, val_loss, val_auc, val_acc, imgs_per_s,
                     opt.param_groups[0]["lr"], " *best*" if improved else "")
            meta = dict(base_meta, metrics={"val_macro_auc": val_auc, "val_accuracy": val_acc, "epoch": epoch,
                                            "val_loss": val_loss})
            if improved:
                atomic_torch_save(make_checkpoint(model, meta), best_path)
            ck = make_checkpoint(model, meta)
            ck["train_state"] = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                 "scaler": scaler.state_dict() if amp else {}, "epoch": epoch,
                                 "best_auc": best_auc, "bad_epochs": bad_epochs, "history": history}
            atomic_torch_save(ck, last_path)
            (out / "history.json").write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
            plot_curves(history, out / "curves.png")
        if bad_epochs >= args.patience:
            if is_main:
                log.info("early stopping: no val macro AUC gain for %d epochs (best %.4f)", bad_epochs, best_auc)
            break
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return {"best_val_macro_auc": best_auc, "epochs": len(history), "history": history}
