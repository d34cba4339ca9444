"""Fault injection, bad input: every bad setting, corrupt or foreign file and wrong folder is answered with one line
`prog: error: ...` naming the key or file and the fix, exit code 2, no traceback (MINIDIFFIT_DEBUG=1 shows it),
before any work where it can be, and leaves the user's files as they were. In-process through the CLI shell
(config.run_command) with capsys; one test runs the entry points as real processes.
"""

import io
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from minidiffit.tools import evaluate as fid
from minidiffit.tools import sample as S
from minidiffit.tools import tasks as T
from test_faults import ENV, TINY, assert_one_line_error, cli, copy_run, no_temporaries, sample_ckpt, trained  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny in-process runs (see conftest.py)


def png_bytes(size=32, seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------
# train: bad settings are refused at parse time, before any work


@pytest.mark.parametrize("arg, needle", [
    ("--iters=-5", "--iters=-5"), ("--minutes=-1", "--minutes=-1"), ("--ckpt_every=-1", "--ckpt_every=-1"),
    ("--ckpt_every=0", "--ckpt_every=0"), ("--log_every=0", "--log_every=0"), ("--accum=0", "--accum=0"),
    ("--betas=0.9", "--betas=0.9"), ("--num_data=0", "--num_data=0"), ("--batch=0", "--batch=0"),
    ("--batch=-8", "--batch=-8"), ("--out=x.jpg", "--out=x.jpg"), ("--lerning_rate=1", "'lerning_rate'"),
    ("--lr=fast", "--lr=fast"), ("--betas=a,b", "comma-separated values of type float"), ("--task=gan", "'gan'"), ("iters=3", "--key=value"),
])
def test_train_bad_settings_are_one_line_errors_before_any_work(arg, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(T, "train", lambda *a, **k: pytest.fail("work started"))
    code, err = cli(T.main, TINY + ["--out=run", arg] if arg != "--out=x.jpg" else TINY + [arg], capsys)
    assert_one_line_error(code, err, "minidiffit train", needle)
    assert os.listdir(tmp_path) == []  # no run directory, no x.jpg directory


@pytest.mark.parametrize("module, args, needle", [
    ("train", TINY + ["--iters=-5"], "--iters=-5"),
    ("sample", ["--ckpt=ckpt.pt", "--num_samples=0"], "--num_samples"),
    ("fid", ["--samples=missing", "--ref=ref.npz", "--batch=0"], "--batch"),
])
def test_entry_points_as_processes_answer_one_line_and_exit_2(module, args, needle, tmp_path):
    # the real `python -m` path (runpy, __main__), as a user or reproduce.sh sees it
    result = subprocess.run([sys.executable, "-m", "minidiffit", module, *args], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result.returncode, result.stderr, f"minidiffit {module}", needle)
    assert result.stdout == "" and os.listdir(tmp_path) == []


def test_train_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "notes").write_text("mine")
    code, err = cli(T.main, TINY + [f"--out={tmp_path / 'notes'}", "--iters=1"], capsys)
    assert_one_line_error(code, err, "minidiffit train", f"--out={tmp_path / 'notes'}", "is a file")
    assert (tmp_path / "notes").read_text() == "mine"


def test_debug_switch_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setenv("MINIDIFFIT_DEBUG", "1")
    with pytest.raises(ValueError, match="--iters=-5"):
        T.main(TINY + ["--iters=-5"])


# ----------------------------------------------------------------------------
# train: the checkpoint in the run directory is empty, truncated, corrupt or someone else's


def _bad_checkpoint(kind, path, good):
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "truncated_tail":
        path.write_bytes(good[:-10])
    elif kind == "garbage":
        path.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(4000)))
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "foreign":
        torch.save({"a": 1}, path)
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "weights_only":  # sample.py can read it, a resume cannot (no optimizer, no EMA)
        ckpt = torch.load(io.BytesIO(good), weights_only=False)
        torch.save({k: ckpt[k] for k in ("model", "config", "step")}, path)
    elif kind == "directory":
        path.unlink()
        path.mkdir()


@pytest.mark.parametrize("kind", ["empty", "truncated", "truncated_tail", "garbage", "text", "foreign", "list",
                                  "weights_only", "directory"])
