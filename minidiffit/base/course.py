"""Exercise checks for the course: run a student's answer and compare it with the package's own.

Every exercise at the end of notebooks/NN_*.ipynb is followed by a check cell that calls `check`. An
untouched exercise raises NotImplementedError, and `check` prints "not attempted yet" instead of failing;
a wrong answer raises an AssertionError that names the exercise and what differs; a right one prints
"correct". An answer that calls the package function it is checked against (`forbid=`) is told so and fails,
even when its numbers are right: only an answer of the student's own passes. The solutions (notebooks/solutions/)
run the same check cells under nbval, so an exercise that the package's API has broken fails CI. Introduced in
notebooks/01_attention.ipynb.
"""

import inspect
import math
import sys

import numpy as np
import torch


def compare(got, want, atol=1e-5, rtol=1e-4, where="answer"):
    """Raise AssertionError unless `got` matches `want`: tensors (shape, dtype kind, values), numbers,
    strings, bools, and tuples/lists/dicts of them, recursively (numpy arrays count as tensors). `where` names
    the part in the message."""
    if isinstance(want, np.ndarray):
        want = torch.from_numpy(want)
    if isinstance(got, np.ndarray):
        got = torch.from_numpy(got)
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise AssertionError(f"{where}: expected a tensor of shape {tuple(want.shape)}, got {type(got).__name__}")
        if got.shape != want.shape:
            raise AssertionError(f"{where}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        if not (want.is_floating_point() or want.is_complex()):  # integers, bools: exactly
            if not torch.equal(got.cpu(), want.cpu()):
                bad = (got.cpu() != want.cpu()).sum().item()
                raise AssertionError(f"{where}: {bad} of {want.numel()} entries differ")
            return
        got, want = got.detach().double().cpu(), want.detach().double().cpu()
        if got.isnan().any() and not want.isnan().any():
            raise AssertionError(f"{where}: {got.isnan().sum().item()} of {got.numel()} values are NaN "
                                 f"(a softmax over a row that is all -inf? a 0/0?)")
        if not torch.allclose(got, want, atol=atol, rtol=rtol):
            err = (got - want).abs().max().item()
            raise AssertionError(f"{where}: values differ, largest difference {err:.3g} "
                                 f"(tolerance {atol:g} + {rtol:g} x |expected|)")
    elif isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            raise AssertionError(f"{where}: expected a dict with keys {sorted(want)}, got "
                                 f"{sorted(got) if isinstance(got, dict) else type(got).__name__}")
        for key in want:
            compare(got[key], want[key], atol, rtol, f"{where}[{key!r}]")
    elif isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            raise AssertionError(f"{where}: expected {len(want)} items, got "
                                 f"{len(got) if isinstance(got, (tuple, list)) else type(got).__name__}")
        for i, (g, w) in enumerate(zip(got, want)):
            compare(g, w, atol, rtol, f"{where}[{i}]")
    elif isinstance(want, (float, np.floating)):
        if isinstance(got, torch.Tensor) and got.numel() == 1 or isinstance(got, np.generic):
            got = got.item()
        if not isinstance(got, (int, float)) or not math.isclose(got, float(want), rel_tol=rtol, abs_tol=atol):
            raise AssertionError(f"{where}: got {got!r}, expected {want:.6g}")
    elif got != want:
        raise AssertionError(f"{where}: got {got!r}, expected {want!r}")


def _forbidden(items):
    """({code object: name} of Python functions, {builtin: name}) for `forbid`: functions, methods, classes
    (their forward, __call__ and __init__), module instances (their class's forward) and builtins."""
    codes, builtins = {}, {}
    for item in items:
        if isinstance(item, torch.nn.Module):
            item = type(item)
        if inspect.isclass(item):  # its own or inherited methods, never nn.Module's or object's (every module's)
            owners = [next((k for k in item.__mro__ if m in vars(k)), object) for m in ("forward", "__call__", "__init__")]
            targets = [vars(k)[m] for k, m in zip(owners, ("forward", "__call__", "__init__"))
                       if k not in (object, torch.nn.Module)]
        else:
            targets = [item]
        for f in targets:
            # bound and class methods; decorated functions by what they wrap (every @torch.no_grad() function
            # shares one wrapper's code object)
            f = inspect.unwrap(getattr(f, "__func__", f))
            if hasattr(f, "__code__"):
                codes[f.__code__] = f.__qualname__
            else:
                builtins[f] = getattr(f, "__qualname__", getattr(f, "__name__", repr(f)))
    return codes, builtins


def _run_isolated(answer, forbid):
    """answer(), while a profile hook notes every call of a forbidden function: (result, names called)."""
    codes, builtins = _forbidden(forbid)
    called = []

    def hook(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            called.append(codes[frame.f_code])
        elif event == "c_call" and arg in builtins:
            called.append(builtins[arg])

    previous = sys.getprofile()
    sys.setprofile(hook if (codes or builtins) else previous)
    try:
        return answer(), called
    finally:
        sys.setprofile(previous)


def check(name, answer, reference, atol=1e-5, rtol=1e-4, forbid=()):
    """Check an exercise. `answer`: a function of no arguments that runs the student's code (so that an
    untouched exercise's NotImplementedError is caught here); `reference`: the package's result; `forbid`: the
    package functions (or classes, modules, builtins) the reference was computed with, which the answer must not
    call, directly or through another package function.

    Prints "<name>: not attempted yet" or "<name>: correct"; raises AssertionError (wrong, with what differs, or
    the forbidden function it called). Returns nothing, so that a check cell shows only its one line."""
    try:
        got, called = _run_isolated(answer, forbid)
    except NotImplementedError:
        print(f"{name}: not attempted yet")
        return
    if called:
        raise AssertionError(f"{name}: the answer calls {called[0]}, the package's own version of what the exercise "
                             f"asks for; write it yourself (the check compares with it)")
    try:
        compare(got, reference, atol, rtol)
    except AssertionError as err:
        raise AssertionError(f"{name}: not right yet. {err}") from None
    print(f"{name}: correct")
