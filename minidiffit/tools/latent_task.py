"""The latent DiffiT as a training task: ImageNet latents in, class-conditional guided samples out.

Plugs `latent.LatentDiffiT`, `adm.GaussianDiffusion` and the VAE (`vae.py`) into train.py's loop as
the task "latent" (DiffiT Sec. 4, App. I.2; DiT's recipe where the paper is silent): a Config and
build_model, loss, generate, load_data, labels, as edm_task.py. It also gives sample.py the released checkpoints (`--weights=diffit_256.safetensors`) and ADM's npz layout
(`arr_1` labels). Introduced in notebooks/09_imagenet256.ipynb. Command line:
    python -m minidiffit export --ckpt=runs/x/ckpt.pt --out=model.safetensors
"""

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..adm import GaussianDiffusion
from ..base.config import RunConfig, check, run_command
from .imagenet import MANIFEST, LatentShardDataset, read_manifest
from ..latent import LATENT_PRESETS, Guidance, LatentDiffiT, default_guidance
from .released import load_released, read_metadata, save_safetensors
from ..base.runtime import dataclass_from_dict, image_generators, load_checkpoint, load_weights, seeded_noise
from .vae import SD_VAE_SCALE, VAEConfig, load_vae
from ..variants import TIME_MODES

DIFFUSION = GaussianDiffusion()  # the 1000-step training diffusion (linear betas; DESIGN.md Sec. 4)
EMA_DECAY = 0.9999  # DiffiT App. I.2 (and DiT): per-step EMA decay at the reference batch
REFERENCE_BATCH = 256  # DiffiT App. I.2: batch 256 at 256 px (512 at 512 px)

# ----------------------------------------------------------------------------
# Model and loss


@dataclass
class Config(RunConfig):
    task: str = "latent"  # latent DiffiT trained with ADM's diffusion on stored VAE latents
    preset: str = "XL/2"  # model preset (latent.LATENT_PRESETS): tiny, fashion, S/2, B/2, L/2, XL/2
    # Ablation (experiments/ablations.py, notebook 10): how time enters each block (latent.LatentConfig.time_mode)
    time_mode: str | None = None  # tmsa (DiffiT), bias, mlp, token, adaln (DiT's adaLN-Zero); None: the preset's
    # Choice: the paper gives no iteration count; 400k steps is DiT-XL/2's comparison point (its best
    # model trained 7M). Override with --iters / --minutes.
    iters: int = 400_000  # optimizer steps
    batch: int = REFERENCE_BATCH  # global batch (DiffiT App. I.2: 256 at 256 px; pass --batch=512 --lr=1e-4 at 512 px)
    lr: float = 3e-4  # AdamW (weight decay 0) learning rate, constant (DiffiT App. I.2 at 256 px; 1e-4 at 512 px)
    # Choice: Adam with no weight decay is exactly AdamW with weight decay 0 (DiT's optimizer; the paper does not
    # name one), with PyTorch's default betas and eps, as DiT, and no warm-up (DiT).
    warmup_kimg: float = 0.0  # no lr warm-up (DiT)
    # A constant EMA: beta = 0.5 ** (batch / half-life) = 0.9999 per step at batch 256. Choice: given as a
    # half-life in images, so a different --batch keeps the same averaging horizon in images.
    ema_halflife_kimg: float = REFERENCE_BATCH * math.log(0.5) / math.log(EMA_DECAY) / 1000  # 1774.4 = EMA 0.9999 at batch 256
    ema_rampup: float = 0.0  # a constant EMA half-life (DiT)
    ckpt_every: int = 10_000  # steps between checkpoints
    grid: int = 16  # images in the sample grid written with each checkpoint (decoded by the VAE)
    sample_steps: int = 250  # respaced ancestral steps for the grid (DiT, DiffiT)
    # sample.py --weights sets these from an exported file's header; a training run reads its latents' manifest.
    vae: str = ""  # the VAE that decodes samples (vae.VAEConfig.source); "": the latents' manifest's, else SD's
    vae_scale: float = 0.0  # that VAE's latent scale factor; 0: SD's 0.18215
    # A float from the command line; a latent.Guidance from an exported file's header (or from Python).
    guidance: float | Guidance | None = None  # sampling's default guidance (1 = none); None: the preset's (GUIDANCE)

    RESUMABLE = RunConfig.RESUMABLE + ("guidance",)  # a sampling setting: the trained weights do not depend on it

    def __post_init__(self):
        if isinstance(self.guidance, dict):  # a Guidance back from a checkpoint's config dict
            self.guidance = Guidance(**self.guidance)
        super().__post_init__()

    def validate(self):
        super().validate()
        check(self.preset in LATENT_PRESETS or self.preset == "released",
              f"--preset={self.preset}: unknown for task 'latent'; choose one of {sorted(LATENT_PRESETS)}")
        check(self.time_mode in (None, *TIME_MODES), f"--time_mode={self.time_mode}: choose one of {', '.join(TIME_MODES)}")
        check(self.guidance is None or isinstance(self.guidance, Guidance) or self.guidance >= 1,
              f"--guidance={self.guidance}: a scale >= 1 (1 = no guidance), or none for the preset's")


