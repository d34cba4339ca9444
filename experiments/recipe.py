"""The recipe search behind `bash reproduce.sh fashion` (issue 20): one change at a time, at a fixed number of images.

    python experiments/recipe.py --data_dir=DIR [--jobs=8] [--only=e_base,e_lr2] [--num=500]

Every run is the tier's own commands (runner.py): the image-space DiffiT U-Net (preset fashion, EDM), the
autoencoder (with its reconstruction FID: the floor of the latent route) and the latent DiffiT (preset fashion,
ADM) on its latents, each trained for a fixed number of images from seed 0, sampled (N = 500) and scored by FID and
KID against the first 500 test images. The models are the paper's; only recipe settings change. Each row's minutes
are what its training costs on 2 idle development cores (kimg / runner.CPU_RATE), whatever device ran it.
Rows -> results/recipe.jsonl (a run already there is skipped), the table -> results/recipe.txt.
"""

import argparse
import hashlib
import json
from pathlib import Path

import torch

from runner import (ROOT, append_row, cpu_minutes, done_rows, parallel, references, run, sample_args, say, score,
                    train_args)

# The baselines: the tier as it was (reproduce.sh fashion before this search), at lengths in images that fit the
# 30-minute tier on the development machine (its rates: runner.CPU_RATE).
EDM = dict(batch=64, lr=1e-3, warmup_kimg=0.5, ema_halflife_kimg=500, ema_rampup=0.05, kimg=32)
AE = dict(batch=64, lr=2e-3, kimg=48)
LATENT = dict(ae="a_base", batch=128, lr=1e-3, ema_halflife_kimg=500, ema_rampup=0.05, kimg=96,
              sample=dict(steps=250, guidance=3))

# name: (task, changes against the baseline). Latent runs with equal training settings share one model.
RUNS = {
    "e_base": ("edm", {}),
    "e_lr2e-3": ("edm", dict(lr=2e-3)),
    "e_lr4e-3": ("edm", dict(lr=4e-3)),
    "e_lr5e-4": ("edm", dict(lr=5e-4)),
    "e_b32": ("edm", dict(batch=32)),
    "e_b32_lr2e-3": ("edm", dict(batch=32, lr=2e-3)),
    "e_b16": ("edm", dict(batch=16)),
    "e_b16_lr5e-4": ("edm", dict(batch=16, lr=5e-4)),
    "e_b8": ("edm", dict(batch=8)),
    "e_b8_lr5e-4": ("edm", dict(batch=8, lr=5e-4)),
    "e_b8_kimg48": ("edm", dict(batch=8, kimg=48)),  # against the tier's own batch 16 at 48 kimg (results/fashion.txt)
    "e_b16_ema0.025": ("edm", dict(batch=16, ema_rampup=0.025)),
    "e_b16_ema_off": ("edm", dict(batch=16, ema_halflife_kimg=0)),
    "e_b16_pmean-0.8": ("edm", dict(batch=16, p_mean=-0.8)),
    "e_b16_pmean-1.6": ("edm", dict(batch=16, p_mean=-1.6)),
    "e_b16_w8": ("edm", dict(batch=16, window_size=8)),  # 8x8 windows: global attention at the 8x8 stage
    "e_b128_lr2e-3": ("edm", dict(batch=128, lr=2e-3)),
    "e_beta2_0.99": ("edm", dict(betas="0.9,0.99")),
    "e_ema0.1": ("edm", dict(ema_rampup=0.1)),
    "e_ema0.2": ("edm", dict(ema_rampup=0.2)),
    "e_ema0.025": ("edm", dict(ema_rampup=0.025)),
    "e_ema_off": ("edm", dict(ema_halflife_kimg=0)),
    "e_b32_lr2e-3_beta2_0.99": ("edm", dict(batch=32, lr=2e-3, betas="0.9,0.99")),
    "e_b32_lr2e-3_ema0.1": ("edm", dict(batch=32, lr=2e-3, ema_rampup=0.1)),
    "e_b32_lr2e-3_ema0.2": ("edm", dict(batch=32, lr=2e-3, ema_rampup=0.2)),
    "e_kimg48": ("edm", dict(kimg=48)),
    "e_kimg64": ("edm", dict(kimg=64)),
    "e_b32_lr2e-3_kimg48": ("edm", dict(batch=32, lr=2e-3, kimg=48)),
    "a_base": ("autoencoder", {}),
    "a_kimg24": ("autoencoder", dict(kimg=24)),
    "a_kimg96": ("autoencoder", dict(kimg=96)),
    "l_base": ("latent", {}),
    "l_steps100": ("latent", dict(sample=dict(steps=100, guidance=3))),
    "l_dpm25": ("latent", dict(sample=dict(steps=25, sampler="dpm++2m", guidance=3))),
    "l_g1.5": ("latent", dict(sample=dict(steps=250, guidance=1.5))),
    "l_g2": ("latent", dict(sample=dict(steps=250, guidance=2))),
    "l_g4": ("latent", dict(sample=dict(steps=250, guidance=4))),
    "l_lr2e-3": ("latent", dict(lr=2e-3)),
    "l_lr5e-4": ("latent", dict(lr=5e-4)),
    "l_b64": ("latent", dict(batch=64)),
    "l_b64_lr5e-4": ("latent", dict(batch=64, lr=5e-4)),
    "l_b32": ("latent", dict(batch=32)),
    "l_b64_g4": ("latent", dict(batch=64, sample=dict(steps=250, guidance=4))),
    "l_b64_steps100": ("latent", dict(batch=64, sample=dict(steps=100, guidance=3))),
    "l_b64_kimg192": ("latent", dict(batch=64, kimg=192)),
    "l_b256_lr2e-3": ("latent", dict(batch=256, lr=2e-3)),
    "l_beta2_0.99": ("latent", dict(betas="0.9,0.99")),
    "l_ema0.1": ("latent", dict(ema_rampup=0.1)),
    "l_ema0.2": ("latent", dict(ema_rampup=0.2)),
    "l_ema0.025": ("latent", dict(ema_rampup=0.025)),
    "l_lr2e-3_beta2_0.99": ("latent", dict(lr=2e-3, betas="0.9,0.99")),
    "l_lr2e-3_ema0.1": ("latent", dict(lr=2e-3, ema_rampup=0.1)),
    "l_kimg48": ("latent", dict(kimg=48)),
    "l_kimg192": ("latent", dict(kimg=192)),
    "l_ae24": ("latent", dict(ae="a_kimg24")),
    "l_ae96": ("latent", dict(ae="a_kimg96")),
}
BASE = {"edm": EDM, "autoencoder": AE, "latent": LATENT}


