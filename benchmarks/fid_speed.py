"""Images per second of the FID Inception network: the readable layers (conv -> BatchNorm -> ReLU, NCHW) against
the fast path (`InceptionV3FID.fuse`: BatchNorm folded into the convs, channels-last), at several forward batch
sizes, on 32 px images upsampled to 299 as fid.features does; with the largest feature difference between the two.

    python benchmarks/fid_speed.py --network=PATH     # or MINIDIFFIT_INCEPTION=PATH; ~3 min on 2 CPU cores

Prints a markdown table with the device and thread count; it measures and asserts nothing. Run it alone on an
idle machine: another process on the same cores changes the figures.
"""

import argparse

import torch

from minidiffit.base.inception import load_inception, preprocess

from common import clock, device, name  # benchmarks/common.py

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--network", default=None, help="TorchScript or pytorch-fid weights (default $MINIDIFFIT_INCEPTION)")
p.add_argument("--images", type=int, default=40, help="images per timed pass")
p.add_argument("--batches", default="100,10,5", help="forward batch sizes to time")
args = p.parse_args()

nets = {"readable": load_inception(args.network, device=device, fused=False),
        "fused, channels-last": load_inception(args.network, device=device, fused=True)}
x = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(device)


def features(net, batch):
    with torch.inference_mode():
        return torch.cat([net(preprocess(x[i : i + batch])) for i in range(0, len(x), batch)])


where = name if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
print(f"FID Inception on {where}, {args.images} images per pass (32 px -> 299), float32\n")
print("| network | forward batch | img/s |\n|---|---|---|")
for batch in [int(b) for b in args.batches.split(",")]:
    for label, net in nets.items():
        features(net, min(batch, 4))  # warm-up
        print(f"| {label} | {batch} | {args.images / clock(lambda: features(net, batch), 1):.2f} |", flush=True)
diff = (features(nets["readable"], 10) - features(nets["fused, channels-last"], 10)).abs().max().item()
print(f"\nlargest feature difference, readable vs fused: {diff:.2e}")
