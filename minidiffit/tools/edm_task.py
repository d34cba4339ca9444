"""The image-space DiffiT as a training task: EDM's preconditioning, loss, augmentation and Heun sampler.

Plugs `unet.DiffiTUNet` and `diffusion.py` (EDM) into train.py's loop (DiffiT Sec. 4.1, App. I.1; EDM
App. F.1). A task is a module with a `Config` (its settings and defaults) and four functions: build_model,
loss, generate, load_data. The recipe's numbers (Adam lr 1e-3, batch 512, 10 Mimg warm-up, EMA half-life
0.5 Mimg, augmentation p 0.12) are Config's defaults. Introduced in notebooks/05_train_cifar10.ipynb.
"""

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ..base.config import RunConfig, check
from ..base.data import DATASETS, load_dataset
from ..diffusion import EDMPrecond, augment, dpm_solver_sample, edm_loss, euler_sample, heun_sample, stochastic_sample
from ..base.runtime import image_generators, seeded_noise
from ..unet import UNET_PRESETS, DiffiTUNet


@dataclass
class Config(RunConfig):
    task: str = "edm"  # image-space DiffiT trained with EDM
    preset: str = "small"  # model preset (unet.UNET_PRESETS): tiny, small, fashion, cifar10, ffhq64
    dropout: float | None = None  # overrides the preset's dropout when set (None: the preset's value)
    # Ablations (DiffiT Sec. 5.3, notebook 10): the preset with one thing changed
    time_mode: str | None = None  # how time enters each block (unet.UNetConfig.time_mode): tmsa, bias, mlp, token, adaln
    window_size: int | None = None  # TMSA window (None: the preset's; the paper compares 2, 4, 8)
    arch: str = "diffit"  # diffit (DiffiTUNet), or unet2d: diffusers' UNet2DModel at the preset's parameter budget
    data: str = "cifar10"  # dataset: cifar10, fashion_mnist (torchvision download or --data_dir), folder, synthetic
    num_data: int = 1024  # size of the synthetic dataset (--data=synthetic only)
    iters: int = 200_000  # optimizer steps (DiffiT App. I.1: 200k on CIFAR-10)
    batch: int = 512  # global batch (EDM CIFAR-10: 512)
    lr: float = 1e-3  # Adam learning rate after warm-up (EDM CIFAR-10: 1e-3; FFHQ-64: 2e-4)
    warmup_kimg: float = 10_000  # linear lr warm-up over this many thousand images (EDM: 10 Mimg)
    augment_p: float = 0.12  # EDM non-leaky augmentation probability (CIFAR-10: 0.12; 0 = off)
    p_mean: float = -1.2  # training noise levels: ln(sigma) ~ N(p_mean, p_std^2) (EDM Table 1)
    p_std: float = 1.2
    sample_steps: int = 18  # Heun steps for the grid (18 = 35 network evaluations, EDM CIFAR-10)

    def validate(self):
        super().validate()
        check(self.preset in UNET_PRESETS, f"--preset={self.preset}: unknown for task 'edm'; choose one of {sorted(UNET_PRESETS)}")
        check(self.arch in ("diffit", "unet2d"), f"--arch={self.arch}: choose diffit or unet2d")
        check(self.window_size is None or self.window_size > 0, f"--window_size={self.window_size}: must be > 0")
        check(self.data in DATASETS, f"--data={self.data}: unknown dataset; choose one of {DATASETS}")
        check(self.num_data > 0, f"--num_data={self.num_data}: must be > 0")
        check(0 <= self.augment_p <= 1 and (self.dropout is None or 0 <= self.dropout < 1),
              "--augment_p must be in [0, 1] and --dropout in [0, 1)")
        check(self.p_std > 0, f"--p_std={self.p_std}: must be > 0")
        check(self.augment_p == 0 or UNET_PRESETS[self.preset].augment_dim > 0,
              f"--augment_p={self.augment_p} needs a preset with augment_dim > 0 (non-leaky augmentation feeds its "
              f"labels to the net); pass --augment_p=0")


