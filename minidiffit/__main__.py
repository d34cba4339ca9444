"""`python -m minidiffit COMMAND [--key=value ...]`: every command line of the package, one dispatcher.

    python -m minidiffit train --preset=small --data=cifar10 --out=runs/x      (torchrun ... -m minidiffit train ...)
    python -m minidiffit sample --ckpt=runs/x/ckpt.pt --num_samples=64 --out=runs/x/samples.png
    python -m minidiffit fid --samples=runs/x/samples --ref=REF.npz
    python -m minidiffit fashion --data_dir=DIR      (a pipeline: stages of the commands above; reproduce.sh runs it)
    python -m minidiffit COMMAND --help
The commands live in minidiffit/tools/ (what uses the core); this file only names them.
"""

import importlib
import sys

COMMANDS = {  # name -> (module, what it does)
    "train": ("minidiffit.tools.tasks", "train a task (edm, latent) or resume its run"),
    "sample": ("minidiffit.tools.sample", "images from a trained run or released weights"),
    "fid": ("minidiffit.tools.evaluate", "FID / precision / recall of samples; `fid ref`: reference statistics"),
    "imagenet": ("minidiffit.tools.imagenet", "prepare latents (ImageNet, Fashion-MNIST), synthetic sets, ADM reference batches"),
    "export": ("minidiffit.tools.latent_task", "a latent run's EMA weights as safetensors in the release's layout"),
    "autoencoder": ("minidiffit.tools.autoencoder_task", "train the laptop tier's autoencoder (= train --task=autoencoder)"),
    # the pipelines: stages of the commands above, each skipped when done (bash reproduce.sh CMD runs them)
    "fashion": ("minidiffit.tools.pipelines", "the laptop tier: both DiffiT models on Fashion-MNIST, grids and FIDs"),
    "ablations": ("minidiffit.tools.pipelines", "DiffiT's ablations on Fashion-MNIST (experiments/ablations.py)"),
    "nfe": ("minidiffit.tools.pipelines", "after fashion: FID against network evaluations (experiments/fid_vs_nfe.py)"),
    "cifar10": ("minidiffit.tools.pipelines", "CUDA: the paper's CIFAR-10 recipe, 50k samples, FID; no CUDA: CPU tier"),
    "imagenet256": ("minidiffit.tools.pipelines", "prepare, train, sample, FID; --weights FILE; no CUDA: FAST toy run"),
    "gpu-check": ("minidiffit.tools.gpucheck", "with CUDA, first: bf16, compile, DDP, the attention kernel, measured vs estimated rate"),
}
SHARED = {"export", "fashion", "ablations", "nfe", "cifar10", "imagenet256"}  # their module serves several: name first


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())
        stream = sys.stdout if argv[:1] in ([], ["-h"], ["--help"]) else sys.stderr
        if argv and stream is sys.stderr:
            print(f"minidiffit: error: unknown command {argv[0]!r}", file=stream)
        print(f"usage: python -m minidiffit COMMAND [--key=value ...]\n\ncommands:\n{lines}", file=stream)
        return 0 if stream is sys.stdout else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    if name in SHARED:
        rest = [name, *rest]
    module.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