def test_bad_checkpoint_in_the_run_dir_is_one_line_naming_it(kind, trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    path = out / "ckpt.pt"
    _bad_checkpoint(kind, path, path.read_bytes())
    before = path.read_bytes() if path.is_file() else None
    code, err = cli(T.main, TINY + [f"--out={out}", "--iters=3", "--ckpt_every=1"], capsys)
    assert_one_line_error(code, err, "minidiffit train", path)
    assert (path.read_bytes() if path.is_file() else None) == before  # left as it was for the user to inspect


def test_resume_on_other_data_is_refused_naming_the_difference(tmp_path, capsys):
    for folder, n in (("a", 40), ("b", 60)):
        for i in range(n):
            (tmp_path / folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (4 * i, 50, 90)).save(tmp_path / folder / f"c{i % 2}" / f"{i}.png")
    args = TINY + [f"--out={tmp_path / 'run'}", "--data=folder", "--ckpt_every=1"]
    assert cli(T.main, args + [f"--data_dir={tmp_path / 'a'}", "--iters=1"], capsys)[0] == 0
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    code, err = cli(T.main, args + [f"--data_dir={tmp_path / 'b'}", "--iters=2"], capsys)
    assert_one_line_error(code, err, "minidiffit train", tmp_path / "run" / "ckpt.pt", "40 items then, 60 now", "--data_dir")
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before


# ----------------------------------------------------------------------------
# train: bad data


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_bad_image_in_a_folder_dataset_is_one_line_naming_it(damage, tmp_path, capsys):
    for i in range(4):
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / f"c{i % 2}" / f"{i}.png").write_bytes(png_bytes(seed=i))
    bad = tmp_path / "data" / "c1" / "3.png"
    good = bad.read_bytes()
    bad.write_bytes({"truncated": good[: len(good) // 2], "garbage": b"\x89PNG not really", "empty": b""}[damage])
    code, err = cli(T.main, TINY + [f"--out={tmp_path / 'run'}", "--data=folder", f"--data_dir={tmp_path / 'data'}",
                                    "--iters=1"], capsys)
    assert_one_line_error(code, err, "minidiffit train", bad, "corrupt or truncated")
    assert not (tmp_path / "run").exists()


def test_cifar10_on_a_flat_image_folder_is_reported_without_a_download(tmp_path, monkeypatch, capsys):
    import torchvision

    calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: calls.append(a) or pytest.fail("download tried"))
    for i in range(3):  # PNGs directly in the folder, no class subfolders
        (tmp_path / "flat").mkdir(exist_ok=True)
        (tmp_path / "flat" / f"{i}.png").write_bytes(png_bytes(seed=i))
    code, err = cli(T.main, TINY + ["--data=cifar10", f"--data_dir={tmp_path / 'flat'}", f"--out={tmp_path / 'run'}"], capsys)
    assert_one_line_error(code, err, "minidiffit train", tmp_path / "flat", "not in class subfolders")
    assert calls == []


def test_cifar10_missing_offline_is_one_line(tmp_path, monkeypatch, capsys):
    import torchvision

    def offline(root, train=True, download=False):  # torchvision's own error text spans lines
        raise RuntimeError("Dataset not found or corrupted.\nYou can use download=True to download it")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    code, err = cli(T.main, TINY + ["--data=cifar10", f"--data_dir={tmp_path / 'cache'}", f"--out={tmp_path / 'run'}"], capsys)
    assert_one_line_error(code, err, "minidiffit train", "could not load or download cifar10", tmp_path / "cache",
                          "--data_dir=")

# ----------------------------------------------------------------------------
# sample: bad settings, another model's folder, existing outputs


def test_sample_bad_settings_and_outputs(sample_ckpt, tmp_path, capsys):
    args = [f"--ckpt={sample_ckpt}", "--steps=1", "--batch=2"]
    code, err = cli(S.main, args + ["--num_samples=0", f"--out={tmp_path / 'pngs'}"], capsys)
    assert_one_line_error(code, err, "minidiffit sample", "--num_samples")
    assert not (tmp_path / "pngs").exists()
    (tmp_path / "file").write_text("x")  # --out names an existing file, not a folder
    code, err = cli(S.main, args + ["--num_samples=1", f"--out={tmp_path / 'file'}"], capsys)
    assert_one_line_error(code, err, "minidiffit sample", tmp_path / "file")
    code, err = cli(S.main, [f"--ckpt={tmp_path}", "--num_samples=1", f"--out={tmp_path / 'x.npz'}"], capsys)
    assert_one_line_error(code, err, "minidiffit sample", tmp_path, "directory")


@pytest.mark.parametrize("name", ["s.npz", "grid.png"])
def test_existing_npz_or_png_is_replaced_only_with_overwrite(name, sample_ckpt, tmp_path, capsys):
    out = tmp_path / name
    out.write_bytes(b"sentinel")
    args = [f"--ckpt={sample_ckpt}", "--steps=1", "--num_samples=2", f"--out={out}"]
    code, err = cli(S.main, args, capsys)
    assert_one_line_error(code, err, "minidiffit sample", out, "--overwrite=true")
    assert out.read_bytes() == b"sentinel"
    assert cli(S.main, args + ["--overwrite=true"], capsys)[0] == 0
    if name.endswith(".npz"):
        assert np.load(out)["arr_0"].shape == (2, 32, 32, 3)
    else:
        assert Image.open(out).size == (64, 32)
    assert no_temporaries(tmp_path) == []


def test_png_folder_of_another_checkpoint_is_refused(sample_ckpt, tmp_path, capsys):
    out = tmp_path / "pngs"
    assert cli(S.main, [f"--ckpt={sample_ckpt}", "--steps=1", "--num_samples=2", f"--out={out}"], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = tmp_path / "other" / "ckpt.pt"
    other.parent.mkdir()
    shutil.copy(sample_ckpt, other)
    code, err = cli(S.main, [f"--ckpt={other}", "--steps=1", "--num_samples=4", f"--out={out}"], capsys)
    assert_one_line_error(code, err, "minidiffit sample", out, "another model", str(other.resolve()))
    code, err = cli(S.main, [f"--ckpt={sample_ckpt}", "--steps=2", "--num_samples=4", f"--out={out}"], capsys)
    assert_one_line_error(code, err, "minidiffit sample", out, "steps: 1 there vs 2 now")
    (out / "source.json").write_text('{"ckpt": ')  # a corrupt record
    code, err = cli(S.main, [f"--ckpt={sample_ckpt}", "--steps=1", "--num_samples=4", f"--out={out}"], capsys)
    assert_one_line_error(code, err, "minidiffit sample", out / "source.json")
    before.pop("source.json")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "source.json"} == before


# ----------------------------------------------------------------------------
# fid: temporaries are never counted; mixed sizes and corrupt files are one-line errors


def _write_pngs(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        (folder / f"{i:05d}.png").write_bytes(png_bytes(size, seed=i))


def test_fid_counts_no_temporaries(tmp_path):
    _write_pngs(tmp_path / "s", [16] * 4)
    (tmp_path / "s" / f".00003.png.{os.getpid()}.tmp").write_bytes(b"half")  # runtime.atomic_write's
    (tmp_path / "s" / f".00004.png.{os.getpid()}.tmp").write_bytes(png_bytes(16))  # a whole one, not yet renamed
    (tmp_path / "s" / "00004.png.tmp.png").write_bytes(png_bytes(16)[:50])  # sample.py before atomic_write
    (tmp_path / "s" / ".DS_Store").write_bytes(b"litter")
    (tmp_path / "s" / "._00001.png").write_bytes(b"macOS litter")
    batches, n = fid.image_batches(tmp_path / "s", batch_size=3)
    assert n == 4 and sum(len(b) for b in batches) == 4


@pytest.fixture
def ref(tmp_path):
    dim = fid.get_network("tiny-random").feature_dim
    fid.save_reference(tmp_path / "ref.npz", np.zeros(dim), np.eye(dim), num=10)
    return tmp_path / "ref.npz"


def test_fid_samples_of_different_sizes_are_refused(ref, tmp_path, capsys):
    _write_pngs(tmp_path / "s", [16, 16, 24, 24])  # sizes change between batches of 2
    code, err = cli(fid.main, [f"--samples={tmp_path / 's'}", f"--ref={ref}", "--network=tiny-random", "--batch=2"], capsys)
    assert_one_line_error(code, err, "minidiffit fid", tmp_path / "s", "differ in size")
    code, err = cli(fid.main, [f"--samples={tmp_path / 's'}", f"--ref={ref}", "--network=tiny-random", "--batch=4"], capsys)
    assert_one_line_error(code, err, "minidiffit fid", tmp_path / "s", "differ in size")  # within one batch


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_fid_corrupt_png_is_one_line_naming_it(damage, ref, tmp_path, capsys):
    _write_pngs(tmp_path / "s", [16] * 4)
    bad = tmp_path / "s" / "00002.png"
    bad.write_bytes(bad.read_bytes()[:100] if damage == "truncated" else b"not a png")
    code, err = cli(fid.main, [f"--samples={tmp_path / 's'}", f"--ref={ref}", "--network=tiny-random"], capsys)
    assert_one_line_error(code, err, "minidiffit fid", bad, "corrupt or truncated")


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_fid_corrupt_npz_is_one_line_naming_it(damage, ref, tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    for path in (tmp_path / "s.npz", ref):
        good = path.read_bytes()
        bad = tmp_path / f"bad_{path.name}"
        bad.write_bytes({"truncated": good[: len(good) // 2], "empty": b"", "text": b"hello\n"}[damage])
        args = [f"--samples={bad}", f"--ref={ref}"] if path.name == "s.npz" else [f"--samples={path}", f"--ref={bad}"]
        code, err = cli(fid.main, args + ["--network=tiny-random"], capsys)
        assert_one_line_error(code, err, "minidiffit fid", bad, "not a readable .npz")

