"""DiffiT's ablations at laptop scale: every variant of the image-space model trained alike on Fashion-MNIST.

    bash reproduce.sh ablations [--iters=N] [--seeds=K] [--data_dir=DIR]   # runs this script
    python experiments/ablations.py --iters=400 --variants=tmsa,bias          # a shorter or partial run

Each variant is the `fashion` preset with one change (edm_task.Config's time_mode, window_size or arch), trained
with the same EDM recipe, steps, batch, data order and seed, sampled from the same seeds (Heun, 18 steps = 35
network evaluations) and scored by FID with the real Inception network against N Fashion-MNIST test images,
beside the real-vs-real floor at the same N. Runs go to runs/ablations/<variant>_s<seed>/ (resumable: a finished
run is only scored); the table, with its budget, to results/ablations.txt and results/ablations.json.
The paper's numbers are CIFAR-10 FIDs at 50k samples after 200k steps of batch 512: only the order compares.
"""

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from minidiffit.tools import edm_task
from minidiffit.tools.evaluate import EvalConfig, RefConfig, build_reference, evaluate
from minidiffit.base.runtime import finite, load_checkpoint, num_parameters
from minidiffit.tools.compare import interval, paired_difference, verdict
from minidiffit.tools.sample import SampleConfig, sample
from minidiffit.tools.tasks import train
from minidiffit.unet import count_parameters

# name: (edm_task.Config overrides, what the paper reports for it on CIFAR-10, DiffiT Sec. 5.3 / DESIGN.md Sec. 2)
VARIANTS = {
    "tmsa": ({}, "1.95 (TMSA, config H)"),
    "bias": ({"time_mode": "bias"}, "3.97 (time only in the position bias, F)"),
    "mlp": ({"time_mode": "mlp"}, "3.81 (time added in the MLP, G)"),
    "token": ({"time_mode": "token"}, "2.28 (separate time token, Table 7)"),
    "adaln": ({"time_mode": "adaln"}, "- (DiT's adaLN-Zero; not in the paper's tables)"),
    "window2": ({"window_size": 2}, "23.2% worse than window 4 (Fig. 8)"),
    "window8": ({"window_size": 8}, "1.5% better than window 4 (Fig. 8)"),
    "unet2d": ({"arch": "unet2d"}, "- (diffusers' UNet2DModel, same budget: our peer baseline)"),
}


def parameters(cfg):
    if cfg.arch == "unet2d":
        return num_parameters(edm_task.build_model(cfg))
    return count_parameters(edm_task.unet_config(cfg))


