"""The laptop tier's experiments as jobs of the package's own commands (recipe.py, ablations.py).

A job trains one model at a fixed number of training images (`python -m minidiffit train ...`), samples N images
from it, and scores them by FID and KID against N Fashion-MNIST test images (`python -m minidiffit fid`). Jobs run in
parallel on a GPU (`--jobs=8`: small models leave most of it idle) and one at a time on the CPU. Every job appends
one JSON row to a .jsonl file when it ends, so an interrupted experiment resumes with the jobs it lacks.
"""

import json
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = [sys.executable, "-m", "minidiffit"]

# Budgets are in training images; what they cost on the development machine (2 idle cores, torch 2.14.1, eager
# float32) is kimg / these rates in img/s: training only, measured 2026-12-04 from `python -m minidiffit train` runs
# of 4.8 kimg (edm), 7.7 (autoencoder) and 25.6 (latent) at the batch named, one at a time on an idle machine; edm at
# batch 16 and latent at 64: the tier's own stages (36 and 96 kimg, bash reproduce.sh fashion, 2026-12-05).
CPU_RATE = {("edm", 16): 71.3, ("edm", 32): 65.4, ("edm", 64): 59.8, ("edm", 128): 58.0, ("autoencoder", 64): 455.2,
            ("latent", 64): 385.0, ("latent", 128): 372.1, ("latent", 256): 402.5}


def cpu_minutes(task, batch, kimg):
    """Training minutes on 2 idle development cores, from CPU_RATE (nearest measured batch)."""
    rates = {b: r for (t, b), r in CPU_RATE.items() if t == task and r}
    if not rates:
        return float("nan")
    nearest = min(rates, key=lambda b: abs(b - batch))
    return kimg * 1000 / rates[nearest] / 60


def train_args(task, s, out, data_dir):
    """The `python -m minidiffit train` line of settings s (a dict: batch, lr, kimg, ... and task extras)."""
    iters = max(1, round(s["kimg"] * 1000 / s["batch"]))
    common = [f"--out={out}", f"--iters={iters}", f"--batch={s['batch']}", f"--lr={s['lr']}", f"--seed={s.get('seed', 0)}",
              f"--ckpt_every={max(iters // 4, 1)}", f"--log_every={max(iters // 20, 1)}", "--grid=0",
              "--bf16=false", "--compile=false"]  # float32 eager on CUDA too: the CPU's arithmetic, faster
    for key in ("warmup_kimg", "ema_halflife_kimg", "ema_rampup", "betas", "time_mode", "window_size", "arch", "p_mean", "p_std"):
        if key in s:
            common.append(f"--{key}={s[key]}")
    if task == "edm":
        return ["train", "--preset=fashion", "--data=fashion_mnist", f"--data_dir={data_dir}", "--augment_p=0", *common]
    if task == "latent":
        return ["train", "--task=latent", "--preset=fashion", f"--data_dir={s['latents']}", *common]
    return ["train", "--task=autoencoder", "--data=fashion_mnist", f"--data_dir={data_dir}", *common]


_print_lock = threading.Lock()


def say(*parts):
    with _print_lock:
        print(*parts, flush=True)


def run(args, log):
    """One package command (args after `python -m minidiffit`, or a script path) -> its stdout; output to log."""
    cmd = [sys.executable, *args] if args[0].endswith(".py") else [*PY, *args]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd[1:]) + "\n")
        f.flush()
        p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True, env=job_env())
        f.write(p.stdout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed (exit {p.returncode}); see {log}")
    return p.stdout


_threads = threading.local()  # CPU threads for the commands this thread starts (parallel() sets it per job)


def job_env():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", os.environ.get("JOB_THREADS", str(getattr(_threads, "n", os.cpu_count() or 1))))
    env["PYTHONUNBUFFERED"] = "1"
    return env


SCORE = re.compile(r"FID ([0-9.]+)(?:\s+KID ([-0-9.e]+) \+- ([0-9.e]+))?")


def score(samples, ref, network, log):
    """FID and KID of a samples npz against a reference npz with features -> dict(fid, kid, kid_std)."""
    out = run(["fid", f"--samples={samples}", f"--ref={ref}", "--pr=false", *([f"--network={network}"] if network else [])], log)
    m = SCORE.search(out)
    if not m:
        raise RuntimeError(f"no FID line in the output of fid for {samples}; see {log}")
    return dict(fid=float(m[1]), kid=float(m[2]) if m[2] else None, kid_std=float(m[3]) if m[3] else None)


def sample_args(ckpt, out, num, s):
    extra = [f"--{k}={s[k]}" for k in ("steps", "sampler", "guidance") if s.get(k)]
    return ["sample", f"--ckpt={ckpt}", f"--num_samples={num}", "--batch=100", f"--out={out}", "--overwrite=true", *extra]


def references(out, data_dir, num, network):
    """Inception statistics and features of the first num test and train images (the floor: train vs test)."""
    refs = {}
    for split in ("test", "train"):
        refs[split] = Path(out) / "fid" / f"{split}_{num}.npz"
        if not refs[split].is_file():
            run(["fid", "ref", "--data=fashion_mnist", f"--data_dir={data_dir}", f"--split={split}", f"--num={num}",
                 f"--out={refs[split]}", "--save_features=true", *([f"--network={network}"] if network else [])],
                Path(out) / "fid.log")
    floor = score(refs["train"], refs["test"], network, Path(out) / "fid.log")
    return refs["test"], floor


def done_rows(path):
    """Rows already written (a resumed experiment skips their jobs)."""
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def append_row(path, row):
    with _print_lock, open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def parallel(fns, jobs):
    """Call each fn (no arguments) on `jobs` threads, in order of submission; raises the first failure at the end.
    The cores are shared out: each job's commands get cores // jobs threads (JOB_THREADS= overrides)."""
    def with_threads(fn):
        _threads.n = max(1, (os.cpu_count() or 1) // jobs)
        return fn()

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(with_threads, fn) for fn in fns]
    errors = [f.exception() for f in futures if f.exception()]
    for e in errors:
        say(f"FAILED: {e}")
    if errors:
        raise SystemExit(f"{len(errors)} job(s) failed")
    return [f.result() for f in futures]
