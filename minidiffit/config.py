"""Command-line overrides for the dataclass configs: `--key=value`, type-checked, unknown keys rejected.

Every runnable module (`python -m minidiffit.train`, `.sample`, `.fid`) describes its settings as one
`@dataclass`; this is the one place that turns `--key=value` strings into `dataclasses.replace` calls,
and `run_command` is the shell those entry points share (help, errors, exit codes).
"""

import dataclasses
import sys
import types
import typing


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
            return tuple(elem(v) for v in text.split(",") if v != "")
        return typ(text)
    except (TypeError, ValueError):
        raise ValueError(f"--{name}={text}: expected a value of type {getattr(typ, '__name__', typ)}") from None


def parse_overrides(cfg, args):
    """Apply `--key=value` strings to the dataclass `cfg`, returning a new config.

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
            raise ValueError(f"unknown config key {key!r} for {type(cfg).__name__}; valid keys: {', '.join(names)}")
        changes[key] = _convert(key, text, hints.get(key, type(getattr(cfg, key))), getattr(cfg, key))
    return dataclasses.replace(cfg, **changes)


def run_command(prog, doc, config_cls, body, argv):
    """Run `body(argv)` as the entry point `prog`: --help prints `doc` and the keys of `config_cls`; a bad
    setting or a missing file is printed as `prog: error: ...` with exit code 2 (no traceback); a process
    group that torchrun started is closed on the way out."""
    if any(a in ("-h", "--help") for a in argv):
        print(doc)
        for f in dataclasses.fields(config_cls):
            print(f"  --{f.name}={f.default!r}")
        return None
    try:
        return body(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
