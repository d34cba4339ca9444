"""The command line of every `python -m minidiffit COMMAND`: `--key=value` onto a dataclass config, one shell.

Each entry point describes its settings as `@dataclass`es (a comment per field, checked by `validate()`)
and hands `run_command` a table of its commands. The shell gives them all the same syntax, the same
`--help` (keys, defaults and comments), and the same answer to bad input: one line `prog: error: ...` on
stderr and exit code 2, no traceback unless MINIDIFFIT_DEBUG=1. `RunConfig` holds the training loop's
settings that every task shares; each task (edm_task.py, latent_task.py) extends it with its own.
"""

import dataclasses
import errno
import inspect
import os
import re
import sys
import types
import typing
from dataclasses import dataclass


def _convert(name, text, typ, current):
    """Parse `text` as the type of field `name` (from its annotation, else its current value)."""
    if isinstance(typ, str) or typ is typing.Any:
        typ = type(current)
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):  # Optional[X] / X | None
        if text.lower() in ("none", "null", ""):
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
        origin = typing.get_origin(typ)
    expected = f"a value of type {getattr(typ, '__name__', typ)}"
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if typ is tuple or origin is tuple:
            args = typing.get_args(typ)
            elem = args[0] if args else (type(current[0]) if current else str)
            expected = f"comma-separated values of type {elem.__name__}"
            return tuple(elem(v) for v in text.split(",") if v != "")
        return typ(text)
    except (TypeError, ValueError):
        raise ValueError(f"--{name}={text}: expected {expected}") from None


def parse_overrides(cfg, args):
    """Apply `--key=value` strings to the dataclass `cfg`, returning a new (validated) config.

    Raises ValueError naming the bad argument and listing the valid keys.
    """
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"bad argument {arg!r}: write overrides as --key=value (valid keys: {', '.join(names)})")
        key, text = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in names:
            owner = f"{type(cfg).__module__.rsplit('.', 1)[-1]}.{type(cfg).__name__}"  # e.g. latent_task.Config
            raise ValueError(f"unknown config key {key!r} for {owner}; valid keys: {', '.join(names)}")
        changes[key] = _convert(key, text, hints.get(key, type(getattr(cfg, key))), getattr(cfg, key))
    cfg = dataclasses.replace(cfg, **changes)
    if hasattr(cfg, "validate"):  # every value is checked here, at parse time, before any work starts
        cfg.validate()
    return cfg


def check(condition, message):
    """Raise ValueError(message) unless condition: config checks that survive `python -O` (unlike assert)."""
    if not condition:
        raise ValueError(message)


