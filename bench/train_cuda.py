"""Training throughput of the classifier on a GPU: mixed precision + channels_last against fp32.

    python bench/train_cuda.py [--arch densenet121] [--size 224] [--batch 128] [--steps 40] [--json out.json]

Both runs are AdamW steps of MONAI's DenseNet121 (the bundled classifier's architecture, four
outputs) on batches already on the device, so the figure is the model's own training speed (the
data pipeline is measured by the training log's films/s). The reference run is fp32 with
contiguous memory in the same go; the AMP run uses ``torch.autocast`` (float16) + ``GradScaler``
+ ``channels_last``, exactly as ``training/train/loop.py`` does on CUDA. Printed: images/s of each and
the ratio.

The AMP-vs-fp32 check: both start from the same weights and see the same batches; the script
prints the largest difference between their softmax outputs on a held batch before training
(forward only) and the two loss curves' last values after training (they should agree to about
1e-2: AMP changes rounding, not what is learned). On a machine without CUDA it runs on the CPU
with a small size so the code path can be checked; those figures mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(model, opt, scaler, batches, device, amp: bool, channels_last: bool, warmup: int = 3) -> dict:
    import torch

    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = None
    n = 0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
            n = 0
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
        n += x.shape[0]
    sync()
    dt = time.perf_counter() - t0
    return {"images_per_s": n / dt, "seconds": dt, "images": n, "loss_first": losses[0], "loss_last": losses[-1],
            "loss_mean_last5": sum(losses[-5:]) / 5}


def main(argv=None) -> int:
    import torch

    from cxr_node.model.checkpoint import build_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="densenet121")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size, batch, steps = (args.size, args.batch, args.steps) if cuda else (64, 8, 6)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # a few fixed batches, cycled: the same for both runs
    pool = [(torch.rand(batch, 1, size, size, generator=g), torch.randint(0, 4, (batch,), generator=g))
            for _ in range(4)]
    pool = [(x.to(device), y.to(device)) for x, y in pool]
    batches = [pool[i % len(pool)] for i in range(steps + 3)]
    base = build_model(args.arch, 4).to(device)
    res = {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
           "torch": torch.__version__, "arch": args.arch, "size": size, "batch": batch, "steps": steps}

    m32 = copy.deepcopy(base).eval()
    mamp = copy.deepcopy(base).to(memory_format=torch.channels_last).eval()
    with torch.no_grad():
        x = pool[0][0]
        p32 = torch.softmax(m32(x).float(), 1)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=cuda):
            pamp = torch.softmax(mamp(x.contiguous(memory_format=torch.channels_last)).float(), 1)
    res["forward_max_abs_prob_diff"] = float((p32 - pamp).abs().max())

    out = {}
    for name, amp, cl in (("fp32", False, False), ("amp_channels_last", cuda, cuda)):
        model = copy.deepcopy(base).train()
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(device.type, enabled=amp)
        out[name] = run(model, opt, scaler, batches, device, amp, cl)
        print(f"{name:>18}: {out[name]['images_per_s']:8.1f} images/s  (loss {out[name]['loss_first']:.3f} -> "
              f"{out[name]['loss_mean_last5']:.3f})", flush=True)
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    res["runs"] = out
    res["ratio_amp_over_fp32"] = out["amp_channels_last"]["images_per_s"] / out["fp32"]["images_per_s"]
    res["loss_diff_last5"] = abs(out["amp_channels_last"]["loss_mean_last5"] - out["fp32"]["loss_mean_last5"])
    if cuda:
        res["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"ratio AMP+channels_last / fp32: {res['ratio_amp_over_fp32']:.2f}x; forward max |p_fp32 - p_amp| "
          f"{res['forward_max_abs_prob_diff']:.2e}; mean loss of the last 5 steps differs by {res['loss_diff_last5']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
