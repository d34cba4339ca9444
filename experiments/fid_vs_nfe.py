"""FID against network evaluations (NFE) for every sampler of both laptop-tier models.

    bash reproduce.sh fashion                    # first: the trained runs and the test-set reference
    python experiments/fid_vs_nfe.py              # ~25 min on 2 CPU cores: N = 500 samples per point
    python experiments/fid_vs_nfe.py --smoke      # FAST check of the script (FAST runs, tiny-random network)

For each (model, sampler, steps) it samples the same seeds 0..N-1 with `minidiffit.tools.sample` into
RUN/nfe/*.npz (kept: a rerun only scores what is missing), scores them with `minidiffit.fid` against
RUN/fid/test_N.npz, and writes results/fid_vs_nfe.json (one record per point), a table on stdout and
docs/fid_vs_nfe.png. Cost is NFE: wall-clock is proportional to it for a given model. NFE counts network evaluations per image; the
latent model's guided evaluation runs a doubled batch ([y, null]) and counts once, as is usual.
"""

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from minidiffit.tools.evaluate import EvalConfig, evaluate  # noqa: E402
from minidiffit.tools.sample import SampleConfig, sample  # noqa: E402

# (model, sampler, steps): the paper's samplers are EDM Heun (18 steps = 35 NFE on CIFAR-10) and 250 ancestral steps
POINTS = ([("edm", "heun", s) for s in (3, 5, 10, 18)] + [("edm", "dpm++2m", s) for s in (5, 10, 20)]
          + [("latent", "ancestral", s) for s in (10, 20, 50, 250)] + [("latent", "ddim", s) for s in (10, 20)]
          + [("latent", "dpm++2m", s) for s in (5, 10, 20)])
DEFAULT = {"edm": ("heun", 18), "latent": ("ancestral", 250)}  # reproduce.sh fashion's own samples_N.npz use these


def nfe(sampler, steps):
    return 2 * steps - 1 if sampler == "heun" else steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/fashion", help="reproduce.sh fashion's output folder")
    p.add_argument("--num", type=int, default=500, help="samples per point (the reference RUN/fid/test_NUM.npz must exist)")
    p.add_argument("--out", default="results/fid_vs_nfe.json")
    p.add_argument("--figure", default="docs/fid_vs_nfe.png")
    p.add_argument("--smoke", action="store_true", help="runs/fashion_fast, N = 20, two points per model, tiny-random FID net")
    args = p.parse_args()
    points, network = POINTS, ""
    if args.smoke:
        args.run, args.num, network = "runs/fashion_fast", 20, "tiny-random"
        args.out, args.figure = f"{args.run}/fid_vs_nfe.json", f"{args.run}/fid_vs_nfe.png"
        points = [("edm", "heun", 2), ("edm", "dpm++2m", 3), ("latent", "ancestral", 3), ("latent", "dpm++2m", 3)]
    run, ref = Path(args.run), Path(args.run) / "fid" / f"test_{args.num}.npz"
    for need in [ref, run / "fid" / f"train_{args.num}.npz", run / "edm" / "ckpt.pt", run / "latent" / "ckpt.pt"]:
        if not need.is_file():
            raise SystemExit(f"fid_vs_nfe: {need} is missing; run `bash reproduce.sh fashion` first")
    records = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else []
    if not any(r["model"] == "floor" and r["num"] == args.num for r in records):  # real vs real at the same N
        floor = evaluate(EvalConfig(samples=str(run / "fid" / f"train_{args.num}.npz"), ref=str(ref), network=network, pr=False))
        records.append(dict(model="floor", sampler="train vs test images", steps=0, nfe=0, num=args.num, fid=round(floor, 3)))
    done = {(r["model"], r["sampler"], r["steps"], r["num"]) for r in records}
    for model, sampler, steps in points:
        if (model, sampler, steps, args.num) in done:
            continue
        ckpt, npz = run / model / "ckpt.pt", run / "nfe" / f"{model}_{sampler}_{steps}_{args.num}.npz"
        made = run / model / f"samples_{args.num}.npz"  # the same seeds, model and sampler: reused, not made again
        if DEFAULT[model] == (sampler, steps) and made.is_file() and made.stat().st_mtime > ckpt.stat().st_mtime:
            npz = made
        else:
            sample(SampleConfig(ckpt=str(ckpt), num_samples=args.num, out=str(npz), steps=steps, sampler=sampler,
                                batch=100, overwrite=True), log=lambda *a: None)
        fid = evaluate(EvalConfig(samples=str(npz), ref=str(ref), network=network, pr=False))
        records.append(dict(model=model, sampler=sampler, steps=steps, nfe=nfe(sampler, steps), num=args.num,
                            fid=round(fid, 3)))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")  # after every point: a kill loses one

    print(f"\n| model | sampler | steps | NFE | FID (N={args.num}) |\n|---|---|---|---|---|")
    for r in sorted(records, key=lambda r: (r["model"] == "floor", r["model"], r["sampler"], r["nfe"])):
        print(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['fid']:.1f} |")
    plot(records, args.num, args.figure)
    print(f"wrote {args.out}, {args.figure}")


def plot(records, num, path):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    floor = [r["fid"] for r in records if r["model"] == "floor" and r["num"] == num]
    for ax, model in zip(axes, ("edm", "latent")):
        if floor:
            ax.axhline(floor[0], color="grey", ls="--", label="real vs real")
        for sampler in sorted({r["sampler"] for r in records if r["model"] == model}):
            pts = sorted((r["nfe"], r["fid"]) for r in records if r["model"] == model and r["sampler"] == sampler)
            ax.plot(*zip(*pts), "o-", label=sampler)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("network evaluations per image (NFE)")
        ax.set_title({"edm": "image space (EDM)", "latent": "latent (ADM, guided)"}[model])
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"FID (N = {num})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)


if __name__ == "__main__":
    main()
