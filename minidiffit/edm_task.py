"""The image-space DiffiT as a training task: EDM's preconditioning, loss, augmentation and Heun sampler.

Plugs `unet.DiffiTUNet` and `diffusion.py` (EDM) into train.py's shared loop as the "edm" entry of its
TASKS table (DiffiT Sec. 4.1, App. I.1; EDM App. F.1). The recipe's numbers (Adam lr 1e-3, batch 512,
10 Mimg warm-up, EMA half-life 0.5 Mimg) are TrainConfig's defaults. Introduced in notebooks/05_train_cifar10.ipynb.
"""

import dataclasses

import torch

from .data import load_dataset
from .diffusion import EDMPrecond, augment, edm_loss, heun_sample
from .train import Task, seeded_noise
from .unet import UNET_PRESETS, DiffiTUNet


def _unet_config(cfg):
    if cfg.preset not in UNET_PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r} for task 'edm'; choose one of {sorted(UNET_PRESETS)}")
    ucfg = UNET_PRESETS[cfg.preset]
    return ucfg if cfg.dropout is None else dataclasses.replace(ucfg, dropout=cfg.dropout)


def _image_shape(ucfg):
    return (ucfg.in_channels, ucfg.img_resolution, ucfg.img_resolution)  # (C, H, W)


def edm_build_model(cfg):
    ucfg = _unet_config(cfg)
    if cfg.augment_p > 0 and ucfg.augment_dim == 0:
        raise ValueError(f"--augment_p={cfg.augment_p} needs a preset with augment_dim > 0 (non-leaky augmentation feeds its labels to the net); pass --augment_p=0")
    return EDMPrecond(DiffiTUNet(ucfg))


def edm_task_loss(model, images, labels, cfg):
    """EDM loss (EDM Eq. 2 with its log-normal sigma) on augmented images; class labels are unused."""
    augment_labels = None
    if cfg.augment_p > 0:
        images, augment_labels = augment(images, p=cfg.augment_p)  # (B, C, H, W), (B, 9)
    return edm_loss(model, images, augment_labels)  # (B,)


@torch.no_grad()
def edm_generate(model, seeds, cfg, num_steps=18):
    """Deterministic Heun sampling (EDM Algorithm 1): 2 * num_steps - 1 network evaluations."""
    ucfg = _unet_config(cfg)
    device = next(model.parameters()).device
    noise = seeded_noise(seeds, _image_shape(ucfg), device)
    return heun_sample(model, noise, num_steps=num_steps).clamp(-1, 1)


def edm_load_data(cfg):
    ucfg = _unet_config(cfg)
    kwargs = {"num": cfg.num_data, "resolution": ucfg.img_resolution} if cfg.data == "synthetic" else {}
    data = load_dataset(cfg.data, cfg.data_dir, **kwargs)
    shape = tuple(data.images.shape[1:])
    if shape != _image_shape(ucfg):
        raise ValueError(f"dataset images are {shape} but preset {cfg.preset!r} expects {_image_shape(ucfg)}; choose a matching preset or dataset")
    return data


TASK = Task(build_model=edm_build_model, loss=edm_task_loss, generate=edm_generate, load_data=edm_load_data)