def _field_comments(cls):
    """{field: its `# comment`} read from the class sources (base classes first), for --help."""
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments.update(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", source, re.M))
    return comments


def print_help(prog, doc, cfg):
    print(doc.strip() + "\n")
    comments = _field_comments(type(cfg))
    print(f"{prog} settings (--key=value, defaults shown):")
    for f in dataclasses.fields(cfg):
        print(f"  --{f.name}={getattr(cfg, f.name)!r}" + (f"  # {comments[f.name]}" if f.name in comments else ""))


def error_message(e):
    """One line for an error a user can fix; disk full is named as such, with the path."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (f"writing {e.filename or 'a file'}: {e.strerror}; free some space or write elsewhere (--out=...), "
                f"then rerun: finished work is kept")
    # One line even when the message quotes a library's multi-line error (torch, PIL, diffusers)
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def run_command(prog, doc, commands, argv=None):
    """The shell of an entry point. `commands`: {name: (defaults, body)}; the name "" is the command run when
    argv does not start with one of the others. `defaults(argv)` gives the config to override (it may read a
    key such as --task= to choose a config class), `body(cfg)` does the work.

    --help prints `doc` and the keys; bad settings, missing or corrupt files and full disks end as
    `prog: error: ...` with exit code 2, Ctrl-C as one line `prog: interrupted ...` with exit code 130
    (MINIDIFFIT_DEBUG=1 shows the traceback instead); a process group that torchrun started is closed on the
    way out.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in commands and argv[0] != "" else ""
    if name:
        argv = argv[1:]
    try:
        if name not in commands:
            raise ValueError(f"choose a command: {', '.join(c for c in commands if c)} (see --help)")
        defaults, body = commands[name]
        cfg = defaults(argv)
        if any(a in ("-h", "--help") for a in argv):
            others = [c for c in commands if c and c != name]
            print_help(f"{prog} {name}".strip(), doc + (f"\nOther commands: {', '.join(others)}" if others else ""), cfg)
            return None
        return body(parse_overrides(cfg, argv))
    except (ValueError, OSError) as e:  # bad input, missing/corrupt files, full disks: the user's to fix
        if os.environ.get("MINIDIFFIT_DEBUG") == "1":
            raise
        print(f"{prog}: error: {error_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C: one line (the loop's says where it stopped), the shell's code 130
        if os.environ.get("MINIDIFFIT_DEBUG") == "1":
            raise
        print(f"{prog}: {error_message(e) or 'interrupted; rerun the same command to start again'}", file=sys.stderr)
        sys.exit(130)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------
# The training loop's settings, shared by every task (a task's config extends this with its own fields)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npz", ".pt", ".safetensors")  # not run directories


@dataclass
class RunConfig:
    task: str = "edm"  # which task: edm (image-space DiffiT, EDM), latent (latent DiffiT, ADM) or autoencoder; see tools/tasks.py
    out: str = "runs/train"  # run directory: ckpt.pt, metrics.jsonl, grid_*.png
    data_dir: str | None = None  # where the data is (a dataset root, an image folder, or stored latents)
    iters: int = 200_000  # optimizer steps to train for
    minutes: float = 0.0  # wall-clock budget summed over resumes; stops cleanly with a checkpoint (0 = none)
    batch: int = 512  # global batch, split across ranks and accumulation rounds
    accum: int = 1  # gradient accumulation rounds per step (a smaller per-GPU batch, same step)
    lr: float = 1e-3  # Adam learning rate after warm-up
    betas: tuple = (0.9, 0.999)  # Adam betas
    eps: float = 1e-8  # Adam epsilon
    warmup_kimg: float = 0.0  # linear lr warm-up over this many thousand images (0 = none)
    ema_halflife_kimg: float = 500  # EMA half-life in thousands of images (0 = no average: the EMA copies the weights)
    ema_rampup: float = 0.05  # EMA half-life is at most this fraction of the images seen so far (0 = no ramp)
    seed: int = 0  # seeds the model init, the data order and every batch's noise
    ckpt_every: int = 5000  # steps between checkpoints (one is also written at the end)
    log_every: int = 100  # steps between progress lines
    grid: int = 64  # images in the sample grid written with each checkpoint (0 = no grid)
    sample_steps: int = 18  # sampler steps for the grid
    max_bad_steps: int = 20  # stop the run after this many steps in a row with a non-finite loss (divergence)
    # Choice: None turns the fast path on where it pays, on CUDA; bf16 runs ~50x slower than float32 on many CPUs and
    # compiling costs a minute up front, so the CPU trains eager float32 unless asked (CI checks the fast path there).
    bf16: bool | None = None  # bf16 autocast of the network: true, false, or None (CUDA only)
    compile: bool | None = None  # torch.compile the training model: true, false, or None (CUDA only)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.validate()  # also when a config is built in Python (tests, notebooks), not only parsed

    def validate(self):
        for key in ("iters", "batch", "accum", "ckpt_every", "log_every", "sample_steps", "max_bad_steps"):
            check(getattr(self, key) > 0, f"--{key}={getattr(self, key)}: must be a positive whole number")
        for key in ("minutes", "warmup_kimg", "ema_halflife_kimg", "ema_rampup", "grid"):
            check(getattr(self, key) >= 0, f"--{key}={getattr(self, key)}: must be >= 0")
        for key in ("lr", "eps"):
            check(getattr(self, key) > 0, f"--{key}={getattr(self, key)}: must be > 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
              f"--betas={','.join(map(str, self.betas))}: Adam takes two values in [0, 1), e.g. --betas=0.9,0.999")
        check(self.out != "" and not self.out.lower().endswith(IMAGE_SUFFIXES),
              f"--out={self.out}: a run directory is needed (it holds ckpt.pt and grids), not a file name")

    # Settings that may change when a run resumes: how long, how often, where, how fast. Every other field
    # defines the run; a checkpoint made with a different value is refused (see runtime.check_resumable).
    RESUMABLE = ("out", "data_dir", "iters", "minutes", "accum", "ckpt_every", "log_every", "grid", "sample_steps",
                 "max_bad_steps", "bf16", "compile")
