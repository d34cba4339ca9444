"""`python -m minidiffit gpu-check` (`bash reproduce.sh gpu-check`): what a person with CUDA runs first, minutes.

The paths that only CUDA takes, at toy size, through the normal entry points: bf16 autocast and torch.compile in
a short training run, NCCL DDP in one process under torchrun, and the kernel scaled_dot_product_attention
actually chooses for TMSA's shapes; then the measured training rate of the cifar10 preset beside the
estimate of benchmarks/gpu_cost.py (FLOPs per image / (peak x MFU)), so a learner knows what the paper-scale
commands will cost on this card. Without CUDA it says so in one line and exits 1. `--smoke` runs the same code
on the CPU at the smallest sizes (CI checks the script that way; its numbers mean nothing).
"""

import math
import sys
import time

import torch
import torch.nn.functional as F

from ..base.runtime import num_parameters
from ..diffusion import EDMPrecond, edm_loss
from ..unet import UNET_PRESETS, DiffiTUNet
from .stages import stage

# Dense bf16 peaks (NVIDIA data sheets) and the MFU benchmarks/gpu_cost.py assumes too: fast-DiT's DiT-XL/2 rate
# on one A100, 0.84 steps/s of batch 128, at 3 x 237 GFLOP per image (forward + backward).
PEAKS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "L40S": 362e12, "A10": 125e12}
MFU = 0.84 * 128 * 3 * 237.0e9 / PEAKS["A100"]


def attention_kernel(device, dtype):
    """The SDPA kernel chosen for TMSA's shapes (a 4x4 window, 8 heads of 32, a float bias): its profiler name."""
    q = torch.randn(256, 8, 16, 32, device=device, dtype=dtype)
    bias = torch.randn(1, 8, 16, 16, device=device, dtype=dtype)
    with torch.profiler.profile() as prof:
        F.scaled_dot_product_attention(q, q, q, attn_mask=bias)
    names = [e.name for e in prof.events() if "attention" in e.name.lower() or "fmha" in e.name.lower()]
    return next((n for n in names if n != "aten::scaled_dot_product_attention"), names[0] if names else "?")


def train_rate(model, shape, batch, device, bf16, compile, steps):
    """Images per second of EDM training steps (Adam, bf16 autocast, compiled when asked), after 3 warm-up steps."""
    net = EDMPrecond(model).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_net = torch.compile(net) if compile else net
    x = torch.randn(batch, *shape, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = edm_loss(step_net, x).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - t0)


def forward_flops(model, *inputs):
    """FLOPs of one forward pass per image (the batch's count divided by its size). Build the model and inputs on
    the meta device (`with torch.device("meta"):`): shapes only, seconds on a CPU even for XL/2."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops() / len(inputs[0])


def main(argv):
    smoke = "--smoke" in argv
    unknown = [a for a in argv if a != "--smoke"]
    if unknown:
        print(f"minidiffit gpu-check: error: unknown option {unknown[0]!r} (it takes only --smoke)", file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available() and not smoke:
        print("minidiffit gpu-check: no CUDA device here; this check is for a machine with a GPU (--smoke runs its "
              "code on the CPU)", file=sys.stderr)
        sys.exit(1)
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: the code path only)"
    print(f"== {name}, torch {torch.__version__}")
    tiny = ["--preset=tiny", "--data=synthetic", "--num_data=64", "--grid=0", "--log_every=5", "--ckpt_every=10"]
    out = "runs/gpu_check_smoke" if smoke else "runs/gpu_check"
    n = "4" if smoke else "20"
    stage("bf16 autocast + torch.compile: a short training run through the train command",
          ["train", *tiny, f"--out={out}/fast", f"--iters={n}", "--batch=8", "--bf16=true", "--compile=true"])
    if not smoke:  # NCCL needs CUDA; gloo on the CPU is what the unit tests already run
        stage("DDP with one process under torchrun (NCCL)",
              ["train", *tiny, f"--out={out}/ddp", f"--iters={n}", "--batch=8", "--compile=false"], gpus="1")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"== attention kernel for TMSA's shapes ({dtype}): {attention_kernel(device, dtype)}")

    card = next((k for k in PEAKS if k in name), None)
    rows = [("cifar10", UNET_PRESETS["cifar10"], 128)] if not smoke else [("tiny", UNET_PRESETS["tiny"], 4)]
    print(f"== training rate (EDM step, Adam, bf16 {device.type == 'cuda'}, compile {device.type == 'cuda'}) "
          f"beside benchmarks/gpu_cost.py's estimate (MFU {MFU:.1%} of the {card or 'unknown'} peak)")
    for label, cfg, batch in rows:
        shape = (cfg.in_channels, cfg.img_resolution, cfg.img_resolution)
        torch.manual_seed(0)
        model = DiffiTUNet(cfg)
        rate = train_rate(model, shape, batch, device, bf16=device.type == "cuda", compile=device.type == "cuda",
                          steps=2 if smoke else 30)
        with torch.device("meta"):
            flops = 3 * forward_flops(EDMPrecond(DiffiTUNet(cfg)), torch.zeros(2, *shape), torch.ones(2))
        estimate = PEAKS[card] * MFU / flops if card else math.nan
        line = (f"   {label:8s} {num_parameters(model) / 1e6:6.1f}M params, batch {batch}: measured {rate:9.1f} img/s, "
                f"estimate {estimate:9.1f} img/s ({flops / 1e9:.1f} GFLOP/img per training step)")
        print(line + (f", measured MFU {rate * flops / PEAKS[card]:.1%}" if card else ""))
    print("== gpu-check done: the CUDA paths ran; compare the rates with the README's GPU cost table")
