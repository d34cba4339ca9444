"""minidiffit next to diffusers: parameters, FLOPs, training and sampling speed of each model and its peer.

    python benchmarks/peers.py               # S/2, B/2 (256 px latents), fashion / small U-Nets: ~5 min, 2 idle cores
    python benchmarks/peers.py --smoke       # tiny presets, 2 short rounds: checks the script runs (< 1 minute)
    python benchmarks/peers.py --rounds 9 --pairs S/2,fashion   # more rounds (a steadier median), some pairs

Pairs (`experiments/peer_models.py`): LatentDiffiT S/2 and B/2 against diffusers' DiT of the same shape (32x32x4
latents, 1000 classes), DiffiTUNet `fashion` and `small` against a UNet2DModel of the same parameter budget.
Rounds interleave a pair (round r times A then B, the next round B then A), so drifts in the machine's speed
hit both alike; every figure is the median over rounds, after one untimed warm-up call that also sets how many
steps make one timing (about --seconds). Training = forward + backward + Adam step, on the EDM loss for the
U-Nets (EDMPrecond) and an MSE on the output for the latent models; float32 on the CPU, bf16 autocast + fused
Adam + TF32 on CUDA. Sampling = one network evaluation (NFE) under no_grad. GFLOP per image: torch's
FlopCounterMode on one image (a multiply-add is 2 FLOPs; attention through SDPA's math path so it is counted;
DiT's paper counts multiply-adds, its 6.06 "Gflops" for S/2 read ~12 here). Training GFLOP/s = 3 x forward
GFLOP x images/s (backward ~ 2 forwards). Prints a markdown table with the device name; asserts nothing.
"""

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minidiffit.base.runtime import num_parameters
from minidiffit.diffusion import EDMPrecond, edm_loss
from minidiffit.latent import LATENT_PRESETS, LatentDiffiT
from minidiffit.tools.peers import DiffusersDiT, unet2d_like
from minidiffit.unet import UNET_PRESETS, DiffiTUNet

from common import clock, cuda, device, name  # benchmarks/common.py (the script's own folder is on sys.path)


p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--smoke", action="store_true", help="tiny presets, 2 short rounds (CPU check of the script)")
p.add_argument("--rounds", type=int, default=7, help="timed rounds per pair; the table shows the medians")
p.add_argument("--seconds", type=float, default=1.0, help="about how long one timing runs (whole steps, at least 1)")
p.add_argument("--pairs", default="S/2,B/2,fashion,small", help="comma-separated subset of S/2,B/2,fashion,small")
args = p.parse_args()

rounds, seconds = (2, 0.2) if args.smoke else (args.rounds, args.seconds)


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()


class Entry:
    """One model on the bench: `inputs(b)` makes a batch, `forward(model, batch)` one NFE, `loss(model, batch)`."""

    def __init__(self, label, model, batch, inputs, forward, loss):
        self.label, self.batch, self.inputs, self.forward, self.loss = label, batch, inputs, forward, loss
        self.params = num_parameters(model)
        self.model = model.to(device)
        self.opt = torch.optim.Adam([q for q in self.model.parameters() if q.requires_grad], lr=1e-4, fused=cuda)
        self.data = inputs(batch)
        self.train_s, self.sample_s = [], []
        self.gflop = self.count_gflop()

    @torch.no_grad()
    def count_gflop(self):
        self.model.eval()
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math SDPA: counted matmuls
            self.forward(self.model, self.inputs(1))
        return counter.get_total_flops() / 1e9

    def train_step(self):
        with autocast():
            loss = self.loss(self.model, self.data)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample_step(self):
        with autocast():
            self.forward(self.model, self.data)

    def time(self, kind, n=None):
        """Seconds per step of `kind` ("train" or "sample"), over n steps (None: one warm-up step, sets n)."""
        self.model.train(kind == "train")
        step = self.train_step if kind == "train" else self.sample_step
        if n is None:
            setattr(self, f"n_{kind}", max(1, round(seconds / clock(step, 1))))
            return
        getattr(self, f"{kind}_s").append(clock(step, n))


