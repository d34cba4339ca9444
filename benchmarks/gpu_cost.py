"""What the CUDA commands cost, on paper: wall-clock on A100 and H100 and peak memory per GPU, computed, not guessed.

    python benchmarks/gpu_cost.py            # prints the table; --write also writes results/gpu_cost.md (the README's)

No GPU has run these commands yet, so each time is an estimate built from three things:
  1. FLOPs per image, measured with torch.utils.flop_counter on the real modules (on the meta device: shapes
     only, seconds on a CPU): the network forward; training counts 3x (forward + backward), sampling 1x per
     network evaluation, as model-FLOPs utilisation (MFU) is defined.
  2. An MFU from a public measurement: fast-DiT (github.com/chuanyangjin/fast-DiT, README, "Improved Training
     Performance") trains DiT-XL/2 at 256 px at 0.84 steps/s of batch 128 on one A100 (fp16, pre-extracted
     latents, gradient checkpointing). DiT-XL/2's forward is the same skeleton as our XL/2 (237 GFLOP measured
     here; DiT's table says 118.6 "Gflops", multiply-adds), so that is 0.84 x 128 x 3 x 237 GFLOP / 312 TFLOP/s
     = ~24% of the A100's dense bf16/fp16 peak. We assume the same MFU for every command and for the H100
     (989 TFLOP/s dense bf16): an assumption, stated. The small image-space U-Nets (16-token windows, 32 px)
     will reach a lower MFU than a 1152-wide transformer: their times are optimistic. `bash reproduce.sh gpu-check`
     measures the real rate on your card.
  3. Peak memory per GPU for training: fp32 weights, gradients, Adam's two moments and the EMA (20 bytes per
     parameter), plus the activations autograd saves for the backward pass, measured on the CPU under bf16
     autocast as on CUDA (bytes of the distinct tensors saved, per image; the XL/2 transformer is measured at
     depth 1 and 2 and extrapolated linearly to 28 blocks, which is exact for identical blocks), times the
     per-GPU batch. Not included: the CUDA context and allocator slack (~1-3 GB).
Several GPUs divide the time by their count (data parallel, as DDP scales at these batch sizes: an assumption).
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from minidiffit.diffusion import EDMPrecond
from minidiffit.latent import LATENT_PRESETS, LatentDiffiT
from minidiffit.tools.gpucheck import MFU, PEAKS, forward_flops  # the constants and counter gpu-check measures against
from minidiffit.unet import UNET_PRESETS, DiffiTUNet

ROOT = Path(__file__).resolve().parents[1]
PEAK = {card: PEAKS[card] for card in ("A100", "H100")}  # dense bf16 FLOP/s, NVIDIA's A100 / H100 SXM data sheets
IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k's training set


# ----------------------------------------------------------------------------
# Measurements


def saved_bytes(model, *inputs):
    """Bytes autograd keeps for the backward pass, per image, under bf16 autocast on the CPU: every distinct
    storage that a saved tensor points at, counted once, parameters excluded (they are counted as weights)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(*inputs)
    return sum(storages.values()) / len(inputs[0])


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def unet(preset, batch=2):
    """(forward FLOPs per image, saved bytes per image, parameters) of the EDM-wrapped DiffiT U-Net `preset`."""
    cfg = UNET_PRESETS[preset]
    shape = (batch, cfg.in_channels, cfg.img_resolution, cfg.img_resolution)
    with torch.device("meta"):
        net = EDMPrecond(DiffiTUNet(cfg))
        flops = forward_flops(net, torch.randn(shape), torch.full((batch,), 1.0))
    torch.manual_seed(0)
    net = EDMPrecond(DiffiTUNet(cfg)).train()
    return flops, saved_bytes(net, torch.randn(shape), torch.full((batch,), 1.0)), num_params(net)


def latent_model(preset="XL/2", batch=1):
    """(forward FLOPs per image, saved bytes per image, parameters) of LatentDiffiT `preset`; activations fitted
    from depth 1 and 2 (one block's bytes and the rest), then extended to the preset's depth."""
    cfg = LATENT_PRESETS[preset]
    n = cfg.input_size
    inputs = lambda: (torch.randn(batch, cfg.in_channels, n, n), torch.randint(0, 1000, (batch,)),  # noqa: E731
                      torch.randint(0, cfg.num_classes, (batch,)))
    with torch.device("meta"):
        model = LatentDiffiT(cfg)
        flops, params = forward_flops(model, *inputs()), num_params(model)
    torch.manual_seed(0)
    one, two = (saved_bytes(LatentDiffiT(dataclasses.replace(cfg, depth=d)).train(), *inputs()) for d in (1, 2))
    return flops, (two - one) * cfg.depth + (2 * one - two), params


