"""Repository hygiene: notebooks as STYLE.md asks, reproduce.sh's command line, config overrides."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from minidiffit.base.config import parse_overrides

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_numbered_contiguously_from_00():
    numbers = []
    for path in NOTEBOOKS:
        match = re.fullmatch(r"(\d\d)_[a-z0-9_]+\.ipynb", path.name)
        assert match, f"{path.name}: notebooks are named NN_topic.ipynb"
        numbers.append(int(match.group(1)))
    assert numbers, "no notebooks found"
    assert numbers == list(range(len(numbers))), f"notebook numbers not contiguous from 00 (the overview): {numbers}"


def test_notebook_sizes():
    sizes = {p.name: p.stat().st_size for p in NOTEBOOKS}
    for name, size in sizes.items():
        assert size < 1_000_000, f"{name} is {size / 1e6:.2f} MB; keep each notebook under 1 MB"
    assert sum(sizes.values()) < 8_000_000, "notebooks together exceed 8 MB"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_skeleton_and_execution(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    assert cells[0]["cell_type"] == "markdown" and "".join(cells[0]["source"]).lstrip().startswith("#"), \
        f"{path.name}: the first cell is the title cell"
    code = [c for c in cells if c["cell_type"] == "code"]
    # The parameters cell: the first code cells read the FAST switch.
    assert any("MINIDIFFIT_FAST" in "".join(c["source"]) for c in code[:3]), \
        f"{path.name}: the parameters cell (among the first code cells) must read MINIDIFFIT_FAST"
    # Committed executed: nbval fails a cell with outputs but no execution count.
    for c in code:
        if c.get("outputs"):
            assert c.get("execution_count") is not None, f"{path.name}: a cell has outputs but no execution count"
    assert all(c.get("execution_count") is not None for c in code if "".join(c["source"]).strip()), \
        f"{path.name}: committed unexecuted (some code cells have no execution count)"
    assert any(c.get("outputs") for c in code), f"{path.name}: no outputs committed"
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown").lower()
    assert "from notebook to package" in text, f"{path.name}: missing the closing 'From notebook to package' section"
    # No progress bars in committed output.
    # Text outputs only: a base64 PNG can spell "tqdm" by chance.
    texts = [o.get("text", "") if "text" in o else {k: v for k, v in o.get("data", {}).items() if k.startswith("text/")}
             for c in code for o in c.get("outputs", [])]
    assert "tqdm" not in json.dumps(texts), f"{path.name}: tqdm output committed"


def _reproduce(*args):
    return subprocess.run(["bash", str(ROOT / "reproduce.sh"), *args], capture_output=True, text=True, timeout=60)


def test_reproduce_help_lists_commands():
    result = _reproduce("help")
    assert result.returncode == 0
    for command in ("setup", "test", "help"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.M), f"help does not list '{command}'"
    assert _reproduce().stdout == result.stdout  # no argument = help


def test_reproduce_unknown_command_exits_2():
    result = _reproduce("no-such-command")
    assert result.returncode == 2
    assert "unknown command 'no-such-command'" in result.stderr


@dataclasses.dataclass
class _Config:
    steps: int = 10  # an int
    lr: float = 1e-3  # a float
    name: str = "tiny"  # a string
    channels: tuple = (128, 256)  # a tuple of ints
    compile: bool = False  # a flag
    limit: int | None = None  # optional


def test_parse_overrides_types():
    cfg = parse_overrides(_Config(), ["--steps=3", "--lr=2e-4", "--name=small", "--channels=64,128,128",
                                      "--compile=true", "--limit=5"])
    assert cfg == _Config(3, 2e-4, "small", (64, 128, 128), True, 5)
    assert parse_overrides(_Config(limit=5), ["--limit=none"]).limit is None
    assert parse_overrides(_Config(), []) == _Config()


@pytest.mark.parametrize("args, message", [
    (["--stpes=3"], "unknown config key 'stpes'"),
    (["--steps=three"], "expected a value of type int"),
    (["--compile=maybe"], "expected a value of type bool"),
    (["steps=3"], "write overrides as --key=value"),
])
def test_parse_overrides_errors(args, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides(_Config(), args)


# ----------------------------------------------------------------------------
# The package's shape: dependencies one way, modules one idea each


LAYERS = {"base": 0, "core": 1, "tools": 2}  # base <- core <- tools: each imports only from its own layer or below


def _layer(name):  # "base.runtime" -> "base", "tools.sample" -> "tools", "unet" -> "core"
    return name.split(".")[0] if "." in name else "core"


def _package_imports():
    """{module: set of package modules it imports}, modules named from the package root ("unet", "base.runtime",
    "tools.sample"), from the sources' relative imports (ast, nothing run)."""
    import ast

    package = ROOT / "minidiffit"
    graph = {}
    for path in sorted(package.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        here = path.relative_to(package).with_suffix("").parts  # ("tools", "sample")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                anchor = list(here[:len(here) - node.level])  # the package the dots point at
                if node.module:
                    deps.add(".".join(anchor + node.module.split(".")))
                else:
                    deps |= {".".join(anchor + [a.name]) for a in node.names}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.startswith("minidiffit") for n in names), f"{path.name}: use relative imports inside the package"
        graph[".".join(here)] = deps
    return graph


