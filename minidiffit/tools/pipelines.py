"""`python -m minidiffit fashion|cifar10|imagenet256|ablations|nfe`: the runs behind the README's results.

    bash reproduce.sh fashion --data_dir=DIR       (= python -m minidiffit fashion ..., from the repository)
    python -m minidiffit imagenet256 --help
Each pipeline is a list of stages (stages.py); each stage is one command of the package (`python -m minidiffit
...`), printed as a copyable line and then run in a subprocess, or skipped when its outputs are newer than its
inputs. Training and `prepare` always run: they resume where they stopped and return at once when done.
Paths the user types are relative to the directory they ran from; the stages run in the repository.
"""

import inspect
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from ..base.config import error_message
from .stages import caller_args, caller_path, cuda_count, fast, only_keys, score, stage, tail
from .tasks import config_from_args

ROOT = Path(__file__).resolve().parents[2]  # the repository: runs/, results/, experiments/


# ----------------------------------------------------------------------------
# The laptop tier (DESIGN.md 2b)


# The tier's recipe, in training images (kimg) so that the same command gives the same model on any machine (same
# torch build); experiments/recipe.py measured each change at a fixed number of images (results/recipe.txt).
# Choice: image space batch 16 (recipe rows e_b16 / e_b32 / e_base: at 32 kimg FID 120 / 126 / 155, KID 83 / 94 / 131
# x1e-3: at this length more, smaller steps beat larger batches), lr 1e-3 after a 0.5 kimg warm-up, no augmentation,
# EDM's EMA ramp (half-life at most 5% of the images seen). Latent batch 64 (l_b64 96.3 against 100.7 at 128; l_b32
# 94.6 is within one seed's noise and trains slower per image), the same lr and EMA, 192 kimg (l_b64_kimg192: 86.3
# against 96.3 at 96 kimg); ADM's ancestral sampler respaced to 100 steps at guidance 3 (l_b64_steps100: 96.0
# against 96.3 at 250 steps, for 2.5x less sampling; DPM-Solver++(2M) 25 steps: 144; guidance 2: 106, 4: 96.3).
# The ramp instead of DiT's 0.9999, which would keep the EMA at its initial weights through a run of a few thousand
# steps. Lengths: what fits 30 minutes with sampling and FID on 2 development cores (runner.CPU_RATE); the time the
# faster FID network (inception.fuse, 3x the img/s) and the shorter latent sampling saved went to training.
FASHION = {
    "edm": dict(batch=16, lr=1e-3, warmup_kimg=0.5, ema_halflife_kimg=500, ema_rampup=0.05, kimg=48),
    "autoencoder": dict(batch=64, lr=2e-3, kimg=48),
    "latent": dict(batch=64, lr=1e-3, ema_halflife_kimg=500, ema_rampup=0.05, kimg=192, sample=dict(steps=100, guidance=3)),
}


