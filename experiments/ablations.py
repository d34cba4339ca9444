"""DiffiT's ablations at laptop scale, both families: how time enters the blocks of the image-space U-Net and of the
latent transformer (TMSA against the paper's alternatives and DiT's adaLN-Zero), each variant with several seeds.

    bash reproduce.sh ablations [--image=tmsa,adaln] [--latent=tmsa,adaln] [--seeds=3] [--data_dir=DIR]
    python experiments/ablations.py --image=tmsa,bias,mlp,token,adaln,window2,window8,unet2d --latent=    # all image ones

Each variant is the tier's model (preset fashion) with one change (time_mode, window_size or arch), trained with
the tier's recipe (experiments/recipe.py chose it) for the same number of images from seed k, sampled from the same
seeds and scored by FID and KID on N samples against N Fashion-MNIST test images (runner.py). Seed k of every variant
shares data order, initialisation where shapes allow and sampling noise, so each variant is compared with TMSA by
the paired difference over seeds, with a 95% t interval: separated only when it excludes zero (tools/compare.py).
The latent family trains one autoencoder (the tier's settings, seed 0) and shares its latents.
Runs go to runs/ablations/, one row per finished run to results/ablations_rows.jsonl (a run with a row is not run
again, so an interrupted experiment resumes, also on another checkout), the tables to results/ablations.{txt,json}. The paper's numbers are CIFAR-10 and ImageNet FIDs: only the order compares.
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from runner import (ROOT, append_row, cpu_minutes, done_rows, parallel, references, run, sample_args, say, score,
                    train_args)
from minidiffit.base.runtime import finite, load_checkpoint, num_parameters
from minidiffit.tools import edm_task, latent_task
from minidiffit.tools.pipelines import FASHION
from minidiffit.tools.compare import interval, paired_difference, verdict

# family: (task, the tier's recipe, thousands of training images per run, {variant: (changes, what the paper reports)}).
# Choice: by default 2 variants per family x 3 paired seeds, at the tier's lengths (pipelines.FASHION: image 48 kimg,
# latent 192 kimg; the earlier passes' 25.6 / 36 and 96 kimg rows stay in the rows file), so seed 0 of TMSA is the
# tier's model: about 3 h on 2 development cores (measured 2026-12-06: the image family 99 min alone; ~3 min of
# sampling and FID per run on top of runner.CPU_RATE's training estimate). Fewer
# variants for longer: TMSA against time in the MLP (config G: the same block with time moved out of attention) in
# image space, and against DiT's adaLN-Zero in the latent transformer (the paper's headline comparison, Fig. 7b).
# Dropped from the default, run with --image= / --latent=: bias (F), token (Table 7), windows 2/8, the diffusers
# U-Net, and the latent mlp/token/bias variants.
FAMILIES = {
    "image": ("edm", FASHION["edm"], FASHION["edm"]["kimg"], {
        "tmsa": ({}, "1.95 (TMSA, config H)"),
        "bias": ({"time_mode": "bias"}, "3.97 (time only in the position bias, F)"),
        "mlp": ({"time_mode": "mlp"}, "3.81 (time added in the MLP, G)"),
        "token": ({"time_mode": "token"}, "2.28 (separate time token, Table 7)"),
        "adaln": ({"time_mode": "adaln"}, "- (DiT's adaLN-Zero; not in the paper's tables)"),
        "window2": ({"window_size": 2}, "23.2% worse than window 4 (Fig. 8)"),
        "window8": ({"window_size": 8}, "1.5% better than window 4 (Fig. 8)"),
        "unet2d": ({"arch": "unet2d"}, "- (diffusers' UNet2DModel, same budget: our peer baseline)"),
    }),
    "latent": ("latent", FASHION["latent"], FASHION["latent"]["kimg"], {
        "tmsa": ({}, "ImageNet-256 FID 1.73 (DiffiT, Table 2)"),
        "adaln": ({"time_mode": "adaln"}, "2.27 (DiT-XL/2-G, adaLN-Zero; Fig. 7b: TMSA better)"),
        "mlp": ({"time_mode": "mlp"}, "- (time added in the MLP)"),
        "token": ({"time_mode": "token"}, "- (separate time token)"),
        "bias": ({"time_mode": "bias"}, "- (time only in the position bias)"),
    }),
}
DEFAULT = {"image": "tmsa,mlp", "latent": "tmsa,adaln"}


def parameters(task, cfg):
    if task == "edm":
        return num_parameters(edm_task.build_model(cfg))
    return num_parameters(latent_task.build_model(cfg))


def final_loss(out, last=3):
    """Mean of the last `last` logged losses (each the mean since the previous progress line)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.fmean(r["loss"] for r in lines[-last:])


