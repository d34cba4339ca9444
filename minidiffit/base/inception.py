"""The FID network: Inception-v3 of the TensorFlow 2015-12-05 graph, eager, returning 2048-d pool features.

FID (Heusel et al. 2017) is defined on this one network; EDM, StyleGAN, ADM and pytorch-fid all use it.
We build it from torchvision's Inception blocks with the four changes the TF graph needs (as pytorch-fid
does), and load either pytorch-fid's published weights or the TorchScript copy of the graph used by
EDM/StyleGAN (its parameters mapped by name onto ours; tests/test_fid.py holds the outputs equal).
`fid.py` computes statistics and distances on these features. Introduced in notebooks/06_fid.ipynb.
"""

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import inception as tv

PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
ENV_VAR = "MINIDIFFIT_INCEPTION"  # path to a TorchScript .pt or pytorch-fid .pth file; skips the download

# ----------------------------------------------------------------------------
# Preprocessing: what every FID implementation must agree on, because each step moves FID.


def preprocess(images, size=299):
    """uint8 images (N, 3, H, W) in 0..255 -> float32 (N, 3, size, size) network input, as the TF graph sees it.

    Resize: bilinear, align_corners=False, no antialiasing (what EDM's/StyleGAN's TorchScript detector
    and pytorch-fid do; TF's own resize_bilinear differs slightly, so FIDs from the original TF code can
    differ in the first decimal). 32 px CIFAR images are upsampled ~9x; the interpolation choice alone
    moves FID by tenths. Scale: (x - 128) / 128, the graph's own normalisation.
    # Deviation: pytorch-fid scales by (x - 127.5) / 127.5; we follow the TF graph, EDM and StyleGAN.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"preprocess expects uint8 images (0..255), got {images.dtype}; quantise first (fid.to_uint8)")
    x = images.to(torch.float32)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - 128) / 128  # (N, 3, size, size)


# ----------------------------------------------------------------------------
# The network: torchvision's blocks, with the TF graph's pooling.
# torchvision's blocks average-pool with count_include_pad=True; the TF graph divides border windows by
# the number of real pixels (count_include_pad=False), and its last block uses a max pool. These are the
# only differences (pytorch-fid calls them FIDInceptionA/C/E_1/E_2); blocks B and D are used unchanged.


def _avg_pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(tv.InceptionA):
    def _forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool(x))
        return [b1, b5, b3, bp]


class FIDInceptionC(tv.InceptionC):
    def _forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_avg_pool(x))
        return [b1, b7, bd, bp]


class FIDInceptionE(tv.InceptionE):
    """Block E; `max_pool=True` for the last one (Mixed_7c), whose pool branch the TF graph max-pools."""

    def __init__(self, in_channels, max_pool=False):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x):
        b1 = self.branch1x1(x)
        a = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        bp = self.branch_pool(pooled)
        return [b1, b3, bd, bp]


class InceptionV3FID(nn.Module):
    """Inception-v3 up to the 2048-d global average pool ("pool3"), the features FID is computed on.

    Input: float (B, 3, 299, 299) from `preprocess`. Output: (B, 2048). Attribute names are torchvision's,
    so pytorch-fid's state dict loads directly (its 1008-way `fc` classifier is not needed and dropped).
    """

    input_size = 299  # what `preprocess` resizes to
    feature_dim = 2048

    def __init__(self):
        super().__init__()
        conv = tv.BasicConv2d  # conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU
        self.Conv2d_1a_3x3 = conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = conv(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = conv(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = tv.InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = tv.InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.channels_last = False  # fuse() sets it: the input is converted to NHWC, the layout of the fast path

    def fuse(self):
        """The fast path: each conv -> BatchNorm pair folded into one conv with a bias, weights and input in
        channels-last (NHWC) layout. Same features to float rounding (tests/test_fid.py: within 1e-5 of the
        unfused network and of the TorchScript graph). On 2 CPU cores 1.7x the images per second at batch 10,
        2.2x at batch 100 (benchmarks/fid_speed.py): fewer passes over the activations, oneDNN's NHWC kernels.
        Call it after loading the weights; returns self."""
        for m in self.modules():
            if isinstance(m, tv.BasicConv2d) and isinstance(m.bn, nn.BatchNorm2d):
                scale = m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)  # BN(y) = scale * y + shift
                m.conv.weight.data.mul_(scale[:, None, None, None])
                m.conv.bias = nn.Parameter(m.bn.bias - m.bn.running_mean * scale)
                m.bn = nn.Identity()
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)

    def forward(self, x):  # (B, 3, 299, 299)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for layer in self.children():
            x = layer(x)  # (B, 2048, 8, 8) after Mixed_7c
        return x.mean(dim=(2, 3))  # (B, 2048): the global average pool


# ----------------------------------------------------------------------------
# Loading weights: pytorch-fid's .pth (downloaded) or the TorchScript graph (mapped by name).

# The TorchScript module names layers `conv`, `conv_1`, ..., `mixed_10` and branches `tower*`; ours are
# torchvision's. Block kinds in order, and each kind's branch names (TorchScript -> torchvision).
_TS_LAYERS = ["conv", "conv_1", "conv_2", "conv_3", "conv_4"] + ["mixed"] + [f"mixed_{i}" for i in range(1, 11)]
_TV_LAYERS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
              "Mixed_7a", "Mixed_7b", "Mixed_7c"]  # fmt: skip
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
          **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])},
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])}},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}  # fmt: skip
_KINDS = "....." + "AAABCCCCDEE"  # block kind of each layer; "." is a stem convolution


def _torchscript_name_map():
    """{TorchScript conv prefix: our BasicConv2d prefix}, e.g. 'mixed_9.tower_mixed_conv' -> 'Mixed_7b.branch3x3_2a'."""
    names = {}
    for ts, ours, kind in zip(_TS_LAYERS, _TV_LAYERS, _KINDS):
        if kind == ".":
            names[ts] = ours
        else:
            names.update({f"{ts}.{a}": f"{ours}.{b}" for a, b in _BRANCHES[kind].items()})
    return names


def state_dict_from_torchscript(scripted):
    """Our state dict from the TorchScript FID network (EDM/StyleGAN's `inception-2015-12-05` graph).

    Each TorchScript conv layer holds `weight`, and batch-norm `beta`, `mean`, `var` with no scale (the TF
    graph's BN has gamma = 1); it runs conv2d -> batch_norm(eps=1e-3) -> relu, as torchvision's BasicConv2d.
    """
    params = dict(scripted.named_parameters()) | dict(scripted.named_buffers())
    prefix = "net.layers."  # where the layers sit inside the scripted wrapper
    out = {}
    for ts, ours in _torchscript_name_map().items():
        p = prefix + ts
        try:
            out[f"{ours}.conv.weight"] = params.pop(f"{p}.weight")
            out[f"{ours}.bn.bias"] = params.pop(f"{p}.beta")
            out[f"{ours}.bn.running_mean"] = params.pop(f"{p}.mean")
            out[f"{ours}.bn.running_var"] = params.pop(f"{p}.var")
        except KeyError as e:
            raise ValueError(f"not the FID Inception TorchScript network: it lacks {e.args[0]}") from None
        out[f"{ours}.bn.weight"] = torch.ones_like(out[f"{ours}.bn.bias"])
    if params:
        raise ValueError(f"TorchScript network has parameters we do not map: {sorted(params)[:5]}...")
    return out


def _is_torchscript(path):
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:  # TorchScript archives carry their Python code under <name>/code/
        return any("/code/" in n for n in z.namelist())


def _download_pytorch_fid_weights():
    try:
        return torch.hub.load_state_dict_from_url(PYTORCH_FID_URL, progress=False, check_hash=True, map_location="cpu")
    except Exception as e:  # offline, proxy, hash mismatch: all end the same way for the user
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise FileNotFoundError(  # a missing file the user can fetch: the CLI shell prints it as one line, exit 2
            f"could not download the FID Inception weights ({type(e).__name__}: {e}).\n"
            f"Download {PYTORCH_FID_URL}\ninto {cache}/ (or anywhere), then pass its path: "
            f"load_inception(path=...), `--network=PATH` on the fid CLI, or set {ENV_VAR}=PATH. "
            f"The TorchScript network inception-2015-12-05.pt (EDM/StyleGAN) works too."
        ) from None


def load_inception(path=None, device="cpu", fused=True):
    """The FID network, eval mode, float32, on `device`; `fused`: its fast path (InceptionV3FID.fuse), else
    the readable conv -> BatchNorm -> ReLU layers as loaded.

    path: a pytorch-fid `.pth` state dict or the TorchScript `inception-2015-12-05` file; None -> the
    `MINIDIFFIT_INCEPTION` environment variable, else pytorch-fid's weights (downloaded once into torch.hub's
    cache, checked against the hash in the file name).
    """
    path = path or os.environ.get(ENV_VAR) or None
    if path is None:
        state = _download_pytorch_fid_weights()
    elif not Path(path).is_file():
        raise FileNotFoundError(f"FID network file {path} does not exist; unset {ENV_VAR} to download "
                                f"{PYTORCH_FID_URL}, or give the path to that file")
    elif _is_torchscript(path):
        with warnings.catch_warnings():  # torch >= 2.9 deprecates jit.load; the file is TorchScript all the same
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(path, map_location="cpu")
        state = state_dict_from_torchscript(scripted)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the ImageNet classifier: unused
    net = InceptionV3FID()
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path or PYTORCH_FID_URL} is not an FID Inception checkpoint: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    net.source = str(path or PYTORCH_FID_URL)  # printed beside every FID: where the numbers came from
    net = net.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    return net.fuse() if fused else net


class TinyFeatureNet(nn.Module):
    """A small random convolutional feature network, for tests and FAST notebooks only: NOT a real FID.

    Same interface as InceptionV3FID (preprocessed input at `input_size`, (B, feature_dim) output), so the
    whole pipeline runs in seconds without the 87 MB weights. Seeded, so its "FID" is reproducible.
    """

    input_size = 32
    feature_dim = 64

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList([nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.Conv2d(32, 64, 3, stride=2, padding=1)])
        for conv in self.convs:
            conv.weight.data = torch.randn(conv.weight.shape, generator=g) * (2 / conv.weight[0].numel()) ** 0.5
            conv.bias.data.zero_()
        self.source = f"tiny-random(seed={seed}) -- NOT a real FID"
        self.requires_grad_(False).eval()

    def forward(self, x):  # (B, 3, 32, 32)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x.mean(dim=(2, 3))  # (B, 64)