def fashion(args):
    """fashion [--data_dir=DIR]: both DiffiT pipelines on Fashion-MNIST through the package's real code paths, then
    FIDs with the real Inception network against the test set beside the real-vs-real floor at the same sample
    count, appended to results/fashion.txt. --data_dir= is torchvision's Fashion-MNIST root (downloaded into
    ~/.cache/minidiffit without it). MINIDIFFIT_FAST=1: a few steps of each stage into runs/fashion_fast."""
    only_keys(args, ["data_dir"])
    data_dir = [a for a in args if a != "--data_dir="][-1:]  # the last one wins, as the config parser does
    data = ["--data=fashion_mnist", *data_dir]
    out, num, net, t0, r = "runs/fashion", 500, [], time.time(), FASHION
    lat_steps, lat_guidance, where, scale, prep = r["latent"]["sample"]["steps"], r["latent"]["sample"]["guidance"], "CPU", 1, []
    if fast():
        out, num, net, lat_steps, where = "runs/fashion_fast", 20, ["--network=tiny-random"], 5, "FAST pipeline check, NOT real FIDs"
        r, prep = {k: dict(v, batch=8, kimg=2 * 8 / 1000) for k, v in r.items()}, ["--num=64"]
        print(f"== FAST: every stage for a few steps -> {out}")
    elif cuda_count() > 0:
        scale, num, where = 8, 10000, "CUDA, 8x the images and 10000 samples"
        print(f"== CUDA: the same stages for {scale}x the training images, {num} samples per FID")
    else:
        print("== no CUDA: " + ", ".join(f"{k} {v['kimg']:g} kimg" for k, v in r.items()) + f" of training, FIDs on "
              f"{num} samples (about 30 min on 2 cores)")

    def length(task):  # a fixed number of training images, not minutes: the same model on any machine
        s = r[task]
        iters = max(1, round(s["kimg"] * scale * 1000 / s["batch"]))
        return [f"--iters={iters}", f"--batch={s['batch']}", f"--lr={s['lr']}", f"--ckpt_every={max(iters // 10, 1)}",
                f"--log_every={max(iters // 50, 1)}", "--grid=0",
                *[f"--{k}={s[k]}" for k in ("warmup_kimg", "ema_halflife_kimg", "ema_rampup") if k in s]]

    edm, latent = f"{out}/edm", f"{out}/latent"
    stage(f"1/6 image space: DiffiT U-Net (preset fashion, 1 channel, TMSA), EDM recipe -> {edm}",
          ["train", "--preset=fashion", *data, f"--out={edm}", *length("edm"), "--augment_p=0"])
    stage(f"a grid of 100 samples -> {edm}/samples.png",
          ["sample", f"--ckpt={edm}/ckpt.pt", "--num_samples=100", "--nrow=10", f"--out={edm}/samples.png",
           "--overwrite=true"], inputs=[f"{edm}/ckpt.pt"], outputs=[f"{edm}/samples.png"])
    stage(f"2/6 latent space: a small autoencoder (32x32x1 -> 8x8x4), its scale measured as 1/std -> {out}/ae",
          ["autoencoder", *data, f"--out={out}/ae", *length("autoencoder")])
    stage(f"3/6 prepare: its latents of the training set, both flips, shards + manifest -> {out}/latents",
          ["imagenet", "prepare", *data, f"--out={out}/latents", f"--vae={out}/ae/ckpt.pt", "--num_workers=0",
           "--batch=256", *prep])
    stage(f"4/6 latent DiffiT (preset fashion), class labels with dropout 0.1, ADM diffusion, learned variance -> {latent}",
          ["train", "--task=latent", "--preset=fashion", f"--data_dir={out}/latents", f"--out={latent}", *length("latent")])
    # column c holds class c; the sweep uses the same seeds (same noise, same classes) at guidance 1 and 4
    for name, n, guidance in [("samples", 100, []), ("guidance_1", 30, ["--guidance=1"]), ("guidance_4", 30, ["--guidance=4"])]:
        stage(f"a grid of {n} samples -> {latent}/{name}.png",
              ["sample", f"--ckpt={latent}/ckpt.pt", f"--num_samples={n}", "--nrow=10", f"--steps={lat_steps}", *guidance,
               f"--out={latent}/{name}.png", "--overwrite=true"], inputs=[f"{latent}/ckpt.pt"], outputs=[f"{latent}/{name}.png"])

    stage(f"5/6 samples for FID: {num} of the image-space model",
          ["sample", f"--ckpt={edm}/ckpt.pt", f"--num_samples={num}", "--batch=100", f"--out={edm}/samples_{num}.npz",
           "--overwrite=true"], inputs=[f"{edm}/ckpt.pt"], outputs=[f"{edm}/samples_{num}.npz"])
    stage(f"5/6 samples for FID: {num} of the latent model",
          ["sample", f"--ckpt={latent}/ckpt.pt", f"--num_samples={num}", "--batch=100", f"--steps={lat_steps}",
           f"--guidance={lat_guidance}", f"--out={latent}/samples_{num}.npz", "--overwrite=true"], inputs=[f"{latent}/ckpt.pt"],
          outputs=[f"{latent}/samples_{num}.npz"])

    ref = f"{out}/fid/test_{num}.npz"
    for split in ("train", "test"):
        stage(f"6/6 Inception statistics of {num} {split} images -> {out}/fid/{split}_{num}.npz",
              ["fid", "ref", *data, f"--split={split}", f"--num={num}", f"--out={out}/fid/{split}_{num}.npz",
               "--save_features=true", *net],  # features: KID and precision/recall beside FID
              outputs=[f"{out}/fid/{split}_{num}.npz"])
    results = f"{out}/results.txt" if fast() else "results/fashion.txt"
    Path(results).parent.mkdir(parents=True, exist_ok=True)
    for what, samples in [("fashion floor: Fashion-MNIST train vs test", f"{out}/fid/train_{num}.npz"),
                          (f"fashion image-space DiffiT, {edm}, Heun 18 steps (35 NFE)", f"{edm}/samples_{num}.npz"),
                          (f"fashion latent DiffiT, {latent}, {lat_steps} ancestral steps, guidance {lat_guidance:g}",
                           f"{latent}/samples_{num}.npz")]:
        score(f"6/6 FID vs {num} test images: {what}", samples, ref, results, f"{what}, N={num} [{where}]", f"{out}/fid", net)
    s = round(time.time() - t0)
    summary = fashion_summary(results, {"image": edm, "autoencoder": f"{out}/ae", "latent": latent}, wall_s=s)
    Path(results).with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"== done in {s // 60} min {s % 60} s: grids {edm}/samples.png, {latent}/samples.png, "
          f"{latent}/guidance_{{1,4}}.png; FIDs in {results}, a summary in {Path(results).with_suffix('.json')}")
    tail(results, 3)