# Choice: the laptop tier (fashion) samples with a constant guidance 3 on the eps channels: the power-cosine ramps the
# release tuned for 256/512 px ImageNet do not carry over to 8x8 latents of 10 classes; a constant is the textbook CFG.
# Presets not listed follow the release's rule (latent.default_guidance: power-cosine 4.4 up to 256 px, 1.49 at 512).
GUIDANCE = {"fashion": 3.0}


def run_guidance(cfg, lcfg):
    """The guidance `generate` uses when the call names none: the run's --guidance, else its preset's in GUIDANCE,
    else the release's rule for the model's latent size (`lcfg`, its LatentConfig)."""
    if cfg.guidance is not None:
        return cfg.guidance
    return GUIDANCE[cfg.preset] if cfg.preset in GUIDANCE else default_guidance(lcfg)


def build_model(cfg):
    overrides = {"time_mode": cfg.time_mode} if cfg.time_mode else {}
    return LatentDiffiT(dataclasses.replace(LATENT_PRESETS[cfg.preset], **overrides))


def loss(model, x, y, cfg):
    """Hybrid loss (Improved DDPM: MSE on eps + the bound's term for the variance) at a uniform random t.

    x (B, 4, h, w) scaled latents, y (B,) labels -> (B,). Labels are dropped to the null class with
    p = 0.1 inside the model (training mode), which is what lets guidance use the same network.
    Noise, t and the dropout come from torch's global generator, which the loop seeds per micro-batch.
    """
    t = torch.randint(0, DIFFUSION.num_timesteps, (x.shape[0],), device=x.device)  # (B,)
    return DIFFUSION.training_losses(model, x, t, model_kwargs={"y": y})["loss"]  # (B,)


# ----------------------------------------------------------------------------
# Sampling: class-balanced labels, per-image seeds, guidance, VAE decode


def class_labels(seeds, num_classes):
    """(N,) int64: image i gets class i % num_classes.

    # Choice: a fixed round-robin over the classes (50k images = 50 per ImageNet class, exactly balanced)
    # where DiT and the release draw labels at random; FID barely notices, and image i is reproducible alone.
    """
    return torch.as_tensor(np.asarray(seeds), dtype=torch.int64) % num_classes


def labels(model, seeds, cfg):
    """The labels `generate` uses for `seeds` (sample.py writes them as `arr_1`, ADM's layout)."""
    return class_labels(seeds, _unwrap(model).cfg.num_classes)


def _unwrap(model):
    return getattr(model, "module", model)  # DDP keeps the network in .module


