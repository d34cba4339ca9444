"""The course: `course.check` itself, and the exercise / solutions notebooks kept in step (issue 13).

Every notebook 01.. ends in an "## Exercises" section whose check cells say "not attempted yet" as committed;
notebooks/solutions/NN_topic_solutions.ipynb holds the same set-up and check cells after worked answers, and
its committed checks say "correct". nbval runs both in CI (reproduce.sh test), comparing the check lines.
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minidiffit.base.course import check, compare

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb") if not p.name.startswith("00_"))
SOLUTIONS = ROOT / "notebooks" / "solutions"


# ----------------------------------------------------------------------------
# check / compare


def _untouched():
    raise NotImplementedError


def test_check_untouched_right_and_wrong(capsys):
    ref = torch.arange(6.0).reshape(2, 3)
    check("x.1 untouched", _untouched, ref)
    assert capsys.readouterr().out == "x.1 untouched: not attempted yet\n"
    check("x.2 right", lambda: ref + 1e-7, ref)
    assert capsys.readouterr().out == "x.2 right: correct\n"
    with pytest.raises(AssertionError, match=r"x.3 wrong: not right yet\. answer: values differ, largest difference 0.5"):
        check("x.3 wrong", lambda: ref + 0.5, ref)
    with pytest.raises(AssertionError, match=r"shape \(3, 2\), expected \(2, 3\)"):
        check("x.4 shape", lambda: ref.T, ref)
    with pytest.raises(AssertionError, match="values are NaN"):
        check("x.5 nan", lambda: ref * float("nan"), ref)
    # Other errors in the student's code are the student's to see, not swallowed.
    with pytest.raises(ZeroDivisionError):
        check("x.6 crash", lambda: 1 / 0, ref)


def test_compare_kinds():
    compare({"a": (np.ones(3), 2.0)}, {"a": (torch.ones(3, dtype=torch.float64), 2.0)})
    compare(torch.tensor(0.25), 0.25)
    compare(np.float32(0.5), 0.5)
    compare("heun", "heun")
    compare(torch.tensor([1, 2]), torch.tensor([1, 2]))
    for got, want, message in [
        ({"a": 1}, {"a": 1, "b": 2}, "keys"),
        ([1, 2], [1, 2, 3], "expected 3 items"),
        (torch.tensor([1, 3]), torch.tensor([1, 2]), "1 of 2 entries differ"),
        (0.3, 0.25, "expected 0.25"),
        ("euler", "heun", "expected 'heun'"),
        (3.0, torch.ones(2), "expected a tensor"),
    ]:
        with pytest.raises(AssertionError, match=message):
            compare(got, want)


# ----------------------------------------------------------------------------
# The notebooks


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _src(cell):
    return "".join(cell["source"])


def _text(cell):
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []))


def _exercises(path):
    """(set-up cell, check cells) of the notebook's '## Exercises' section."""
    cells = _cells(path)
    start = next((i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and _src(c).startswith("## Exercises")),
                 None)
    assert start is not None, f"{path.name}: no '## Exercises' section"
    code = [c for c in cells[start:] if c["cell_type"] == "code"]
    return code[0], [c for c in code if "check(" in _src(c)]


def test_the_course_has_exercises_from_01():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers[0] == 1 and len(numbers) >= 10


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_are_checked_and_untouched_as_committed(path):
    setup, checks = _exercises(path)
    assert 2 <= len(checks) <= 4, f"{path.name}: {len(checks)} exercises, the course asks for 2-4"
    assert "from minidiffit.base.course import check" in _src(setup), f"{path.name}: the set-up cell imports check"
    number = str(int(path.name[:2]))
    for cell in checks:
        assert _src(cell).startswith("# NBVAL_CHECK_OUTPUT"), f"{path.name}: check cells are compared by nbval"
        line = _text(cell).strip()
        assert re.fullmatch(rf"{number}\.\d [^\n]+: not attempted yet", line), \
            f"{path.name}: a committed check cell printed {line!r}, not '{number}.k ...: not attempted yet'"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_solutions_run_the_same_checks_and_pass(path):
    solutions = SOLUTIONS / path.name.replace(".ipynb", "_solutions.ipynb")
    assert solutions.is_file(), f"{path.name}: no {solutions.relative_to(ROOT)}"
    setup, checks = _exercises(path)
    cells = _cells(solutions)
    code = [c for c in cells if c["cell_type"] == "code"]
    assert any("MINIDIFFIT_FAST" in _src(c) for c in code[:2]), f"{solutions.name}: the parameters cell reads FAST"
    assert _src(setup) in [_src(c) for c in code], f"{solutions.name}: the exercise set-up cell differs from {path.name}'s"
    solved = [c for c in code if "check(" in _src(c)]
    assert [_src(c) for c in solved] == [_src(c) for c in checks], \
        f"{solutions.name}: its check cells must be those of {path.name}, in the same order"
    assert all(c.get("execution_count") is not None for c in code), f"{solutions.name}: committed unexecuted"
    for cell, mine in zip(solved, checks):
        name = _text(mine).strip().rsplit(":", 1)[0]
        assert _text(cell).strip() == f"{name}: correct", f"{solutions.name}: {name} did not print 'correct'"


