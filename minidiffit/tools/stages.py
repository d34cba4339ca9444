"""The pipelines' one mechanism: a stage runs one package command, or skips it when its outputs are up to date.

    stage("sample 64 images", ["sample", "--ckpt=runs/x/ckpt.pt", "--out=runs/x/s.png"],
          inputs=["runs/x/ckpt.pt"], outputs=["runs/x/s.png"])
prints `== sample 64 images` and the copyable `python -m minidiffit sample ...` line, then runs it in a subprocess
of the same Python (under torchrun for several GPUs), unless runs/x/s.png is newer than the checkpoint. Also here:
the user's paths (relative to where they ran reproduce.sh) and the checks made before the first stage.
pipelines.py lists the stages.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch


PATH_KEYS = ("--data_dir=", "--ref=", "--weights=", "--ckpt=")  # typed by the user, relative to their directory


def stage(title, command, inputs=(), outputs=(), stamp=None, env=None, gpus=1, run=True):
    """Run one stage: `python -m minidiffit COMMAND...` (or `python SCRIPT.py ...` when command[0] ends in .py).

    Skipped ("up to date") when every output exists and is newer than every input; a stage without outputs
    always runs (its command knows when it is done). `stamp`: a file touched after the command succeeds, an
    output for commands that append to a shared file (a results line). `env`: extra variables, shown in the
    printed line. `gpus` > 1 (or "N"): under torchrun, one process per GPU. `run=False` only prints.
    Returns True when the command ran; a failing command ends the pipeline with its exit code.
    """
    # Choice: a stage without outputs always runs. Training and prepare write their outputs as they go, so an
    # existing ckpt.pt or manifest.json does not mean done; they resume, or return at once when they are.
    outputs = [*outputs, *([stamp] if stamp else [])]
    if run and _is_done(inputs, outputs):
        print(f"== {title}: up to date", flush=True)
        return False
    head = ["-m", "minidiffit"] if not command[0].endswith(".py") else []
    if gpus not in (0, 1):
        shown = ["torchrun", "--standalone", f"--nproc_per_node={gpus}", *head, *command]
        argv = [sys.executable, "-m", "torch.distributed.run", *shown[1:]]
    else:
        shown = ["python", *head, *command]
        argv = [sys.executable, *head, *command]
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
    print(f"== {title}\n  {prefix}{shlex.join(shown)}", flush=True)
    if not run:
        return False
    with subprocess.Popen(argv, env={**os.environ, **(env or {})}) as child:
        try:
            code = child.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the command too: let it stop cleanly and say where it stopped
            code = child.wait()
    if code:
        sys.exit(code if code > 0 else 128 - code)  # killed by signal n: the shell's 128 + n
    if stamp:
        Path(stamp).parent.mkdir(parents=True, exist_ok=True)
        Path(stamp).touch()
    return True


def _is_done(inputs, outputs):
    """Every output exists, every input exists, and the oldest output is newer than the newest input."""
    if not outputs or not all(os.path.exists(p) for p in [*outputs, *inputs]):
        return False
    newest_input = max((os.stat(p).st_mtime_ns for p in inputs), default=-1)
    return min(os.stat(p).st_mtime_ns for p in outputs) > newest_input


def score(title, samples, ref, results, tag, stamps, network=()):
    """One FID line appended to `results` per samples file, again only when the samples (or the ref) are newer.
    The stamp in `stamps` is needed because `results` is shared: its mtime moves with every line appended."""
    samples = Path(samples)
    return stage(title, ["fid", f"--samples={samples}", f"--ref={ref}", f"--results={results}", f"--tag={tag}", *network],
                 inputs=[samples, ref], outputs=[results], stamp=f"{stamps}/.scored_{samples.parent.name}_{samples.name}")


def caller_path(path):
    """A path the user typed, made absolute against the directory they ran from (reproduce.sh exports it)."""
    if not path or os.path.isabs(path):
        return path
    return os.path.join(os.environ.get("MINIDIFFIT_CALLER_PWD") or os.getcwd(), path)


def caller_args(args):
    """--data_dir=, --ref=, --weights=, --ckpt= made absolute; --out= stays relative to the repository (runs/...)."""
    return [next((k + caller_path(a[len(k):]) for k in PATH_KEYS if a.startswith(k)), a) for a in args]


def only_keys(args, keys):
    for a in args:
        if not any(a.startswith(f"--{k}=") for k in keys):
            raise ValueError(f"unknown option '{a}' (it takes {', '.join(f'--{k}=' for k in keys)} only)")


def cuda_count():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def fast():
    return os.environ.get("MINIDIFFIT_FAST") == "1"


def tail(path, n):
    print("\n".join(Path(path).read_text().splitlines()[-n:]))
