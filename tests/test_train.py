"""The training loop: exact resume, DDP == one process, EMA and lr formulas, atomic and guarded checkpoints."""

import dataclasses
import os
import socket
import types
from dataclasses import dataclass

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from minidiffit.tools import edm_task, latent_task, tasks
from minidiffit import train as T
from minidiffit.base.data import synthetic_dataset
from minidiffit.diffusion import EDMPrecond
from minidiffit.base.runtime import load_checkpoint, save_checkpoint, seeded_noise
from minidiffit.train import DataOrder, ema_beta, ema_update, learning_rate


def tiny_cfg(out, cls=edm_task.Config, **kw):
    base = dict(preset="tiny", data="synthetic", num_data=24, out=str(out), batch=4, iters=2, warmup_kimg=0.02,
                ckpt_every=1000, log_every=1000, grid=0)
    return cls(**{**base, **kw})


# A toy task registered the way a new task is (a module-like object in tasks.TASKS): EDM's loss and augmentation
# around an 8x8 conv net with dropout, so the loop's tests run in seconds and cover every random draw.
class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.emb = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(1 + 9, 8)
        self.drop, self.conv2 = nn.Dropout(0.2), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, noise_labels, augment_labels=None):  # (B, 3, 8, 8), (B,), (B, 9) -> (B, 3, 8, 8)
        a = augment_labels if augment_labels is not None else x.new_zeros(len(x), 9)
        e = self.emb(torch.cat([noise_labels[:, None], a], dim=1))  # (B, 8)
        return self.conv2(self.drop(F.silu(self.conv1(x) + e[:, :, None, None])))


@dataclass
class ToyConfig(edm_task.Config):
    task: str = "toy"


TOY = types.SimpleNamespace(Config=ToyConfig, build_model=lambda cfg: EDMPrecond(ToyNet()), loss=edm_task.loss,
                            generate=lambda model, seeds, cfg, steps: seeded_noise(seeds, (3, 8, 8)).clamp(-1, 1),
                            load_data=lambda cfg: synthetic_dataset(cfg.num_data, resolution=8))
tasks.TASKS["toy"] = TOY


def toy_cfg(out, **kw):
    return tiny_cfg(out, cls=ToyConfig, **{"batch": 8, **kw})


def quiet(*args, **kwargs):
    pass


def test_four_steps_equal_two_plus_resume_plus_two(tmp_path):
    tasks.train(tiny_cfg(tmp_path / "a", iters=4), log=quiet)
    tasks.train(tiny_cfg(tmp_path / "b", iters=2), log=quiet)
    mid = load_checkpoint(tmp_path / "b" / "ckpt.pt")
    tasks.train(tiny_cfg(tmp_path / "b", iters=4), log=quiet)  # resumes at step 2
    a, b = load_checkpoint(tmp_path / "a" / "ckpt.pt"), load_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert a["step"] == b["step"] == 4 and mid["step"] == 2
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert a["data"] == b["data"] and a["data"]["count"] == 24  # the data's fingerprint
    assert {"torch", "numpy", "python"} <= set(a["rng"])


def test_ema_in_the_loop_follows_the_formula(tmp_path):
    cfg = toy_cfg(tmp_path, iters=1)
    tasks.train(cfg, log=quiet)
    one = load_checkpoint(tmp_path / "ckpt.pt")
    for name in one["model"]:  # step 0: half-life min(500k, 0 * 0.05) = 0 -> beta 0 -> EMA = weights
        assert torch.equal(one["ema"][name], one["model"][name])
    tasks.train(dataclasses.replace(cfg, iters=2), log=quiet)
    two = load_checkpoint(tmp_path / "ckpt.pt")
    beta = 0.5 ** (8 / (8 * 0.05))  # step 1: 8 images seen, half-life 0.4 images
    changed = 0
    for name, w in two["model"].items():
        if w.is_floating_point():
            torch.testing.assert_close(two["ema"][name], beta * one["ema"][name] + (1 - beta) * w, rtol=1e-6, atol=1e-7)
            changed += not torch.equal(w, one["model"][name])
    assert changed > 0  # the second step moved the weights (lr > 0), so the check above has teeth