def latent_entry(label, model, cfg, batch):
    def inputs(b):
        size, C = cfg.input_size, cfg.in_channels
        return (torch.randn(b, C, size, size, device=device), torch.randint(0, 1000, (b,), device=device),
                torch.randint(0, cfg.num_classes, (b,), device=device),
                torch.randn(b, 2 * C if cfg.learn_sigma else C, size, size, device=device))

    return Entry(label, model, batch, inputs, forward=lambda m, d: m(*d[:3]),
                 loss=lambda m, d: F.mse_loss(m(*d[:3]).float(), d[3]))


def unet_entry(label, net, cfg, batch):
    def inputs(b):
        x = torch.rand(b, cfg.in_channels, cfg.img_resolution, cfg.img_resolution, device=device) * 2 - 1
        return x, (torch.randn(b, device=device) * 1.2 - 1.2).exp()  # images, EDM's training sigmas

    return Entry(label, EDMPrecond(net), batch, inputs, forward=lambda m, d: m(*d),
                 loss=lambda m, d: edm_loss(m, d[0]).mean())


def run_pair(entries):
    for e in entries:  # warm-up
        e.time("train")
        e.time("sample")
    for r in range(rounds):
        order = entries if r % 2 == 0 else entries[::-1]
        for e in order:
            e.time("train", e.n_train)
        for e in order:
            e.time("sample", e.n_sample)
    rows = []
    for e in entries:
        train = e.batch / statistics.median(e.train_s)
        sample = e.batch / statistics.median(e.sample_s)
        rows.append((e.label, e.params / 1e6, e.gflop, e.batch, train, 3 * e.gflop * train, sample, e.gflop * sample))
    ours, peer = rows
    rows.append(("ratio minidiffit / diffusers", *[a / b if i != 2 else None for i, (a, b) in
                                                    enumerate(zip(ours[1:], peer[1:]))]))
    for e in entries:  # free the pair's models and optimizer states before the next pair
        del e.model, e.opt
    return rows


def pairs():
    chosen = ["tiny"] if args.smoke else args.pairs.split(",")
    lat_batch = {"tiny": 8, "S/2": 256 if cuda else 8, "B/2": 128 if cuda else 4}  # latent presets
    unet_presets = ("tiny", "fashion", "small")
    if unknown := [s for s in chosen if s not in lat_batch and s not in unet_presets]:
        p.error(f"--pairs: unknown {unknown}; choose from S/2,B/2,fashion,small")
    for size in [s for s in chosen if s in lat_batch]:
        cfg = LATENT_PRESETS[size]
        torch.manual_seed(0)
        ours = latent_entry(f"LatentDiffiT {size}", LatentDiffiT(cfg), cfg, lat_batch[size])
        torch.manual_seed(0)
        yield [ours, latent_entry(f"diffusers DiT {size}", DiffusersDiT(cfg), cfg, lat_batch[size])]
    unet_batch = 256 if cuda else 8 if args.smoke else 32
    for preset in [s for s in chosen if s in unet_presets]:
        cfg = UNET_PRESETS[preset]
        torch.manual_seed(0)
        ours = unet_entry(f"DiffiTUNet {preset}", DiffiTUNet(cfg), cfg, unet_batch)
        torch.manual_seed(0)
        peer = unet2d_like(cfg)
        c = peer.net.config
        label = f"UNet2DModel {tuple(c.block_out_channels)} x {c.layers_per_block}"
        yield [ours, unet_entry(label, peer, cfg, unet_batch)]


t0 = time.perf_counter()
rows = []
for pair in pairs():
    rows += run_pair(pair)
print(f"\n{name}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {rounds} interleaved rounds, "
      f"{'bf16 autocast + fused Adam' if cuda else 'float32'}{' (SMOKE: tiny presets)' if args.smoke else ''}, "
      f"{time.perf_counter() - t0:.0f} s")
print("| model | params (M) | GFLOP / img | batch | train img/s | train GFLOP/s | sample img/s (1 NFE) "
      "| sample GFLOP/s |")
print("|---|---|---|---|---|---|---|---|")
for label, *vals in rows:
    cells = ["" if v is None else f"{v:.3g}" if i in (0, 1) else f"{v:.2f}" if label.startswith("ratio") else
             str(v) if i == 2 else f"{v:.1f}" for i, v in enumerate(vals)]
    print(f"| {label} | " + " | ".join(cells) + " |")
