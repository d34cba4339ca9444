"""The released checkpoints (nvidia/DiffiT on Hugging Face) in and out of `latent.LatentDiffiT`.

`load_released` takes `diffit_256.safetensors` / `diffit_512.safetensors` strictly (names and shapes as
DESIGN.md Sec. 4 lists them); `save_safetensors` writes ours in the same layout, with our settings in the
header (`read_metadata`). Introduced in notebooks/08_latent_diffit.ipynb.
"""

import math

import torch

from ..latent import LatentConfig, LatentDiffiT


# ----------------------------------------------------------------------------
# Loading the released checkpoints (nvidia/DiffiT on Hugging Face)


def check_state_dict(model, state_dict, limit=5):
    """Raise a ValueError naming the first differing keys and shapes between `model` and `state_dict`."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    shapes = [f"{k}: model {ours[k]} vs file {theirs[k]}" for k in ours if k in theirs and ours[k] != theirs[k]]
    if missing or unexpected or shapes:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing from the file, e.g. {missing[:limit]}")
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected in the file, e.g. {unexpected[:limit]}")
        if shapes:
            lines.append(f"{len(shapes)} with other shapes, e.g. {shapes[:limit]}")
        raise ValueError("checkpoint does not match the model (check the preset and input_size: "
                         "diffit_256 is XL/2 with input_size=32, diffit_512 XL/2 with input_size=64):\n  "
                         + "\n  ".join(lines))


def config_from_state_dict(state_dict):
    """The LatentConfig whose shapes a state dict has (XL/2 with input_size 32 for diffit_256, 64 for 512)."""
    if "pos_embed" not in state_dict or "x_embedder.proj.weight" not in state_dict:
        raise ValueError("not a latent DiffiT state dict: no 'pos_embed' / 'x_embedder.proj.weight'")
    dim, in_channels, p, _ = state_dict["x_embedder.proj.weight"].shape
    grid = math.isqrt(state_dict["pos_embed"].shape[1])
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    return LatentConfig(
        input_size=grid * p, in_channels=in_channels, patch_size=p, dim=dim, depth=depth,
        num_heads=state_dict["blocks.0.attn.relative_position_bias_table"].shape[1],
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=state_dict["final_layer.linear.weight"].shape[0] == 2 * in_channels * p * p,
    )


def load_released(path, model=None, device="cpu"):
    """Load a released `diffit_256.safetensors` / `diffit_512.safetensors` (or one we saved) strictly.

    Without `model`, builds one whose config is read off the file's shapes (`config_from_state_dict`).
    Weights: https://huggingface.co/nvidia/DiffiT (download the .safetensors file, pass its path).
    """
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError("loading released weights needs safetensors: pip install minidiffit[latent]") from None
    state_dict = load_file(str(path), device=str(device))
    assign = model is None
    if assign:
        # Built on the meta device and filled by assignment: no time spent initialising 561M weights that the
        # file replaces, and no second copy in memory.
        with torch.device("meta"):
            model = LatentDiffiT(config_from_state_dict(state_dict))
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return model.eval()


def save_safetensors(model, path, metadata=None):
    """Save `model`'s state dict in the release's format (loadable by `load_released`); `metadata`: str -> str
    pairs for the file's header (latent_task.export records the run's guidance and VAE there)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("saving safetensors needs safetensors: pip install minidiffit[latent]") from None
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path), metadata=metadata)


def read_metadata(path):
    """The str -> str header of a safetensors file ({} for the release's files, which have none)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}