def test_ema_beta_and_lr_formulas():
    # EDM: half-life = min(0.5 Mimg, 0.05 * images seen); beta = 0.5 ** (batch / half-life)
    assert ema_beta(0, 512) == 0.0
    assert ema_beta(1_000_000, 512) == pytest.approx(0.5 ** (512 / 50_000))
    assert ema_beta(100_000_000, 512) == pytest.approx(0.5 ** (512 / 500_000))
    assert ema_beta(10**9, 512, rampup=None) == pytest.approx(0.5 ** (512 / 500_000))
    assert ema_beta(0, 256, halflife_kimg=1774.5, rampup=0) == pytest.approx(0.9999, abs=1e-7)  # no ramp: DiT's constant
    cfg = edm_task.Config()
    assert learning_rate(cfg, 0) == 0 and learning_rate(cfg, 5_000_000) == pytest.approx(5e-4)
    assert learning_rate(cfg, 20_000_000) == pytest.approx(1e-3)
    no_warmup = dataclasses.replace(cfg, warmup_kimg=0)  # DiT recipe: the full lr from the first step
    assert learning_rate(no_warmup, 0) == no_warmup.lr
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    old = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, o, p in zip(ema.parameters(), old, model.parameters()):
        torch.testing.assert_close(e, 0.9 * o + 0.1 * p)


def test_data_order_covers_each_epoch_once():
    order = DataOrder(10, seed=1)
    first = torch.cat([order.batch(s, 5) for s in range(2)])
    assert sorted(first.tolist()) == list(range(10))
    spanning = order.batch(1, 7)  # positions 7..13: end of epoch 0, start of epoch 1
    assert torch.equal(spanning[:3], order.permutation(0)[7:]) and torch.equal(spanning[3:], order.permutation(1)[:4])
    assert not torch.equal(order.permutation(0), order.permutation(1))