FID_LINE = re.compile(r"FID ([0-9.]+)(?:\s+KID ([-0-9.e]+) \+- ([0-9.e]+))?.*?  (fashion (floor|image-space|latent)\S*)")


def fashion_summary(results, runs=None, wall_s=None):
    """The tier's numbers in one JSON (the README and notebooks quote them from it; tests/test_quotes.py holds them
    equal): the last FID (and KID) line of each model in `results`, and, for each run folder in `runs` that
    exists, its steps, images, training minutes and rate, and the autoencoder's scale and test PSNR."""
    summary = {}
    for line in Path(results).read_text().splitlines():
        m = FID_LINE.search(line)
        if m:
            key = {"floor": "floor", "image-space": "image", "latent": "latent"}[m[5]]
            summary[key] = dict(fid=float(m[1]), **({"kid": float(m[2]), "kid_std": float(m[3])} if m[2] else {}))
    for key, folder in (runs or {}).items():
        ckpt = Path(folder) / "ckpt.pt"
        if ckpt.is_file():
            saved = torch.load(ckpt, map_location="cpu", weights_only=False)
            kimg = saved["step"] * saved["config"]["batch"] / 1000
            facts = dict(steps=saved["step"], kimg=round(kimg, 3), train_minutes=round(saved["elapsed_s"] / 60, 2),
                         img_per_s=round(kimg * 1000 / max(saved["elapsed_s"], 1e-9), 1))
            facts.update({k: round(saved[k], 5) for k in ("scale", "psnr") if saved.get(k) is not None})
            summary.setdefault(key, {}).update(facts)
    if wall_s is not None:
        summary["wall_minutes"] = round(wall_s / 60, 1)  # this invocation: skipped stages cost nothing
    return summary


def ablations(args):
    """ablations [--data_dir=DIR] [--image=a,b] [--latent=a,b] [--seeds=K] [--scale=X] [--jobs=J]: the paper's ablations
    in both families (how time enters the U-Net's and the latent transformer's blocks), paired seeds,
    experiments/ablations.py."""
    only_keys(args, ["data_dir", "image", "latent", "seeds", "scale", "jobs"])
    if fast():
        print("== FAST: two image variants and one latent, 2 steps each, N = 16, tiny random FID network (NOT real FIDs)"
              " -> runs/ablations_fast")
        args = ["--image=tmsa,bias", "--latent=tmsa", "--seeds=1", *args, "--fast", "--num=16", "--network=tiny-random",
                "--out=runs/ablations_fast", "--results=runs/ablations_fast/results"]
    elif cuda_count() == 0:
        print("== no CUDA: the default variants of both families, 3 seeds each, on the CPU (about 3 h on 2 cores)")
    stage("train, sample and score every variant and seed (finished runs are only scored)",
          ["experiments/ablations.py", *args])