def test_every_relative_link_and_figure_in_the_notebooks_exists():
    pattern = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
    for path in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        for cell in _cells(path):
            if cell["cell_type"] != "markdown":
                continue
            for target in pattern.findall(_src(cell)):
                if re.match(r"[a-z]+:", target) or target.startswith("#"):
                    continue
                assert (path.parent / target.split("#")[0]).exists(), \
                    f"{path.relative_to(ROOT)} links to {target}, which does not exist"


def test_the_overview_maps_every_notebook():
    overview = ROOT / "notebooks" / "00_overview.ipynb"
    text = "\n".join(_src(c) for c in _cells(overview))
    for path in NOTEBOOKS:
        assert f"]({path.name})" in text, f"00_overview.ipynb does not link {path.name}"


# ----------------------------------------------------------------------------
# Isolation: an answer that calls the package function it is checked against fails


def test_an_answer_that_calls_the_forbidden_function_fails_even_when_right(capsys):
    from minidiffit.attention import Attention, attention
    from minidiffit.diffusion import edm_loss

    q = k = v = torch.randn(1, 2, 5, 4)
    own = lambda: torch.softmax(q @ k.transpose(-2, -1) / 2, -1) @ v  # noqa: E731
    check("x.1 own answer", own, attention(q, k, v), forbid=[attention])
    assert capsys.readouterr().out.strip() == "x.1 own answer: correct"
    with pytest.raises(AssertionError, match="x.2 direct: the answer calls attention"):
        check("x.2 direct", lambda: attention(q, k, v), attention(q, k, v), forbid=[attention])
    layer = Attention(8, 2)
    x = torch.randn(3, 4, 8)
    with pytest.raises(AssertionError, match="calls attention"):  # reached through another package function
        check("x.3 indirect", lambda: layer(x), layer(x), forbid=[attention])
    with pytest.raises(AssertionError, match="calls Attention.forward"):  # a module instance forbids its forward
        check("x.4 module", lambda: layer(x), layer(x), forbid=[layer])
    with pytest.raises(AssertionError, match="scaled_dot_product_attention"):  # builtins too
        check("x.5 builtin", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), own(),
              forbid=[torch.nn.functional.scaled_dot_product_attention])

    def untouched():
        raise NotImplementedError

    check("x.6 untouched", untouched, 1.0, forbid=[edm_loss])
    assert capsys.readouterr().out.strip() == "x.6 untouched: not attempted yet"
    assert sys.getprofile() is None  # the hook is gone afterwards


# Exercises whose reference is not one package function a student could call instead of answering.
UNFORBIDDEN = {
    "4.4 one pixel's reach": "the answer is arithmetic on window sizes; the reference probes the network",
    "7.3 rescaled latents": "the answer builds a model; the check itself measures it with measure_scale",
}


def test_every_check_names_what_it_forbids():
    for path in NOTEBOOKS:
        for cell in _exercises(path)[1]:
            for name in re.findall(r'check\(\s*"([^"]+)"', _src(cell)):
                if name not in UNFORBIDDEN:
                    assert "forbid=" in _src(cell), f"{path.name}: check {name!r} names no forbid= (what it compares with)"


def test_decorated_functions_are_told_apart():
    """Every @torch.no_grad() function shares one wrapper: forbidding one must not forbid all of them."""
    from minidiffit.diffusion import heun_sample, stochastic_sample

    x = torch.zeros(2, 3)
    denoiser = lambda x, sigma: x * 0  # noqa: E731
    check("x.7 another decorated function", lambda: heun_sample(denoiser, x, num_steps=2), heun_sample(denoiser, x, num_steps=2),
          forbid=[stochastic_sample])
