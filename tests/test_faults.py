"""Fault injection, faults in running work: divergence, a full disk, SIGKILL. Each ends in one line naming the
file (exit code 2, no traceback) or in correct behaviour: the last good checkpoint kept bit for bit, a resume
bit-identical to a run never interrupted, no partial or temporary file left. Bad input: test_faults_cli.py.

Kills are real SIGKILLs of `python -m minidiffit train` / `sample` subprocesses at seeded random moments; a full
disk is a writer raising ENOSPC (monkeypatched) or /dev/full behind the temporary file (a real ENOSPC from the
kernel, no mount needed); the rest runs in-process through the CLI shell (config.run_command). The helpers
here are shared with test_faults_cli.py.
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from minidiffit.tools import edm_task
from minidiffit.tools import evaluate as fid
from minidiffit.tools import sample as S
from minidiffit import train as loop
from minidiffit.tools import tasks as T
from conftest import random_tiny_checkpoint
from minidiffit.base.runtime import load_checkpoint, temporary_path

TINY = ["--preset=tiny", "--data=synthetic", "--num_data=24", "--batch=4", "--grid=0", "--augment_p=0",
        "--warmup_kimg=0.02", "--compile=false"]
# Subprocesses run single-threaded: the same float reductions in every run (bit-identical), and no fight for
# the CI machine's two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ENV.pop("MINIDIFFIT_DEBUG", None)
pytestmark = pytest.mark.usefixtures("one_thread")  # the in-process runs too (see conftest.py)


def cli(main, args, capsys):
    """(exit code, stderr) of an entry point's main(args), in-process; 0 when it returns."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, prog, *needles):
    """Exit code 2 and exactly one line `prog: error: ...` that contains every needle, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"


def read_metrics(path):
    """metrics.jsonl as records; every line must be strict JSON (a bare NaN/Infinity token fails)."""
    def no_constants(token):
        raise AssertionError(f"{path}: non-JSON constant {token}")
    return [json.loads(line, parse_constant=no_constants) for line in Path(path).read_text().splitlines()]


def assert_same_state(a, b):
    """Two checkpoints hold bit-identical model, EMA and optimizer states (and the same step)."""
    a, b = load_checkpoint(a), load_checkpoint(b)
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"] and opt_a["state"].keys() == opt_b["state"].keys()
    for i, state in opt_a["state"].items():
        for k, v in state.items():
            assert torch.equal(v, opt_b["state"][i][k]), f"optimizer state {i}.{k} differs"


def no_temporaries(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory after 2 steps (a checkpoint at each), made once; tests copy it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    T.train(T.config_from_args(TINY + [f"--out={out}", "--iters=2", "--ckpt_every=1"]), log=lambda *a: None)
    return out


def copy_run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


@pytest.fixture(scope="module")
def sample_ckpt(tmp_path_factory):
    """A tiny-preset checkpoint with random (not zero-initialised) weights, so samples depend on the net."""
    return random_tiny_checkpoint(tmp_path_factory.mktemp("model") / "ckpt.pt", step=7, sample_steps=4)


# ----------------------------------------------------------------------------
# train: divergence stops the run and keeps the last good checkpoint, bit for bit


def test_injected_nan_loss_stops_and_keeps_the_last_good_checkpoint(trained, tmp_path, monkeypatch, capsys):
    out = copy_run(trained, tmp_path)
    before = (out / "ckpt.pt").read_bytes()
    real_loss = edm_task.loss
    monkeypatch.setattr(edm_task, "loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    # ckpt_every=1 < max_bad_steps: checkpoints fall due during the streak and must wait for a finite step
    code, err = cli(T.main, TINY + [f"--out={out}", "--iters=30", "--ckpt_every=1", "--max_bad_steps=3"], capsys)
    assert_one_line_error(code, err, "minidiffit train", "not finite for 3 steps", "diverged", out / "ckpt.pt")
    assert (out / "ckpt.pt").read_bytes() == before
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_too_high_lr_diverges_and_the_checkpoint_is_the_last_finite_step(tmp_path, capsys):
    args = TINY + ["--lr=1e3", "--warmup_kimg=0", "--ckpt_every=1", "--max_bad_steps=3"]
    code, err = cli(T.main, args + [f"--out={tmp_path / 'a'}", "--iters=40"], capsys)
    assert_one_line_error(code, err, "minidiffit train", "diverged", "--lr=1000")
    records = read_metrics(tmp_path / "a" / "metrics.jsonl")
    last = load_checkpoint(tmp_path / "a" / "ckpt.pt")
    assert records[-1]["step"] == last["step"] and records[-1]["loss"] is not None  # the last record is a good step
    for key in ("model", "ema"):
        assert all(torch.isfinite(w).all() for w in last[key].values())
    # that checkpoint is exactly what a run stopped at its step holds
    assert cli(T.main, args + [f"--out={tmp_path / 'b'}", f"--iters={last['step']}"], capsys)[0] == 0
    assert_same_state(tmp_path / "a" / "ckpt.pt", tmp_path / "b" / "ckpt.pt")


def test_nonfinite_weights_are_never_checkpointed(trained, tmp_path, monkeypatch, capsys):
    out = copy_run(trained, tmp_path)
    before = (out / "ckpt.pt").read_bytes()
    real_update = loop.ema_update

    def poisoned(ema, model, beta):  # the step's update leaves a NaN in the weights
        real_update(ema, model, beta)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")

    monkeypatch.setattr(loop, "ema_update", poisoned)
    code, err = cli(T.main, TINY + [f"--out={out}", "--iters=5", "--ckpt_every=1"], capsys)
    assert_one_line_error(code, err, "minidiffit train", "weights are no longer finite at step 3", out / "ckpt.pt")
    assert (out / "ckpt.pt").read_bytes() == before
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_a_metrics_line_cut_short_is_dropped_on_resume(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "kimg": 0.0')  # a kill or a full disk while appending
    assert cli(T.main, TINY + [f"--out={out}", "--iters=3", "--ckpt_every=1"], capsys)[0] == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


# ----------------------------------------------------------------------------
# Full disk: the message names the file and says so; nothing partial is left; the previous file is intact


def test_disk_full_while_writing_a_checkpoint(trained, tmp_path, monkeypatch, capsys):
    out = copy_run(trained, tmp_path)
    before = (out / "ckpt.pt").read_bytes()
    real_save = torch.save

    def full(obj, f, *a, **k):
        f.write(b"x" * 5000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    code, err = cli(T.main, TINY + [f"--out={out}", "--iters=3", "--ckpt_every=1"], capsys)
    assert_one_line_error(code, err, "minidiffit train", out / "ckpt.pt", "no space")
    assert (out / "ckpt.pt").read_bytes() == before
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl"]  # no temporary left
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the rerun continues from step 2
    assert cli(T.main, TINY + [f"--out={out}", "--iters=3", "--ckpt_every=1"], capsys)[0] == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("how", ["monkeypatch", "dev_full"])
def test_disk_full_while_writing_a_sample_png(how, sample_ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pngs"
    target = out / "00001.png"
    if how == "dev_full":  # the kernel's own ENOSPC: the temporary file atomic_write opens is /dev/full
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full on this system (the monkeypatched case covers the same path)")
        real_save_png = S.save_png

        def save_png(array, path):
            if Path(path) == target:
                os.symlink("/dev/full", temporary_path(target))
            real_save_png(array, path)

        monkeypatch.setattr(S, "save_png", save_png)
    else:
        real_save = Image.Image.save

        def full(self, fp, *a, **k):
            if getattr(fp, "name", "").endswith(f".00001.png.{os.getpid()}.tmp"):
                fp.write(b"\x89PNG half")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(self, fp, *a, **k)

        monkeypatch.setattr(Image.Image, "save", full)
    code, err = cli(S.main, [f"--ckpt={sample_ckpt}", f"--out={out}", "--num_samples=3", "--batch=1", "--steps=1"], capsys)
    assert_one_line_error(code, err, "minidiffit sample", target, "no space")
    assert sorted(os.listdir(out)) == ["00000.png", "source.json"]  # nothing partial, no temporary

# ----------------------------------------------------------------------------
# SIGKILL at random moments, then resume: bit-identical to a run never interrupted


N_ITERS = 16
TRAIN = TINY + ["--ckpt_every=1", "--log_every=1000", f"--iters={N_ITERS}"]


def _train_cmd(out):
    return [sys.executable, "-m", "minidiffit", "train", *TRAIN, f"--out={out}"]


def _wait_for(predicate, proc, timeout=60):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None or time.time() - t0 > timeout:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(_train_cmd(out), env=ENV, check=True, capture_output=True, timeout=300)
    return out


def _assert_resumed_equals_reference(out, reference_run):
    assert_same_state(out / "ckpt.pt", reference_run / "ckpt.pt")
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, N_ITERS + 1))
    assert no_temporaries(out) == []


def test_sigkill_at_random_moments_then_resume_is_bit_identical(reference_run, tmp_path):
    # ~10 s: four training subprocesses (each pays ~1.5 s of imports) plus the shared reference run
    rng, out = random.Random(0), tmp_path / "run"
    kills = 0
    for _ in range(3):
        ckpt = out / "ckpt.pt"
        stamp = ckpt.stat().st_mtime_ns if ckpt.exists() else None
        proc = subprocess.Popen(_train_cmd(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # wait until this process has written a checkpoint of its own, then kill it a random moment later
        if _wait_for(lambda: ckpt.exists() and ckpt.stat().st_mtime_ns != stamp, proc):
            time.sleep(rng.uniform(0, 0.25))
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        else:
            assert proc.returncode == 0, proc.stderr.read().decode()
            break  # finished before the kill landed
    assert kills >= 1
    done = subprocess.run(_train_cmd(out), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _assert_resumed_equals_reference(out, reference_run)


# Run as `python -c`: train, but the third checkpoint write is killed (SIGKILL) halfway through torch.save,
# after its metrics line was appended: the worst moment for both files.
KILL_IN_CHECKPOINT = """
import os, signal, sys, torch
from minidiffit.tools import tasks as train
real_save, calls = torch.save, []
def save(obj, f, *a, **k):
    calls.append(1)
    if len(calls) == 3:
        f.write(b"PK half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
torch.save = save
train.main(sys.argv[1:])
"""


def test_kill_during_a_checkpoint_write_then_resume(reference_run, tmp_path):
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILL_IN_CHECKPOINT, *TRAIN, f"--out={out}"], env=ENV,
                            capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    leftovers = [p.name for p in out.glob(".ckpt.pt.*.tmp")]
    assert len(leftovers) == 1 and (out / leftovers[0]).read_bytes() == b"PK half a checkpoint"
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2  # the previous checkpoint, whole
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]  # one line ahead of it
    done = subprocess.run(_train_cmd(out), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stdout and "at step 2" in done.stdout
    _assert_resumed_equals_reference(out, reference_run)  # one metrics line per step, the leftover removed


# ----------------------------------------------------------------------------
# sample: SIGKILL mid-folder, resume, and the folder equals an uninterrupted one's, byte for byte


def test_sigkill_while_sampling_then_resume_is_bit_identical(sample_ckpt, tmp_path):
    # ~9 s: three sampling subprocesses of 8 images
    def cmd(out):
        return [sys.executable, "-m", "minidiffit", "sample", f"--ckpt={sample_ckpt}", f"--out={out}", "--num_samples=8",
                "--batch=1", "--steps=8"]

    subprocess.run(cmd(tmp_path / "ref"), env=ENV, check=True, capture_output=True, timeout=300)
    out = tmp_path / "pngs"
    proc = subprocess.Popen(cmd(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert _wait_for(lambda: (out / "00000.png").exists(), proc)
    time.sleep(random.Random(1).uniform(0, 0.4))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "sampling finished before the kill: make it slower"
    made = sorted(p.name for p in out.glob("*.png"))
    assert 1 <= len(made) < 8
    (out / f".{S.png_name(len(made))}.99999.tmp").write_bytes(b"half")  # as a kill inside save_png leaves it
    done = subprocess.run(cmd(out), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"rank 0 has {8 - len(made)} images to make" in done.stdout
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()}  # no temporary left either
    assert fid.image_batches(out)[1] == 8


# ----------------------------------------------------------------------------
# A run that ends inside a non-finite streak fails; Ctrl-C is one line; a live run's folder is locked


def test_a_run_ending_with_a_nonfinite_loss_fails_and_saves_nothing(tmp_path, capsys):
    # lr 1e3: the loss is not finite from the first steps on, and max_bad_steps is never reached before the end
    args = TINY + ["--lr=1e3", "--warmup_kimg=0", "--max_bad_steps=100", "--iters=15", f"--out={tmp_path / 'run'}"]
    code, err = cli(T.main, args, capsys)
    assert_one_line_error(code, err, "minidiffit train", "ended at step 15 with a non-finite loss", "--lr=1000",
                          "No checkpoint was written")
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_ctrl_c_ends_training_with_one_line_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "minidiffit", "train", *TINY, f"--out={out}", "--iters=100000", "--ckpt_every=2"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: (out / "ckpt.pt").exists(), proc)
    assert json.loads((out / ".lock").read_text())["pid"] == proc.pid  # the live run holds its folder
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("minidiffit train: interrupted at step ") and "the same command resumes" in lines[0]
    assert not (out / ".lock").exists()  # released on the way out
    step = load_checkpoint(out / "ckpt.pt")["step"]
    assert f"holds step {step}" in lines[0]
    done = subprocess.run(cmd[:-2] + [f"--out={out}", f"--iters={step + 1}"], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and f"resumed {out / 'ckpt.pt'} at step {step}" in done.stdout, done.stderr


def test_a_folder_in_use_by_a_live_run_is_refused_naming_its_pid(tmp_path, capsys):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        code, err = cli(T.main, TINY + [f"--out={out}", "--iters=1"], capsys)
        assert_one_line_error(code, err, "minidiffit train", f"in use by another run (pid {other.pid})")
        assert os.listdir(out) == [".lock"]  # nothing read, nothing written, the live run's lock left alone
    finally:
        other.kill()
        other.wait()
    # its owner is dead now: the lock is stale and the next run takes it over, then releases it
    code, err = cli(T.main, TINY + [f"--out={out}", "--iters=1"], capsys)
    assert code == 0, err
    assert load_checkpoint(out / "ckpt.pt")["step"] == 1 and not (out / ".lock").exists()