def main():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=DEFAULT["image"], help="image-space variants: " + ",".join(FAMILIES["image"][3]))
    p.add_argument("--latent", default=DEFAULT["latent"], help="latent variants: " + ",".join(FAMILIES["latent"][3]))
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (paired across variants)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every training length (a longer run: 4)")
    p.add_argument("--num", type=int, default=500, help="samples per FID (and test images in the reference)")
    p.add_argument("--jobs", type=int, default=8 if cuda else 1, help="runs at a time")
    p.add_argument("--fast", action="store_true", help="pipeline check: 2 steps of batch 8 per run (NOT real results)")
    p.add_argument("--data_dir", default="", help="Fashion-MNIST root (torchvision layout)")
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--results", default="results/ablations")
    p.add_argument("--network", default="", help="FID network (default $MINIDIFFIT_INCEPTION)")
    p.add_argument("--recipe", default="", help="a recipe search's best.json: its settings instead of the tier's")
    args = p.parse_args()
    recipe = {"autoencoder": FASHION["autoencoder"], **{task: r for task, r, _, _ in FAMILIES.values()}}
    if args.recipe:
        chosen = json.loads(Path(args.recipe).read_text())
        recipe.update({task: {k: v for k, v in c["settings"].items() if k != "ae"} for task, c in chosen.items()})
        print("recipe from " + args.recipe + ": " + json.dumps(recipe))
    chosen = {f: [v for v in getattr(args, f).split(",") if v] for f in FAMILIES}
    for family, names in chosen.items():
        unknown = [n for n in names if n not in FAMILIES[family][3]]
        if unknown:
            raise SystemExit(f"ablations: unknown {family} variant(s) {unknown}; choose from {', '.join(FAMILIES[family][3])}")
    # Choice: the rows live beside the tables in results/ (committed), the runs in runs/: an experiment longer than
    # one sitting resumes from the rows on another checkout and trains only the runs it lacks.
    out, rows_path = ROOT / args.out, ROOT / (args.results + "_rows.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    ref, floor = references(out, args.data_dir, args.num, args.network)
    device = torch.cuda.get_device_name() if cuda else "CPU"

    def length(s, kimg):  # the recipe's settings at this run's length
        return dict(s, kimg=2 * 8 / 1000, batch=8) if args.fast else dict(s, kimg=kimg * args.scale)

    def current():
        return rows_at(done_rows(rows_path), {f: length({}, FAMILIES[f][2])["kimg"] for f in FAMILIES})

    have = {(r["family"], r["variant"], r["seed"]) for r in current()}

    def autoencoder():
        s, log = length(recipe["autoencoder"], recipe["autoencoder"]["kimg"]), out / "ae.log"
        run(train_args("autoencoder", s, out / "ae", args.data_dir), log)
        run(["imagenet", "prepare", "--data=fashion_mnist", f"--data_dir={args.data_dir}", f"--out={out}/ae/latents",
             f"--vae={out}/ae/ckpt.pt", "--num_workers=0", "--batch=256", *(["--num=64"] if args.fast else [])], log)

    def job(family, name, seed):
        task, _, kimg, variants = FAMILIES[family]
        s = dict(length(recipe[task], kimg), seed=seed, **variants[name][0])
        if task == "latent":
            s["latents"] = str(out / "ae" / "latents")
        key = f"{family}_{name}_s{seed}_k{s['kimg']:g}"  # another length is another run, never a resume
        run_dir, log = out / key, out / f"{key}.log"
        run(train_args(task, s, run_dir, args.data_dir), log)
        npz = run_dir / f"samples_{args.num}.npz"
        run(sample_args(run_dir / "ckpt.pt", npz, args.num, s.get("sample", {})), log)
        saved = load_checkpoint(run_dir / "ckpt.pt")
        cfg = (edm_task.Config if task == "edm" else latent_task.Config)(**saved["config"])
        row = dict(family=family, variant=name, seed=seed, params=parameters(task, cfg),
                   kimg=saved["step"] * s["batch"] / 1000, loss=final_loss(run_dir),
                   **score(npz, ref, args.network, log), cpu_minutes=cpu_minutes(task, s["batch"], s["kimg"]),
                   device=device, paper=variants[name][1])
        append_row(rows_path, row)
        say(f"{family} {name} seed {seed}: FID {row['fid']:.2f}")

    # seed-major: seed k of every variant of a family runs before seed k + 1, so a stopped run leaves complete pairs
    todo = [(f, n, k) for f in FAMILIES for k in range(args.seeds) for n in chosen[f] if (f, n, k) not in have]
    cost = sum(cpu_minutes(FAMILIES[f][0], recipe[FAMILIES[f][0]]["batch"], FAMILIES[f][2] * args.scale) for f, _, _ in todo)
    print(f"{len(todo)} runs to train and score: about {cost:.0f} min of training on 2 development cores "
          f"(runner.CPU_RATE), plus about 3 min of sampling and FID per run there", flush=True)
    if any(f == "latent" for f, _, _ in todo):
        autoencoder()
    parallel([lambda t=t: job(*t) for t in todo], args.jobs)
    wanted = {(f, n, k) for f in FAMILIES for n in chosen[f] for k in range(args.seeds)}
    order = {(f, n): i for i, (f, n) in enumerate((f, n) for f in FAMILIES for n in FAMILIES[f][3])}
    rows = sorted((r for r in current() if (r["family"], r["variant"], r["seed"]) in wanted),
                  key=lambda r: (order[r["family"], r["variant"]], r["seed"]))
    write_table(rows, args, floor["fid"])


def rows_at(rows, kimg):
    """The rows whose run saw its family's length kimg[family]: rows of another recipe (another length) stay in the
    rows file as history, and neither count as done nor enter the tables."""
    return [r for r in rows if abs(r["kimg"] - kimg[r["family"]]) < 1e-6]


def write_table(rows, args, floor):
    budget = {f: FAMILIES[f][2] * args.scale for f in FAMILIES}
    head = (f"DiffiT ablations on Fashion-MNIST (laptop scale): preset fashion, the tier's recipe, {args.seeds} seeds per "
            f"variant (paired); image space {budget['image']:g} kimg per run (EDM, Heun 18 steps = 35 NFE), latent "
            f"{budget['latent']:g} kimg (ADM, the tier's sampler); FID and KID on {args.num} samples vs {args.num} test "
            f"images; real-vs-real floor at this N: {floor:.2f}. Made by: python experiments/ablations.py "
            f"--image={args.image} --latent={args.latent} --seeds={args.seeds} --scale={args.scale:g} --num={args.num}"
            f"{' --fast' if args.fast else ''} (device: {rows[0]['device'] if rows else '-'})")
    lines = [head]
    for family in FAMILIES:
        mine = [r for r in rows if r["family"] == family]
        if not mine:
            continue
        lines += ["", f"## {family}", "", "| variant | seed | params (M) | kimg | final loss | FID | KID x1e3 | CPU min | paper |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['seed']} | {r['params'] / 1e6:.3f} | {r['kimg']:.1f} | {r['loss']:.3g} | "
                  f"{r['fid']:.2f} | {r['kid'] * 1e3:.2f} | {r['cpu_minutes']:.1f} | {r['paper']} |" for r in mine]
        comparisons = compare_to_tmsa(mine)
        if comparisons:
            lines += ["", "Mean FID over seeds with its 95% t interval, and the paired difference against TMSA (seed k of "
                      "every variant shares data order, initialisation where shapes allow, and sampling noise); "
                      "separated only when that interval excludes zero. KID: the same, on KID x1e3.", "",
                      "| variant | seeds | mean FID [95%] | FID - TMSA, paired [95%] | KID - TMSA x1e3 [95%] | verdict (FID) |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {c['variant']} | {c['seeds']} | {c['mean']:.2f} [{c['low']:.2f}, {c['high']:.2f}] | "
                      + (f"{c['diff']:+.2f} [{c['diff_low']:+.2f}, {c['diff_high']:+.2f}] | "
                         f"{c['kid_diff']:+.2f} [{c['kid_low']:+.2f}, {c['kid_high']:+.2f}] | {c['verdict']} |"
                         if c["variant"] != "tmsa" else "- | - | the baseline |") for c in comparisons]
    Path(ROOT / args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(ROOT / (args.results + ".txt")).write_text("\n".join(lines) + "\n")
    comparisons = {f: compare_to_tmsa([r for r in rows if r["family"] == f]) for f in FAMILIES}
    Path(ROOT / (args.results + ".json")).write_text(json.dumps(
        {"budget": head, "num": args.num, "floor": floor, "rows": rows,
         "comparisons": {f: [{k: finite(v) if isinstance(v, float) else v for k, v in c.items()} for c in cs]  # one seed: no interval
                         for f, cs in comparisons.items()}}, indent=1) + "\n")
    print("\n".join(lines))


def compare_to_tmsa(rows):
    """Rows of one family -> per variant: the mean FID over its seeds with a 95% interval, and the paired differences
    of FID (with the verdict) and of KID x1e3 against TMSA on the seeds both have (tools/compare.py). [] without TMSA."""
    by = {}
    for r in rows:
        by.setdefault(r["variant"], {})[r["seed"]] = r
    if "tmsa" not in by:
        return []
    out = []
    for name, seeds in by.items():
        mean, low, high = interval([r["fid"] for r in seeds.values()])
        row = dict(variant=name, seeds=len(seeds), mean=mean, low=low, high=high)
        shared = sorted(set(seeds) & set(by["tmsa"]))
        if name != "tmsa" and shared:
            diff, dlow, dhigh = paired_difference([seeds[s]["fid"] for s in shared], [by["tmsa"][s]["fid"] for s in shared])
            row.update(diff=diff, diff_low=dlow, diff_high=dhigh, verdict=verdict(dlow, dhigh))
            if all(seeds[s].get("kid") is not None and by["tmsa"][s].get("kid") is not None for s in shared):
                kd = paired_difference([seeds[s]["kid"] * 1e3 for s in shared], [by["tmsa"][s]["kid"] * 1e3 for s in shared])
                row.update(kid_diff=kd[0], kid_low=kd[1], kid_high=kd[2])
        out.append(row)
    return out


if __name__ == "__main__":
    main()