def vae_source(cfg):
    """(source, scale) of the VAE that decodes this run's samples.

    The run's --vae (an exported file's header sets it), else the VAE that encoded the training latents and the
    scale they were made with (their manifest records both: for our autoencoder, its ckpt.pt and measured scale,
    which load_vae checks against the file), else Stable Diffusion's sd-vae-ft-ema. (Where SD's VAE is named,
    the environment variable MINIDIFFIT_VAE may replace it when it is loaded: see vae.load_vae.)
    """
    if cfg.vae:
        return cfg.vae, cfg.vae_scale or SD_VAE_SCALE
    if cfg.data_dir and (Path(cfg.data_dir) / MANIFEST).is_file():
        manifest = read_manifest(cfg.data_dir)
        return manifest["vae"], manifest["scale_factor"]
    return VAEConfig().source, SD_VAE_SCALE


@functools.lru_cache(maxsize=2)
def _cached_vae(source, scale, device):
    # Loaded once per process: the loop decodes a grid at every checkpoint, sample.py once per batch.
    return load_vae(VAEConfig(source=source, scale=scale), device=device)


@torch.no_grad()
def decode(vae, z, chunk=32):
    """Latents (N, 4, h, w) -> images (N, C, f h, f w) in [-1, 1] (SD: C = 3, f = 8), decoded `chunk` at a time.

    # Choice: clamp to [-1, 1] here; sample.py's quantisation round((x + 1) * 127.5) then equals ADM/DiT's
    # clamp(127.5 x + 128, 0, 255).to(uint8) (a floor of the same number plus 0.5) except on exact ties.
    """
    # Chunks: the SD decoder's 512-channel activations at 256 px take ~130 MB per image in float32.
    return torch.cat([vae.decode(z[i:i + chunk]).float().clamp(-1, 1) for i in range(0, len(z), chunk)])


# sample.py --sampler: name -> the respaced diffusion's loop, called (diffusion, model, noise, model_kwargs=,
# generator=). Each takes one network evaluation per step (two images' worth with guidance).
SAMPLERS = {"ancestral": GaussianDiffusion.p_sample_loop,  # DDPM Algorithm 2 (the paper's, 250 steps)
            "ddim": GaussianDiffusion.ddim_sample_loop,  # DDIM, eta 0 (deterministic)
            "dpm++2m": GaussianDiffusion.dpm_solver_sample_loop}  # DPM-Solver++(2M)