def nfe(args):
    """nfe: after fashion, FID against network evaluations for every sampler of both models (experiments/fid_vs_nfe.py)."""
    if args:
        raise ValueError("takes no options (it reads runs/fashion)")
    if fast():
        print("== FAST: two samplers per model on runs/fashion_fast, N = 20, tiny random FID network (NOT real FIDs)")
    stage("FID against NFE, every sampler of both models (points already scored are kept)",
          ["experiments/fid_vs_nfe.py", *(["--smoke"] if fast() else [])])


# ----------------------------------------------------------------------------
# The paper's runs: CIFAR-10 (image space) and ImageNet-256 (latent), with a CPU stand-in for each


def cifar10(args):
    """cifar10 [--data_dir=DIR] [--key=value ...]: DiffiT App. I.1 with EDM's recipe. CUDA: the paper's preset for
    200k steps of 512 (torchrun over several GPUs), 50k samples, FID vs the training set into results/cifar10.txt.
    No CUDA: the CPU tier (preset small, --minutes=30) and a grid. --key=value overrides the training settings
    (--iters=, --minutes=, --data_dir=, --out=, ...); every key is checked before the first stage."""
    ngpu = cuda_count()
    if ngpu > 0:
        defaults = ["--preset=cifar10", "--data=cifar10", "--out=runs/cifar10", "--iters=200000", "--batch=512"]
    else:
        # Choice: CPU-tier settings (batch 32, short lr warm-up, no augmentation) so that a half-hour run
        # learns something; the EDM schedule (10 Mimg warm-up) would keep the lr near zero all along.
        defaults = ["--preset=small", "--data=cifar10", "--out=runs/cifar10_cpu", "--minutes=30", "--batch=32",
                    "--warmup_kimg=0.5", "--augment_p=0", "--ckpt_every=200", "--log_every=10", "--grid=16"]
    given = {a.split("=", 1)[0] for a in args}
    train_args = [*[d for d in defaults if d.split("=", 1)[0] not in given], *args]  # a key once: the copyable line
    cfg = config_from_args(train_args)  # every key checked before the first stage
    out, ckpt = cfg.out, f"{cfg.out}/ckpt.pt"
    if ngpu == 0:
        stage(f"no CUDA: CPU tier, preset {cfg.preset} for a bounded time (--minutes=, default 30) -> {out}",
              ["train", *train_args])
        stage(f"64 samples, 18 Heun steps (35 network evaluations), EMA weights -> {out}/samples.png",
              ["sample", f"--ckpt={ckpt}", "--num_samples=64", "--steps=18", "--batch=64", f"--out={out}/samples.png",
               "--overwrite=true"], inputs=[ckpt], outputs=[f"{out}/samples.png"])
        return
    stage(f"CUDA, {ngpu} GPU(s): preset {cfg.preset}, EDM recipe -> {out}", ["train", *train_args], gpus=ngpu)
    stage(f"50k samples, 18 Heun steps (35 network evaluations), EMA weights -> {out}/samples (resumes)",
          ["sample", f"--ckpt={ckpt}", "--num_samples=50000", "--steps=18", "--batch=500", f"--out={out}/samples"],
          gpus=ngpu)
    ref = "runs/fid_refs/cifar10_train.npz"
    stage(f"Inception statistics of the training set -> {ref}",
          ["fid", "ref", "--data=cifar10", *([f"--data_dir={cfg.data_dir}"] if cfg.data_dir else []), f"--out={ref}"],
          outputs=[ref])
    Path("results").mkdir(exist_ok=True)
    score("FID of the 50k samples vs the training set", f"{out}/samples", ref, "results/cifar10.txt",
          f"cifar10 ckpt={ckpt} samples=50000 nfe=35", stamps=out)
    tail("results/cifar10.txt", 1)


ADM_REF = "runs/fid_refs/VIRTUAL_imagenet256_labeled.npz"
ADM_REF_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz"