def settings(name):
    task, changes = RUNS[name]
    return task, {**BASE[task], **changes}


def describe(task, s):
    """The settings that differ from the task's baseline, e.g. 'lr=0.002 betas=0.9,0.99' ('baseline' if none)."""
    diff = [f"{k}={v}" for k, v in s.items() if BASE[task].get(k) != v and k != "latents"]
    return " ".join(diff) or "baseline"


def train_key(task, s):
    return json.dumps({k: v for k, v in s.items() if k != "sample"}, sort_keys=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="", help="Fashion-MNIST root (torchvision layout)")
    p.add_argument("--only", default="", help="comma-separated run names (default: all); latent runs add their autoencoder")
    p.add_argument("--num", type=int, default=500, help="samples per FID (and test images in the reference)")
    p.add_argument("--jobs", type=int, default=8 if torch.cuda.is_available() else 1, help="runs at a time")
    p.add_argument("--fast", action="store_true", help="pipeline check: 2 steps of batch 8 per run (NOT real results)")
    p.add_argument("--network", default="", help="FID network (default $MINIDIFFIT_INCEPTION)")
    p.add_argument("--out", default="runs/recipe")
    p.add_argument("--results", default="results/recipe")
    p.add_argument("--best_only", action="store_true", help="only write OUT/best.json from the rows there are")
    args = p.parse_args()
    if args.best_only:
        return write_best(done_rows(ROOT / (args.results + ".jsonl")), ROOT / args.out / "best.json")
    names = [n for n in args.only.split(",") if n] or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"recipe: unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    names = list(dict.fromkeys([settings(n)[1]["ae"] for n in names if RUNS[n][0] == "latent"] + names))  # + their AEs
    out, rows_path = ROOT / args.out, ROOT / (args.results + ".jsonl")
    out.mkdir(parents=True, exist_ok=True)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    ref, floor = references(out, args.data_dir, args.num, args.network)
    have = {r["name"] for r in done_rows(rows_path)}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"

    def job(name):
        task, s = settings(name)
        key = name if task != "latent" else "l_" + hashlib.sha1(train_key(task, s).encode()).hexdigest()[:8]
        s = dict(s, kimg=2 * 8 / 1000, batch=8) if args.fast else s
        run_dir, log = out / key, out / f"{key}.log"
        if task == "latent":
            s["latents"] = str(out / s["ae"] / "latents")
        run(train_args(task, s, run_dir, args.data_dir), log)  # resumes, or returns at once when done
        if task == "autoencoder":
            run(["imagenet", "prepare", "--data=fashion_mnist", f"--data_dir={args.data_dir}", f"--out={run_dir}/latents",
                 f"--vae={run_dir}/ckpt.pt", "--num_workers=0", "--batch=256", *(["--num=64"] if args.fast else [])], log)
        if name in have:  # an autoencoder rebuilt for its latents: same settings, its row is already there
            return
        if task == "autoencoder":
            npz = run_dir / f"recon_{args.num}.npz"
            run(["experiments/recipe_recon.py", str(run_dir / "ckpt.pt"), str(npz), args.data_dir, str(args.num)], log)
        else:
            npz = out / f"{name}_samples_{args.num}.npz"
            run(sample_args(run_dir / "ckpt.pt", npz, args.num, s.get("sample", {})), log)
        row = dict(name=name, task=task, setting=describe(task, s), kimg=s["kimg"],
                   cpu_minutes=cpu_minutes(task, s["batch"], s["kimg"]), **score(npz, ref, args.network, log),
                   device=device)
        append_row(rows_path, row)
        say(f"{name}: FID {row['fid']:.2f} ({row['setting']})")

    def needs_latents(ae):  # an autoencoder scored before (its row is there) but whose latents this checkout lacks
        pending = any(RUNS[m][0] == "latent" and m not in have and settings(m)[1]["ae"] == ae for m in names)
        return pending and not (out / ae / "latents" / "manifest.json").is_file()

    first = [n for n in names if RUNS[n][0] != "latent" and (n not in have or RUNS[n][0] == "autoencoder" and needs_latents(n))]
    then = [n for n in names if RUNS[n][0] == "latent" and n not in have]
    # Latent runs that share a model: the first trains it; the others wait for that phase to end (sorted first).
    then.sort(key=lambda n: train_key(*settings(n)))
    parallel([lambda n=n: job(n) for n in first], args.jobs)
    lead = {}
    for n in then:
        lead.setdefault(train_key(*settings(n)), n)
    parallel([lambda n=n: job(n) for n in lead.values()], args.jobs)
    parallel([lambda n=n: job(n) for n in then if n not in lead.values()], args.jobs)
    write_table(done_rows(rows_path), floor, args)
    write_best(done_rows(rows_path), out / "best.json")


