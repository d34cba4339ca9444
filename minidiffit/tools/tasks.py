"""`python -m minidiffit train`: the training tasks by name, and a trained model back from its checkpoint.

    python -m minidiffit train --preset=small --data=cifar10 --out=runs/x [--key=value ...]
    python -m minidiffit train --task=latent --help
    torchrun --nproc_per_node=8 -m minidiffit train --preset=cifar10 --data=cifar10 --out=runs/cifar10


A task is a module (edm_task.py, latent_task.py, autoencoder_task.py) with a `Config` dataclass (its settings
and defaults) and build_model, loss, generate, load_data (and, for class-conditional tasks, labels; for work after
training, finish). train.py and sample.py look tasks up here; the tasks themselves import only small helpers
(runtime.py, config.py), never the loop.
Introduced in notebooks/05_train_cifar10.ipynb.
"""

from .. import train as loop
from ..base.config import parse_overrides, run_command
from . import autoencoder_task, edm_task, latent_task
from ..base.runtime import dataclass_from_dict, load_checkpoint, load_weights

TASKS = {
    "edm": edm_task,  # image-space DiffiT, EDM (CIFAR-10, FFHQ-64, Fashion-MNIST)
    "latent": latent_task,  # latent DiffiT, ImageNet (ADM diffusion)
    "autoencoder": autoencoder_task,  # the laptop tier's KL autoencoder (Fashion-MNIST latents), then its scale
}


def get_task(name):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def task_config(argv):
    """The default Config of the task that `--task=` in argv names (edm when absent): what --help shows."""
    names = [a.split("=", 1)[1] for a in argv if a.startswith("--task=")]
    return get_task(names[-1] if names else "edm").Config()


def config_from_dict(d):
    """A task's Config from a checkpoint's config dict (tuples come back as lists from some writers)."""
    return dataclass_from_dict(get_task(d.get("task", "edm")).Config, d)


def build_from_checkpoint(path, use_ema=True, device="cpu"):
    """(model with the EMA (or raw) weights, Config, checkpoint) from a ckpt.pt; sample.py uses it."""
    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    model = load_weights(get_task(cfg.task).build_model(cfg), ckpt["ema" if use_ema else "model"], path)
    return model.to(device).eval().requires_grad_(False), cfg, ckpt


def train(cfg, log=None):
    """Train (or resume) the run that `cfg` (a task's Config) describes: minidiffit/train.py's loop."""
    return loop.train(get_task(cfg.task), cfg, log)


def config_from_args(argv):
    """The task's Config from `--key=value` arguments: the task (--task=, default edm) gives the defaults."""
    return parse_overrides(task_config(argv), argv)


def main(argv=None):
    run_command("minidiffit train", loop.__doc__ + __doc__, {"": (task_config, train)}, argv)


if __name__ == "__main__":
    main()