def test_import_graph_has_no_cycle_and_points_one_way():
    graph = _package_imports()
    assert "train" in graph and "tools.edm_task" in graph["tools.tasks"]  # the scan sees the imports
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in graph.get(node, ()):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    for module, deps in graph.items():
        for dep in deps:
            assert LAYERS[_layer(dep)] <= LAYERS[_layer(module)], (
                f"{module} imports {dep}: base <- core <- tools, so the core never imports tools and base imports neither")
    assert not [m for m, deps in graph.items() if "train" in deps and _layer(m) != "tools"], "only tools import the training loop"


def test_modules_stay_under_400_lines():
    for path in (ROOT / "minidiffit").rglob("*.py"):
        n = len(path.read_text().splitlines())
        assert n <= 400, f"{path.name} has {n} lines: split it (STYLE.md: one idea per module, ~400 lines)"


def test_committed_outputs_show_no_machine_paths():
    pattern = re.compile(r"(/work/|/tmp/|/root/|/home/|/Users/|[A-Z]:\\\\Users)")
    for path in NOTEBOOKS + sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb")):
        outputs = json.dumps([c.get("outputs", []) for c in json.loads(path.read_text())["cells"]])
        match = pattern.search(outputs)
        assert not match, f"{path.name}: committed output shows a machine path ({outputs[match.start():match.start() + 60]!r})"


def test_license_and_the_readme_deviation_grep_lists_every_marked_choice():
    assert (ROOT / "LICENSE").is_file() and "Permission is hereby granted" in (ROOT / "LICENSE").read_text()
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^\s*(grep [^\n]*Deviation[^\n]*)$", readme, re.M)
    assert command, "README shows the grep that lists every # Choice / # Deviation"
    listed = subprocess.run(command.group(1), shell=True, cwd=ROOT, capture_output=True, text=True).stdout
    for path in (ROOT / "minidiffit").rglob("*.py"):
        name = path.relative_to(ROOT).as_posix()
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"#\s*(Choice|Deviation)\b", line):
                assert f"{name}:{i}:" in listed, f"README's grep misses {name}:{i}: {line.strip()}"


FASHION = os.environ.get("MINIDIFFIT_FASHION_MNIST") or str(ROOT.parent / "shared/data/fashion_mnist")


@pytest.mark.skipif(not Path(FASHION, "FashionMNIST").is_dir(),
                    reason="Fashion-MNIST not found (set MINIDIFFIT_FASHION_MNIST to a torchvision root holding FashionMNIST/)")