def final_loss(out, last=3):
    """Mean of the last `last` logged losses (each the mean since the previous checkpoint)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.fmean(r["loss"] for r in lines[-last:])


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20_000 if cuda else 800,
                   help="steps per variant (CPU default 800 x batch 64: ~8 min each for TMSA on 2 cores, ~90 min in all)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seeds", type=int, default=2 if cuda else 1, help="seeds per variant (the spread between runs)")
    p.add_argument("--num", type=int, default=5000 if cuda else 500, help="samples per FID")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--data_dir", default="", help="Fashion-MNIST root (torchvision layout); '' downloads it")
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--results", default="results/ablations")
    p.add_argument("--network", default="", help="FID network (default $MINIDIFFIT_INCEPTION or download)")
    args = p.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"ablations: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = {s: out / "fid" / f"{s}_{args.num}.npz" for s in ("test", "train")}
    for split, path in ref.items():
        if not path.is_file():
            build_reference(RefConfig(data="fashion_mnist", data_dir=args.data_dir, split=split, num=args.num,
                                      out=str(path), network=args.network))
    floor = evaluate(EvalConfig(samples=str(ref["train"]), ref=str(ref["test"]), network=args.network, pr=False))
    base = edm_task.Config(preset="fashion", data="fashion_mnist", data_dir=args.data_dir or None, iters=args.iters,
                           batch=args.batch, lr=1e-3, warmup_kimg=0.5, augment_p=0, ckpt_every=50, log_every=50,
                           grid=0)  # Choice: reproduce.sh fashion's laptop settings, for every variant alike
    rows = []
    for name in names:
        for seed in range(args.seeds):
            cfg = dataclasses.replace(base, seed=seed, out=str(out / f"{name}_s{seed}"), **VARIANTS[name][0])
            with open(out / f"{name}_s{seed}.log", "a") as log:  # the loop's progress lines
                train(cfg, log=lambda line: print(line, file=log, flush=True))
            ckpt, npz = Path(cfg.out) / "ckpt.pt", Path(cfg.out) / f"samples_{args.num}.npz"
            if not (npz.is_file() and npz.stat().st_mtime > ckpt.stat().st_mtime):
                sample(SampleConfig(ckpt=str(ckpt), num_samples=args.num, out=str(npz), batch=100, overwrite=True),
                       log=lambda *a: None)
            fid = evaluate(EvalConfig(samples=str(npz), ref=str(ref["test"]), network=args.network, pr=False))
            saved = load_checkpoint(ckpt)
            rows.append(dict(variant=name, seed=seed, params=parameters(cfg), kimg=saved["step"] * args.batch / 1000,
                             loss=final_loss(Path(cfg.out)), fid=fid, minutes=saved["elapsed_s"] / 60,
                             paper=VARIANTS[name][1]))
            print(f"{name} seed {seed}: FID {fid:.2f}", flush=True)
    write_table(rows, args, floor)


def write_table(rows, args, floor):
    head = (f"DiffiT ablations on Fashion-MNIST (laptop scale): preset fashion, {args.iters} steps x batch {args.batch} "
            f"per variant, seeds {args.seeds}, FID on {args.num} samples (Heun 18 steps, 35 NFE) vs {args.num} test "
            f"images; real-vs-real floor at this N: {floor:.2f}. Made by: python experiments/ablations.py "
            f"--iters={args.iters} --batch={args.batch} --seeds={args.seeds} --num={args.num} "
            f"(device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'})")
    lines = [head, "", "| variant | seed | params (M) | kimg | final loss | FID | train min | paper (CIFAR-10 FID) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['seed']} | {r['params'] / 1e6:.3f} | {r['kimg']:.1f} | {r['loss']:.1f} | "
              f"{r['fid']:.2f} | {r['minutes']:.1f} | {r['paper']} |" for r in rows]
    comparisons = compare_to_tmsa(rows)
    if comparisons:
        lines += ["", "Per variant: mean FID over seeds with its 95% t interval, and the paired difference against TMSA "
                  "(seed k of every variant shares data order, initialisation where shapes allow, and sampling noise); "
                  "separated only when that interval excludes zero.", "",
                  "| variant | seeds | mean FID [95% interval] | FID - TMSA, paired [95% interval] | verdict |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c['variant']} | {c['seeds']} | {c['mean']:.2f} [{c['low']:.2f}, {c['high']:.2f}] | "
                  + (f"{c['diff']:+.2f} [{c['diff_low']:+.2f}, {c['diff_high']:+.2f}] | {c['verdict']} |"
                     if c["variant"] != "tmsa" else "- | the baseline |") for c in comparisons]
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results + ".txt").write_text("\n".join(lines) + "\n")
    Path(args.results + ".json").write_text(json.dumps({"budget": head, "num": args.num, "floor": floor, "rows": rows,
                                                        "comparisons": [{k: finite(v) if isinstance(v, float) else v  # one seed: no interval
                                                                         for k, v in c.items()} for c in comparisons]},
                                                       indent=1) + "\n")
    print("\n".join(lines))


def compare_to_tmsa(rows):
    """Per variant: the mean FID over its seeds with a 95% interval, and the paired difference against TMSA on the
    seeds both have (minidiffit/tools/compare.py). [] without TMSA rows."""
    fids = {}
    for r in rows:
        fids.setdefault(r["variant"], {})[r["seed"]] = r["fid"]
    if "tmsa" not in fids:
        return []
    out = []
    for name, by_seed in fids.items():
        mean, low, high = interval(list(by_seed.values()))
        row = dict(variant=name, seeds=len(by_seed), mean=mean, low=low, high=high)
        shared = sorted(set(by_seed) & set(fids["tmsa"]))
        if name != "tmsa" and shared:
            diff, dlow, dhigh = paired_difference([by_seed[s] for s in shared], [fids["tmsa"][s] for s in shared])
            row.update(diff=diff, diff_low=dlow, diff_high=dhigh, verdict=verdict(dlow, dhigh))
        out.append(row)
    return out


if __name__ == "__main__":
    main()