@torch.no_grad()
def generate(model, seeds, cfg, num_steps=250, guidance=None, channels=3, vae=None, sampler="ancestral"):
    """Guided ancestral sampling (250 respaced steps, DESIGN.md Sec. 4) -> images (N, C, H, W) in [-1, 1].

    Image i: label seeds[i] % num_classes, and every random number of its trajectory (the initial noise and
    each step's noise) from its own generator seeded with seeds[i], so it is the same in any batch or rank.
    `guidance`: None = the run's (run_guidance: its --guidance, the fashion preset's constant 3, else the
    release's power-cosine 4.4 at 256 px, constant 1.49 at 512 px), a float for a constant scale (1 = no
    guidance), or a latent.Guidance.
    `channels`: 3 guides eps channels 0..2 as released, None all four. Each step costs two network
    evaluations per image (the batch is doubled with the null label) unless guidance is 1.
    `sampler`: one of SAMPLERS, over `num_steps` respaced steps (ADM's even spacing, both ends kept).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler={sampler}: unknown for the 'latent' task; choose one of {', '.join(SAMPLERS)}")
    net = _unwrap(model)
    lcfg = net.cfg
    device = next(net.parameters()).device
    generators = image_generators(seeds)  # CPU: the same numbers on any device
    noise = seeded_noise(seeds, (lcfg.in_channels, lcfg.input_size, lcfg.input_size), device, generators)  # (N, 4, h, w)
    y = class_labels(seeds, lcfg.num_classes).to(device)  # (N,)
    scale = run_guidance(cfg, lcfg) if guidance is None else guidance
    if isinstance(scale, (int, float)) and scale == 1:
        fn = net  # the conditional model alone: half the cost
    else:
        fn = functools.partial(net.forward_with_cfg, scale=scale, channels=channels)
    diffusion = GaussianDiffusion.respaced(str(num_steps))
    z = SAMPLERS[sampler](diffusion, fn, noise, model_kwargs={"y": y}, generator=generators)  # (N, 4, h, w)
    if vae is None:
        source, vae_scale = vae_source(cfg)
        vae = _cached_vae(source, vae_scale, str(device))
    return decode(vae, z)  # (N, 3, H, W)


# ----------------------------------------------------------------------------
# Data


def load_data(cfg):
    """The latents `python -m minidiffit imagenet prepare` wrote in cfg.data_dir, checked against the preset."""
    if not cfg.data_dir:
        raise ValueError("the latent task trains on stored VAE latents: make them with `python -m minidiffit imagenet "
                         "prepare --data_dir=IMAGENET/train --out=LATENTS`, then pass --data_dir=LATENTS")
    lcfg = LATENT_PRESETS[cfg.preset]
    data = LatentShardDataset(cfg.data_dir)
    found = tuple(data.manifest["latent_shape"][1:])
    expected = (lcfg.in_channels, lcfg.input_size, lcfg.input_size)
    if found != expected:
        factor = data.manifest["image_size"] // found[-1]  # the VAE's downsampling
        raise ValueError(f"latents in {cfg.data_dir} are {found} (images of {data.manifest['image_size']} px) but "
                         f"preset {cfg.preset!r} expects {expected}; prepare with --image_size={factor * lcfg.input_size} "
                         "(or a VAE with other latents), or choose a preset whose latents match")
    if data.num_classes > lcfg.num_classes:
        raise ValueError(f"{cfg.data_dir} has {data.num_classes} classes but preset {cfg.preset!r} has only "
                         f"{lcfg.num_classes} labels; choose a preset with num_classes >= {data.num_classes}")
    return data


# ----------------------------------------------------------------------------
# Released weights, export, reference batches


def released_model(path, device="cpu"):
    """(model, Config) for a released `diffit_256.safetensors` (or an `export`ed file): sample.py --weights."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no weights at {path}; download diffit_256.safetensors (or diffit_512) from "
                                "https://huggingface.co/nvidia/DiffiT and pass its path")
    model = load_released(path, device=device).requires_grad_(False)
    meta = read_metadata(path)  # {} for the release's files; an exported run's guidance and VAE
    guidance = json.loads(meta["guidance"]) if "guidance" in meta else None  # None: the release's rule
    # preset is a label here: generate reads the architecture off the model, the VAE from vae_source.
    return model, Config(preset="released", grid=0, vae=meta.get("vae", ""), vae_scale=float(meta.get("vae_scale", 0)),
                         guidance=guidance)


def export(ckpt, out, use_ema=True):
    """A training checkpoint's (EMA) weights -> a safetensors file in the release's layout, whose header records
    what the weights alone do not say: the run's guidance (run_guidance) and the VAE (and scale) of its latents,
    so that sample.py --weights samples it as sample.py --ckpt would."""
    saved = load_checkpoint(ckpt)
    if saved["config"].get("task") != "latent":
        raise ValueError(f"{ckpt} is a {saved['config'].get('task')!r} run; export takes latent DiffiT checkpoints")
    cfg = dataclass_from_dict(Config, saved["config"])
    model = load_weights(build_model(cfg), saved["ema" if use_ema else "model"], ckpt)
    source, scale = vae_source(cfg)
    meta = {"preset": cfg.preset, "vae": source, "vae_scale": repr(scale)}
    g = run_guidance(cfg, model.cfg)
    meta["guidance"] = json.dumps(dataclasses.asdict(g) if isinstance(g, Guidance) else g)
    save_safetensors(model, out, metadata=meta)
    return out


@dataclass
class ExportConfig:
    ckpt: str = ""  # runs/x/ckpt.pt of a --task=latent run
    out: str = ""  # .safetensors file to write
    ema: bool = True  # the EMA weights (False: the raw weights)

    def validate(self):
        check(self.ckpt and self.out.endswith(".safetensors"), "export needs --ckpt=runs/x/ckpt.pt and --out=FILE.safetensors")


def main(argv=None):
    run_command("minidiffit", __doc__,
                {"export": (lambda a: ExportConfig(), lambda c: print(f"wrote {export(c.ckpt, c.out, c.ema)}"))}, argv)


if __name__ == "__main__":
    main()