def sd_vae_flops(size=256):
    """(encoder, decoder) FLOPs per image of Stable Diffusion's VAE (sd-vae-ft-ema's layout) at `size` px."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=size)
        enc = forward_flops(lambda x: vae.encode(x).latent_dist.mean, torch.randn(1, 3, size, size))
        dec = forward_flops(lambda z: vae.decode(z).sample, torch.randn(1, 4, size // 8, size // 8))
    return enc, dec, num_params(vae)


def inception_flops():
    """FLOPs per image of the FID network (Inception-v3 at 299 px, resize included)."""
    from minidiffit.base.inception import InceptionV3FID

    with torch.device("meta"):
        net = InceptionV3FID()
        return forward_flops(net, torch.zeros(1, 3, 299, 299)), num_params(net)


# ----------------------------------------------------------------------------
# The table


def hours(flops, gpus, card):
    return flops / (PEAK[card] * MFU * gpus) / 3600


def fmt_h(h):
    if h * 60 < 1:
        return "< 1 min"
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} days"


def rows():
    cifar, ffhq, xl = unet("cifar10"), unet("ffhq64"), latent_model("XL/2")
    vae_enc, vae_dec, vae_params = sd_vae_flops()
    inc, inc_params = inception_flops()
    gb = lambda b: f"{b / 2**30:.0f} GB" if b >= 2**30 else f"{b / 2**30:.1f} GB"  # noqa: E731
    # Sampling and feature extraction keep no activations for a backward pass: their peak is the weights plus the
    # largest few activations of one batch, not measured here (small next to training's).
    weights = lambda *params: f"weights {gb(4 * sum(params))} + one batch's activations"  # noqa: E731

    def train_mem(model, per_gpu_batch):
        _, act, params = model
        return gb(20 * params + act * per_gpu_batch)

    fid_50k = 50_000 * inc  # the samples; reference statistics are computed once
    out = []

    def add(command, what, flops, gpus, memory):
        out.append((command, what, f"{flops / 1e18:.3g}", gpus,
                    fmt_h(hours(flops, gpus, "A100")), fmt_h(hours(flops, gpus, "H100")), memory))

    for gpus in (1, 8):
        add("cifar10", f"train: cifar10 preset, 200k steps x 512 = 102 Mimg ({cifar[0] / 1e9:.2f} GFLOP/img fwd)",
            102.4e6 * 3 * cifar[0], gpus, train_mem(cifar, 512 // gpus))
    add("cifar10", "sample 50k, Heun 18 steps (35 NFE) + FID", 50_000 * 35 * cifar[0] + fid_50k + 50_000 * inc, 8,
        weights(cifar[2], inc_params))
    add("ffhq64 (train --preset=ffhq64)", f"train: 200k steps x 256 = 51 Mimg ({ffhq[0] / 1e9:.2f} GFLOP/img fwd)",
        51.2e6 * 3 * ffhq[0], 8, train_mem(ffhq, 256 // 8))
    add("ffhq64", "sample 50k, Heun 40 steps (79 NFE) + FID", 50_000 * 79 * ffhq[0] + 2 * fid_50k, 8,
        weights(ffhq[2], inc_params))
    add("imagenet256 prepare", f"SD VAE encoder, {IMAGENET_TRAIN:,d} images x 2 flips ({vae_enc / 1e9:.0f} GFLOP/img)",
        2 * IMAGENET_TRAIN * vae_enc, 8, weights(vae_params))
    add("imagenet256 train", f"XL/2, 400k steps x 256 = 102 Mimg ({xl[0] / 1e9:.0f} GFLOP/img fwd)",
        102.4e6 * 3 * xl[0], 8, train_mem(xl, 256 // 8))
    sample = 50_000 * 250 * 2 * xl[0] + 50_000 * vae_dec  # guidance doubles the batch: 2 forwards per step
    add("imagenet256 sample", f"50k, 250 steps x 2 (guidance) + SD VAE decoder ({vae_dec / 1e9:.0f} GFLOP/img)",
        sample, 8, weights(xl[2], vae_params))
    add("imagenet256 evaluate", "FID/precision/recall: 50k samples + 10k reference images through Inception",
        60_000 * inc, 1, weights(inc_params))
    add("imagenet256 --weights (released)", "sample 50k + evaluate, as the two rows above", sample + 60_000 * inc, 8,
        weights(xl[2], vae_params, inc_params))
    return out, {"cifar10": cifar, "ffhq64": ffhq, "XL/2": xl, "inception": inc, "vae": (vae_enc, vae_dec)}


def table():
    out, _ = rows()
    lines = [f"MFU {MFU:.1%} (fast-DiT's DiT-XL/2 on an A100, assumed for every row and card); peaks: A100 312, "
             "H100 989 TFLOP/s dense bf16; memory = 20 bytes/parameter + bf16 saved activations x per-GPU batch.",
             "",
             "| command | what | EFLOP | GPUs | A100 | H100 | peak memory per GPU |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {c} | {w} | {f} | {g} | {a} | {h} | {m} |" for c, w, f, g, a, h, m in out]
    lines += ["", "What to expect along the way (published numbers, not ours): DiT-XL/2 reaches FID 19.5 at 400k steps "
              "without guidance (DiT Table 4; fast-DiT's PyTorch rerun 18.1), DiffiT reports 1.73 with guidance; EDM "
              "trains CIFAR-10 for 200 Mimg to FID ~2 (DiffiT 1.95 with its own 200k x 512 = 102 Mimg, App. I.1)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="also write results/gpu_cost.md (what the README quotes)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    text = table()
    print(text, end="")
    if args.write:
        (ROOT / "results" / "gpu_cost.md").write_text(text)
        print("wrote results/gpu_cost.md", file=sys.stderr)


if __name__ == "__main__":
    main()
