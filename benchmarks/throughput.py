"""Training and sampling throughput and peak memory, for the README's performance table.

    python benchmarks/throughput.py                    # on a GPU: the paper presets (cifar10, XL/2), ~5 minutes
    python benchmarks/throughput.py --smoke            # tiny presets, a few steps: checks the script runs (CPU)

Each training row times optimizer steps of the task's own loss (`edm_task` / `latent_task`, the loss
train.py runs) on random data of the right shape, with the loop's fast-path settings: bf16 autocast,
`torch.compile`, fused Adam, TF32 (CUDA only), against plain float32 eager. Sampling times guided ADM steps
of XL/2 (random weights: speed does not depend on them) and converts to images/s at 250 steps. Prints a
markdown table with the device name; it measures and asserts nothing.
"""

import argparse
import contextlib

import torch

from minidiffit.tools import edm_task, latent_task
from minidiffit.adm import GaussianDiffusion
from minidiffit.latent import default_guidance

from common import clock, cuda, device, name  # benchmarks/common.py (the script's own folder is on sys.path)

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--smoke", action="store_true", help="tiny presets and 2 timed steps (CPU check of the script)")
p.add_argument("--steps", type=int, default=20, help="timed steps per row (after 3 warm-up steps)")
args = p.parse_args()

steps, warmup = (2, 1) if args.smoke else (args.steps, 3)


def timed(fn, n):
    """Seconds per call of fn over n calls, after `warmup` untimed calls (compilation happens there)."""
    for _ in range(warmup):
        fn()
    return clock(fn, n)


def train_row(task, cfg, make_batch, batch, fast):
    if cuda:
        torch.cuda.empty_cache()  # the previous row's model is gone: start from a clean allocator
    torch.manual_seed(0)
    model = task.build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=cuda)
    run = torch.compile(model) if (fast and cuda) else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (fast and cuda) else contextlib.nullcontext()
    x, y = make_batch(batch)

    def step():
        with autocast:
            loss = task.loss(run, x, y, cfg).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sec = timed(step, steps)
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return batch / sec, mem  # the model and optimizer go with this frame, before the next row


def sample_row(cfg, batch):
    torch.manual_seed(0)
    model = latent_task.build_model(cfg).to(device).eval()
    diffusion = GaussianDiffusion.respaced("250")
    size = model.cfg.input_size
    x = torch.randn(batch, 4, size, size, device=device)
    y = torch.arange(batch, device=device) % model.cfg.num_classes
    t_model = torch.full((batch,), 500, device=device, dtype=torch.long)  # the original DDPM step
    t_index = torch.full((batch,), 125, device=device, dtype=torch.long)  # its index in the respaced chain
    guidance = default_guidance(model.cfg)

    @torch.no_grad()
    def one_step():  # one guided step mid-chain: 2 * batch network evaluations + the posterior
        out = model.forward_with_cfg(x, t_model, y, scale=guidance)  # (B, 8, h, w)
        diffusion.p_mean_variance(out, x, t_index)

    sec = timed(one_step, steps)
    return batch / (sec * 250)


edm_cfg = edm_task.Config(preset="tiny" if args.smoke else "cifar10", augment_p=0.12)
lat_cfg = latent_task.Config(preset="tiny" if args.smoke else "XL/2")
lat_size = 8 if args.smoke else 32
edm_batch = 8 if args.smoke else 128  # per GPU: the paper's 512 is split over 8 A100s (64 each) or accumulated
lat_batch = 4 if args.smoke else 32


def edm_batch_fn(b):
    return torch.rand(b, 3, 32, 32, device=device) * 2 - 1, torch.zeros(b, dtype=torch.long, device=device)


def lat_batch_fn(b):
    return torch.randn(b, 4, lat_size, lat_size, device=device), torch.randint(0, 1000 if not args.smoke else 10, (b,), device=device)


rows = []
for fast in (True, False):
    label = "bf16 + compile + fused Adam + TF32" if (fast and cuda) else "float32 eager"
    if fast and not cuda:
        continue  # the fast path is CUDA-only; on the CPU both rows would be the same
    ips, mem = train_row(edm_task, edm_cfg, edm_batch_fn, edm_batch, fast)
    rows.append((f"train `{edm_cfg.preset}` (U-Net, EDM), batch {edm_batch}", ips, mem, label))
    ips, mem = train_row(latent_task, lat_cfg, lat_batch_fn, lat_batch, fast)
    rows.append((f"train `{lat_cfg.preset}` (latent), batch {lat_batch}", ips, mem, label))
rows.append((f"sample `{lat_cfg.preset}`, 250 steps + guidance, batch {lat_batch}", sample_row(lat_cfg, lat_batch),
             float("nan"), "float32/TF32"))

print(f"\n{name}, torch {torch.__version__}, {steps} timed steps per row{' (SMOKE: tiny presets)' if args.smoke else ''}")
print("| what | card | images/s | peak memory (GiB) | settings |\n|---|---|---|---|---|")
for what, ips, mem, label in rows:
    print(f"| {what} | {name} | {ips:.1f} | {mem:.1f} | {label} |")