def write_best(rows, path):
    """Per task, the settings of the lowest-FID run among those at the baseline's length (ablations.py --recipe=)."""
    best = {}
    for r in rows:
        task, s = settings(r["name"])
        if s["kimg"] == BASE[task]["kimg"] and (task not in best or r["fid"] < best[task][1]):
            best[task] = (r["name"], r["fid"], s)
    if "latent" in best:  # its autoencoder's settings too
        best["autoencoder"] = (best["latent"][2]["ae"], None, settings(best["latent"][2]["ae"])[1])
    path.write_text(json.dumps({task: dict(run=n, fid=f, settings=s) for task, (n, f, s) in best.items()}, indent=1) + "\n")
    print(f"best at the baseline lengths -> {path}: " + ", ".join(f"{t} {n}" for t, (n, _, _) in best.items()))


def write_table(rows, floor, args):
    lines = [f"Recipe search for the laptop tier (experiments/recipe.py): one change at a time against the baseline "
             f"(the tier before this search), each trained from seed 0 for a fixed number of images; FID and KID on "
             f"{args.num} samples vs {args.num} Fashion-MNIST test images (floor, train vs test: FID "
             f"{floor['fid']:.2f}). Minutes: training only, on 2 idle development cores (kimg / measured img/s). "
             f"Made by: python experiments/recipe.py --data_dir=DIR", "",
             "| run | task | setting | kimg | CPU min | FID | KID x1e3 | device |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kid = f"{r['kid'] * 1e3:.2f} +- {r['kid_std'] * 1e3:.2f}" if r.get("kid") is not None else "-"
        lines.append(f"| {r['name']} | {r['task']} | {r['setting']} | {r['kimg']:g} | {r['cpu_minutes']:.1f} | "
                     f"{r['fid']:.2f} | {kid} | {r['device']} |")
    Path(ROOT / (args.results + ".txt")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