def imagenet256(args):
    """imagenet256 DATA_DIR [--ref=ADM_REF.npz] [--key=value ...] | --weights FILE: DiffiT Sec. 4 and App. I.2 with
    the latent DiffiT (minidiffit/tools/latent_task.py). prepare -> runs/imagenet256/latents (SD VAE latents, both
    flips), train -> ckpt.pt (XL/2, lr 3e-4, batch 256, EMA 0.9999), sample -> samples_50k.npz (50k class-balanced
    images, guidance, 250 steps), FID/precision/recall vs ADM's reference batch -> results/imagenet256.txt.
    --weights FILE: sample and evaluate a released checkpoint only. Other --key=value go to the training (--iters=).
    No CUDA: prints what it would run, then a FAST-sized version of every stage on synthetic images."""
    data_dir, weights, ref, train_args = "", "", ADM_REF, []
    while args:
        a, args = args[0], args[1:]
        if a in ("--weights", "--ref"):
            if not args:
                raise ValueError(f"{a} needs a file")
            a, args = f"{a}={caller_path(args[0])}", args[1:]
        if a.startswith("--weights="):
            weights = a.split("=", 1)[1]
        elif a.startswith("--ref="):
            ref = a.split("=", 1)[1]
        elif a.startswith("--") and "=" in a:
            train_args.append(a)
        elif a.startswith("-"):
            raise ValueError(f"unknown option '{a}' (use --key=value)")
        else:
            data_dir = caller_path(a)
    # Every training key is checked now, before the prepare stage (hours of VAE encoding on a GPU box).
    config_from_args(["--task=latent", "--out=runs/imagenet256", *train_args])
    ngpu = cuda_count()
    if ngpu > 0:
        if not data_dir and not weights:
            raise ValueError("pass DATA_DIR (ImageNet's train folder, one subfolder per class) or --weights FILE")
        imagenet256_stages(ngpu, data_dir, weights, ref, train_args)
    else:
        print("== no CUDA. With GPUs this command would run (N = number of GPUs):")
        imagenet256_stages("N", data_dir or "DATA_DIR", weights, ref, train_args, run=False)
        print("== now a FAST-sized version of every stage on synthetic images (tiny model, tiny random VAE, CPU)")
        imagenet256_fast(train_args)


def imagenet256_stages(gpus, data_dir, weights, ref, train_args, run=True):
    """The GPU stages; run=False only prints them."""
    out = "runs/imagenet256_released" if weights else "runs/imagenet256"
    ckpt, samples = f"{out}/ckpt.pt", f"{out}/samples_50k.npz"
    source = f"--weights={weights}" if weights else f"--ckpt={ckpt}"
    if not weights:
        stage(f"prepare: ADM center crop to 256, SD VAE (sd-vae-ft-ema) latents, both flips -> {out}/latents",
              ["imagenet", "prepare", f"--data_dir={data_dir}", f"--out={out}/latents", "--image_size=256"],
              gpus=gpus, run=run)
        stage(f"train: XL/2, lr 3e-4, batch 256, EMA 0.9999, bf16 + compile (resumes {ckpt})",
              ["train", "--task=latent", "--preset=XL/2", f"--data_dir={out}/latents", f"--out={out}", *train_args],
              gpus=gpus, run=run)
    stage(f"sample: 50k images (image i: seed i, class i % 1000), guidance, 250 steps x 2 evaluations -> {samples}",
          ["sample", source, "--num_samples=50000", "--steps=250", "--batch=64", f"--out={samples}", "--overwrite=true"],
          inputs=[] if weights else [ckpt], outputs=[samples], gpus=gpus, run=run)
    if run and not os.path.isfile(ref):
        raise ValueError(f"ADM's reference batch {ref} is missing. Download it (1.5 GB) with\n"
             f"  mkdir -p {os.path.dirname(ref)} && curl -L -o {ref} {ADM_REF_URL}\n"
             f"or pass --ref=PATH. The samples are in {samples}.")
    tag = f"imagenet256 {source} samples=50000 steps=250 nfe=500 (guidance doubles the batch)"
    if not run:
        stage(f"FID, precision, recall vs ADM's reference batch {ref}",
              ["fid", f"--samples={samples}", f"--ref={ref}", "--results=results/imagenet256.txt", f"--tag={tag}"], run=False)
        return
    Path("results").mkdir(exist_ok=True)
    score(f"FID, precision, recall vs ADM's reference batch {ref}", samples, ref, "results/imagenet256.txt", tag, out)
    tail("results/imagenet256.txt", 1)