def unet_config(cfg):
    """The preset's UNetConfig with this run's overrides (dropout, time_mode, window_size) applied."""
    overrides = {k: getattr(cfg, k) for k in ("dropout", "time_mode", "window_size") if getattr(cfg, k) is not None}
    return dataclasses.replace(UNET_PRESETS[cfg.preset], **overrides)


def image_shape(cfg):
    ucfg = unet_config(cfg)
    return (ucfg.in_channels, ucfg.img_resolution, ucfg.img_resolution)  # (C, H, W)


def build_model(cfg):
    if cfg.arch == "unet2d":  # the peer baseline of notebook 10 (diffusers, an optional dependency)
        from .peers import unet2d_like

        return EDMPrecond(unet2d_like(unet_config(cfg)))
    return EDMPrecond(DiffiTUNet(unet_config(cfg)))


def loss(model, images, labels, cfg):
    """EDM loss (EDM Eq. 2 with its log-normal sigma) on augmented images -> (B,); class labels are unused.
    Noise, sigma and augmentation come from torch's global generator, which the loop seeds per micro-batch."""
    augment_labels = None
    if cfg.augment_p > 0:
        images, augment_labels = augment(images, p=cfg.augment_p)  # (B, C, H, W), (B, 9)
    return edm_loss(model, images, augment_labels, P_mean=cfg.p_mean, P_std=cfg.p_std)  # (B,)


# sample.py --sampler: name -> the sampler, called (denoiser, noise, num_steps=); the stochastic one also takes
# generator= (one per image).
SAMPLERS = {"heun": heun_sample,  # EDM Algorithm 1, the paper's: 2N - 1 network evaluations for N steps
            "dpm++2m": dpm_solver_sample,  # DPM-Solver++(2M): N evaluations
            "euler": euler_sample,  # N evaluations
            # EDM Algorithm 2, 2N - 1 evaluations. Choice: EDM's settings for its own ImageNet-64 model (Table 5:
            # S_churn 40, S_min 0.05, S_max 50, S_noise 1.003). On the laptop tier's image model, same seeds: FID 96.5
            # against Heun's 101.5 at 35 NFE, KID 55.1 +- 3.1 against 59.8 +- 2.6 (x1e-3), so one model does not
            # separate them and the tier keeps Heun, the paper's (README).
            "stochastic": functools.partial(stochastic_sample, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)}


@torch.no_grad()
def generate(model, seeds, cfg, num_steps=18, sampler="heun"):
    """Sampling from noise (default: EDM's Heun on the probability-flow ODE), image i from seeds[i] alone: the
    stochastic sampler's fresh noise continues image i's own generator."""
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler={sampler}: unknown for the 'edm' task; choose one of {', '.join(SAMPLERS)}")
    device = next(model.parameters()).device
    generators = image_generators(seeds)
    noise = seeded_noise(seeds, image_shape(cfg), device, generators)
    extra = {"generator": generators} if sampler == "stochastic" else {}
    return SAMPLERS[sampler](model, noise, num_steps=num_steps, **extra).clamp(-1, 1)


def load_data(cfg):
    C, H, _ = image_shape(cfg)
    if cfg.data == "synthetic":
        data = load_dataset("synthetic", num=cfg.num_data, resolution=H, channels=C)
    else:  # image folders are cropped and resized to the preset's resolution (ADM's center crop)
        data = load_dataset(cfg.data, cfg.data_dir, resolution=H)
    if tuple(data.images.shape[1:]) != image_shape(cfg):
        raise ValueError(f"dataset images are {tuple(data.images.shape[1:])} but preset {cfg.preset!r} expects "
                         f"{image_shape(cfg)}; choose a matching preset (e.g. --preset=fashion for Fashion-MNIST) or dataset")
    return data
