"""Exercise checks for the course: run a student's answer and compare it with the package's own.

Every exercise at the end of notebooks/NN_*.ipynb is followed by a check cell that calls `check`. An
untouched exercise raises NotImplementedError, and `check` prints "not attempted yet" instead of failing;
a wrong answer raises an AssertionError that names the exercise and what differs; a right one prints
"correct". The solutions (notebooks/solutions/) run the same check cells under nbval, so an exercise
that the package's API has broken fails CI. Introduced in notebooks/01_attention.ipynb.
"""

import math

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


def check(name, answer, reference, atol=1e-5, rtol=1e-4):
    """Check an exercise. `answer`: a function of no arguments that runs the student's code (so that an
    untouched exercise's NotImplementedError is caught here); `reference`: the package's result.

    Prints "<name>: not attempted yet" or "<name>: correct"; raises AssertionError (wrong, with what differs).
    Returns nothing, so that a check cell shows only its one line."""
    try:
        got = answer()
    except NotImplementedError:
        print(f"{name}: not attempted yet")
        return
    try:
        compare(got, reference, atol, rtol)
    except AssertionError as err:
        raise AssertionError(f"{name}: not right yet. {err}") from None
    print(f"{name}: correct")