def imagenet256_fast(train_args):
    """The same stages at toy size: 40 synthetic 64 px images in 10 classes, the tiny preset, the tiny random VAE, a
    few training steps (then a resume), 20 samples, and a "FID" from a tiny random network (NOT a real FID)."""
    out, env = "runs/imagenet256_fast", {"MINIDIFFIT_FAST": "1"}
    ckpt, images = f"{out}/run/ckpt.pt", f"{out}/images"
    stage(f"40 synthetic images in 10 classes -> {images}",
          ["imagenet", "synthetic", f"--out={images}", "--num_classes=10", "--per_class=4", "--size=64"],
          outputs=[images], env=env)
    stage(f"prepare: the tiny random VAE's latents -> {out}/latents",
          ["imagenet", "prepare", f"--data_dir={images}", f"--out={out}/latents", "--image_size=64", "--vae=tiny",
           "--batch=20", "--shard_size=16", "--num_workers=0"], env=env)
    train = ["train", "--task=latent", "--preset=tiny", f"--data_dir={out}/latents", f"--out={out}/run", "--batch=8",
             "--lr=1e-3", "--ema_halflife_kimg=0.05", "--ckpt_every=10", "--log_every=10", "--grid=4",
             "--sample_steps=10", "--compile=false"]
    stage(f"train the tiny preset for 10 steps -> {out}/run", [*train, "--iters=10", *train_args], env=env)
    stage("resume the run for 10 more steps", [*train, "--iters=20", *train_args], env=env)
    stage(f"sample 20 images (25 steps, guidance) -> {out}/samples.npz",
          ["sample", f"--ckpt={ckpt}", "--num_samples=20", "--steps=25", "--batch=10", f"--out={out}/samples.npz",
           "--overwrite=true"], inputs=[ckpt], outputs=[f"{out}/samples.npz"], env=env)
    stage(f"the released-weights path: export the EMA as safetensors -> {out}/tiny.safetensors",
          ["export", f"--ckpt={ckpt}", f"--out={out}/tiny.safetensors"], inputs=[ckpt],
          outputs=[f"{out}/tiny.safetensors"], env=env)
    stage(f"sample the exported weights with --weights -> {out}/samples_weights.npz",
          ["sample", f"--weights={out}/tiny.safetensors", "--num_samples=20", "--steps=25", "--batch=10",
           f"--out={out}/samples_weights.npz", "--overwrite=true"], inputs=[f"{out}/tiny.safetensors"],
          outputs=[f"{out}/samples_weights.npz"], env={**env, "MINIDIFFIT_VAE": "tiny"})
    stage(f"reference statistics of the synthetic images -> {out}/ref.npz",
          ["imagenet", "reference", f"--data_dir={images}", f"--out={out}/ref.npz", "--image_size=64"],
          inputs=[images], outputs=[f"{out}/ref.npz"], env=env)
    for s in ("samples", "samples_weights"):
        stage(f"tiny random features of {out}/{s}.npz -> {out}/results_{s}.txt",
              ["fid", f"--samples={out}/{s}.npz", f"--ref={out}/ref.npz", "--network=tiny-random",
               f"--results={out}/results_{s}.txt", f"--tag=FAST CPU pipeline check ({s}), NOT a real FID"],
              inputs=[f"{out}/{s}.npz", f"{out}/ref.npz"], outputs=[f"{out}/results_{s}.txt"], env=env)
    print(f"== FAST pipeline done: every stage ran or was up to date; {out}/results_*.txt (tiny random features, NOT a real FID)")


PIPELINES = {"fashion": fashion, "cifar10": cifar10, "imagenet256": imagenet256, "ablations": ablations, "nfe": nfe}


def main(argv):
    """argv: [pipeline name, its arguments...] (minidiffit/__main__.py passes the name first)."""
    name, args = argv[0], argv[1:]
    if any(a in ("-h", "--help") for a in args):
        print("usage: python -m minidiffit " + inspect.cleandoc(PIPELINES[name].__doc__))
        return
    args = caller_args(args)
    os.chdir(ROOT)  # the stages write runs/ and results/ of the repository, wherever the user ran from
    try:
        PIPELINES[name](args)
    except ValueError as e:  # a bad option or setting, a missing file: one line, as run_command says it
        print(f"minidiffit {name}: error: {error_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)  # the stage's command has said where it stopped; a rerun resumes there