def test_atomic_checkpoint_survives_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = torch.load(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary left behind


def test_mismatched_checkpoint_is_refused_clearly(tmp_path):
    tasks.train(toy_cfg(tmp_path, iters=1), log=quiet)
    with pytest.raises(ValueError, match=r"different run \(lr: checkpoint 0.001 vs now 0.002\).*--out="):
        tasks.train(toy_cfg(tmp_path, iters=2, lr=2e-3), log=quiet)
    with pytest.raises(ValueError, match="different run.*preset: checkpoint 'tiny' vs now 'small'"):
        tasks.train(toy_cfg(tmp_path, iters=2, preset="small"), log=quiet)
    tasks.train(toy_cfg(tmp_path, iters=1, ckpt_every=7, minutes=5), log=quiet)  # run-length settings may change


def test_a_setting_newer_than_the_checkpoint_resumes_at_its_default(tmp_path):
    # A checkpoint written before a setting existed (here: edm_task's ablation keys) was made with its default.
    tasks.train(tiny_cfg(tmp_path, iters=1), log=quiet)
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    for key in ("arch", "time_mode", "window_size"):
        del ckpt["config"][key]
    save_checkpoint(ckpt, tmp_path / "ckpt.pt")
    assert tasks.train(tiny_cfg(tmp_path, iters=2), log=quiet) == 2
    with pytest.raises(ValueError, match="different run.*time_mode: checkpoint None vs now 'mlp'"):
        tasks.train(tiny_cfg(tmp_path, iters=3, time_mode="mlp"), log=quiet)


def test_time_budget_stops_with_a_checkpoint_and_rerun_is_a_no_op(tmp_path):
    lines = []
    tasks.train(toy_cfg(tmp_path, iters=1000, minutes=1e-6), log=lines.append)  # budget exhausted after 1 step
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 1 and ckpt["elapsed_s"] > 0
    lines.clear()
    assert tasks.train(toy_cfg(tmp_path, iters=1000, minutes=1e-6), log=lines.append) == 1
    assert "already done" in lines[-1]


def test_cli_rejects_unknown_keys(capsys):
    with pytest.raises(SystemExit) as e:
        tasks.main(["--preset=tiny", "--lerning_rate=1"])
    assert e.value.code == 2
    assert "unknown config key 'lerning_rate'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown task 'gan'"):
        tasks.get_task("gan")


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        tasks.train(toy_cfg(out, iters=3, warmup_kimg=0.008), log=quiet)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "ddp")), nprocs=2, join=True)
    # one process accumulating the same two micro-batches of 4 = two ranks with 4 each
    tasks.train(toy_cfg(tmp_path / "one", iters=3, warmup_kimg=0.008, accum=2), log=quiet)
    a, b = load_checkpoint(tmp_path / "ddp" / "ckpt.pt"), load_checkpoint(tmp_path / "one" / "ckpt.pt")
    for name, w in a["model"].items():
        torch.testing.assert_close(w, b["model"][name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a["ema"][name], b["ema"][name], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    init = TOY.build_model(None).state_dict()
    assert any(not torch.allclose(w, init[n]) for n, w in a["model"].items())  # training did move the weights


# The latent task too: its flips (drawn by the dataset) come after the per-step reseed, so 2 ranks = 1 accumulating.


def _latent_cfg(latents, out, **kw):
    from minidiffit.tools import latent_task

    return latent_task.Config(preset="tiny", data_dir=str(latents), out=str(out), batch=8, iters=3, lr=1e-3,
                              ckpt_every=1000, log_every=1000, grid=0, compile=False, ema_halflife_kimg=0.01, **kw)


def _latent_ddp_worker(rank, world, port, latents, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        tasks.train(_latent_cfg(latents, out), log=quiet)
    finally:
        torch.distributed.destroy_process_group()


def test_latent_task_two_processes_match_one_process_accumulating(tmp_path):
    from minidiffit.tools.imagenet import PrepareConfig, make_synthetic_imagefolder, prepare

    make_synthetic_imagefolder(tmp_path / "images", num_classes=4, per_class=3, size=64)
    prepare(PrepareConfig(data_dir=str(tmp_path / "images"), out=str(tmp_path / "latents"), image_size=64, vae="tiny",
                          batch=12, shard_size=8, num_workers=0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_latent_ddp_worker, args=(2, port, str(tmp_path / "latents"), str(tmp_path / "ddp")), nprocs=2, join=True)
    tasks.train(_latent_cfg(tmp_path / "latents", tmp_path / "one", accum=2), log=quiet)
    a, b = load_checkpoint(tmp_path / "ddp" / "ckpt.pt"), load_checkpoint(tmp_path / "one" / "ckpt.pt")
    for name, w in a["model"].items():
        torch.testing.assert_close(w, b["model"][name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(a["ema"][name], b["ema"][name], rtol=1e-5, atol=1e-6, msg=name)
    assert a["model"]["final_layer.linear.weight"].abs().max() > 0  # the zero-initialised head has moved

    # the same step reads the same flips: a batch drawn twice under the loop's reseed is identical
    run = T.setup(latent_task, _latent_cfg(tmp_path / "latents", tmp_path / "probe"), log=quiet)
    draws = []
    for _ in range(2):
        torch.manual_seed(T.derive_seed(0, 2, 5, 0))
        draws.append(run.data.get_batch(torch.arange(12))[0])
    assert torch.equal(*draws)
    torch.manual_seed(T.derive_seed(0, 2, 6, 0))
    assert not torch.equal(run.data.get_batch(torch.arange(12))[0], draws[0])  # another step, other flips


def test_resume_on_other_data_is_refused_naming_the_difference(tmp_path):
    from PIL import Image

    for folder, n in (("a", 6), ("b", 9)):  # --data_dir may move between resumes; the data may not change
        for i in range(n):
            (tmp_path / folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (10 * i, 50, 90)).save(tmp_path / folder / f"c{i % 2}" / f"{i}.png")
    cfg = tiny_cfg(tmp_path / "run", data="folder", data_dir=str(tmp_path / "a"), iters=1, augment_p=0)
    tasks.train(cfg, log=quiet)
    with pytest.raises(ValueError, match=r"other data \(6 items then, 9 now\).*--out="):
        tasks.train(dataclasses.replace(cfg, iters=2, data_dir=str(tmp_path / "b")), log=quiet)
    (tmp_path / "a" / "c0" / "0.png").rename(tmp_path / "a" / "c0" / "0_moved.png")  # same pixels, same data
    assert tasks.train(dataclasses.replace(cfg, iters=2), log=quiet) == 2