def test_reproduce_fashion_fast_runs_every_stage_then_skips_them():
    """The laptop tier end to end in FAST mode (a few steps of each stage, a random feature net), then a rerun
    that finds every stage done. About a minute."""
    out = ROOT / "runs" / "fashion_fast"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "MINIDIFFIT_FAST": "1"}
    run = lambda: subprocess.run(["bash", str(ROOT / "reproduce.sh"), "fashion", f"--data_dir={FASHION}"],  # noqa: E731
                                 capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    first = run()
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    for f in ("edm/ckpt.pt", "edm/samples.png", "ae/ckpt.pt", "latents/manifest.json", "latent/ckpt.pt",
              "latent/samples.png", "latent/guidance_1.png", "latent/guidance_4.png"):
        assert (out / f).is_file(), f"reproduce.sh fashion did not write {f}"
    lines = (out / "results.txt").read_text().splitlines()
    assert len(lines) == 3 and all("FID" in line and "N=20" in line for line in lines)
    assert [("floor" in l, "image-space" in l, "latent" in l) for l in lines] == [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    summary = json.loads((out / "results.json").read_text())  # what prose quotes (tests/test_quotes.py)
    assert [summary[k]["fid"] for k in ("floor", "image", "latent")] == [float(l.split()[4]) for l in lines]
    assert summary["image"]["steps"] == 2 and summary["latent"]["kimg"] == 2 * 8 / 1000
    assert 0 < summary["autoencoder"]["scale"] and "psnr" in summary["autoencoder"] and summary["wall_minutes"] > 0
    second = run()
    assert second.returncode == 0 and "already done" in second.stdout and "up to date" in second.stdout
    assert (out / "results.txt").read_text().splitlines() == lines  # nothing measured twice
    # one model's samples made again (newer than its FID line): that FID alone is measured again, even though
    # the results file itself is newer than the samples (the floor's line was appended after them)
    later = time.time() + 5
    os.utime(out / "edm" / "samples_20.npz", (later, later))
    third = run()
    again = (out / "results.txt").read_text().splitlines()
    assert third.returncode == 0 and again[:3] == lines and len(again) == 4 and "image-space" in again[3]

    # the two commands that build on the laptop tier, in FAST mode: FID vs NFE, and the ablations
    nfe = subprocess.run(["bash", str(ROOT / "reproduce.sh"), "nfe"], capture_output=True, text=True, timeout=900,
                         env=env, cwd=ROOT)
    assert nfe.returncode == 0, nfe.stdout[-2000:] + nfe.stderr[-2000:]
    records = json.loads((out / "fid_vs_nfe.json").read_text())
    assert {(r["model"], r["sampler"], r["nfe"]) for r in records} == {
        ("floor", "train vs test images", 0), ("edm", "heun", 3), ("edm", "dpm++2m", 3), ("latent", "ancestral", 3),
        ("latent", "dpm++2m", 3)}
    shutil.rmtree(ROOT / "runs" / "ablations_fast", ignore_errors=True)
    abl = subprocess.run(["bash", str(ROOT / "reproduce.sh"), "ablations", f"--data_dir={FASHION}"], capture_output=True,
                         text=True, timeout=900, env=env, cwd=ROOT)
    assert abl.returncode == 0, abl.stdout[-2000:] + abl.stderr[-2000:]
    table = json.loads((ROOT / "runs" / "ablations_fast" / "results.json").read_text())
    assert [(r["family"], r["variant"]) for r in table["rows"]] == [("image", "tmsa"), ("image", "bias"),
                                                                     ("latent", "tmsa")] and table["num"] == 16
    assert all(r["kimg"] == 2 * 8 / 1000 and r["params"] > 1e6 and r["kid"] is not None for r in table["rows"])
    assert set(table["comparisons"]) == {"image", "latent"}


# ----------------------------------------------------------------------------
# reproduce.sh: what users type (issue 9's cases)


def test_reproduce_checks_every_key_before_the_first_stage():
    result = _reproduce("imagenet256", "--bogus=1")  # refused before prepare (hours of VAE encoding on a GPU box)
    assert result.returncode == 2 and "unknown config key 'bogus'" in result.stderr
    assert "prepare" not in result.stdout and "Traceback" not in result.stderr
    result = _reproduce("cifar10", "--iters=-5")
    assert result.returncode == 2 and "--iters=-5" in result.stderr and "Traceback" not in result.stderr
    result = _reproduce("fashion", "--minutes=3")
    assert result.returncode == 2 and "unknown option '--minutes=3'" in result.stderr


def test_reproduce_cifar10_samples_the_run_it_trained_and_reads_paths_from_the_callers_directory(tmp_path):
    from PIL import Image

    for i in range(8):  # a relative --data_dir, typed in the caller's directory (not the repository)
        (tmp_path / "mydata" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (30 * i, 90, 200)).save(tmp_path / "mydata" / f"c{i % 2}" / f"{i}.png")
    out = ROOT / "runs" / "test_reproduce_cifar10"
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run(["bash", str(ROOT / "reproduce.sh"), "cifar10", "--data=folder", "--data_dir=mydata",
                             "--preset=tiny", "--iters=2", "--batch=4", "--grid=0", f"--out={out}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    try:
        assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-1500:]
        assert "preset tiny" in result.stdout and f"-> {out}" in result.stdout  # the banner of this run
        assert (out / "ckpt.pt").is_file() and (out / "samples.png").is_file()  # sampled the run it trained
        assert "cifar10_cpu" not in result.stdout  # and never the default run's directory
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_reproduce_imagenet256_fast_skips_finished_stages_on_a_rerun():
    out = ROOT / "runs" / "imagenet256_fast"
    shutil.rmtree(out, ignore_errors=True)
    first = _reproduce_long("imagenet256")
    assert first.returncode == 0, first.stdout[-1500:] + first.stderr[-1500:]
    results = {p.name: p.read_text() for p in out.glob("results_*.txt")}
    assert len(results) == 2 and all(len(text.splitlines()) == 1 and "NOT a real FID" in text for text in results.values())
    second = _reproduce_long("imagenet256")
    # every stage with outputs is skipped (images, samples x2, export, ref, results x2); training says it is done
    assert second.returncode == 0 and second.stdout.count(": up to date") == 7 and "already done" in second.stdout
    assert {p.name: p.read_text() for p in out.glob("results_*.txt")} == results  # nothing re-sampled or re-appended


def _reproduce_long(*args):
    return subprocess.run(["bash", str(ROOT / "reproduce.sh"), *args], capture_output=True, text=True, timeout=900, cwd=ROOT)


def test_the_readme_module_map_counts_the_lines_of_today():
    """README's Layout gives each module's line count: a module that grew or shrank without the map fails here."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    listed = dict(re.findall(r"^\s+(\w+\.py)\s+(\d+)  ", layout, re.M))
    files = {p.name: p for p in (ROOT / "minidiffit").rglob("*.py") if p.name != "__init__.py"}
    assert set(listed) == set(files), f"README's module map lists {sorted(set(listed) ^ set(files))} differently"
    for name, count in listed.items():
        actual = len(files[name].read_text().splitlines())
        assert int(count) == actual, f"README's Layout says {name} has {count} lines; it has {actual}"


def test_the_wheel_ships_every_package_folder():
    """pyproject lists packages by name: a new folder under minidiffit/ that it misses is absent from `pip install .`."""
    listed = re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    names = set(re.findall(r'"([\w.]+)"', listed))
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "minidiffit").rglob("__init__.py")}
    assert folders == names, f"pyproject's packages {sorted(names)} vs the package folders {sorted(folders)}"
