"""The fast path on the CPU: bf16 autocast and torch.compile, switched on with --bf16=true / --compile=true
(their default, None, means CUDA only), train a tiny run and sample it in agreement with float32 eager.

Tolerances, stated: compiled float32 equals eager to round-off (the compiler reorders and fuses float32
arithmetic): losses within 1e-4 relative, samples within 1e-3. bf16 autocast keeps 8 bits of mantissa in the
network's matmuls (EDMPrecond's skip path and the loss stay float32): losses within 3% and samples within 0.1
(images span [-1, 1]) after three steps. CUDA-only parts (fused Adam, TF32) stay off on the CPU.
"""

import pytest
import torch

from minidiffit.tools import edm_task
from minidiffit.train import DataOrder, fast_path, setup, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(tmp_path, name, steps=3, **kw):
    """(losses, samples) of a tiny EDM run trained `steps` steps and sampled with 4 Heun steps from its raw weights."""
    cfg = edm_task.Config(preset="tiny", data="synthetic", num_data=32, out=str(tmp_path / name), batch=8, iters=steps,
                          warmup_kimg=0, grid=0, **kw)
    run = setup(edm_task, cfg, log=lambda *a: None)
    order = DataOrder(len(run.data), cfg.seed)
    losses = torch.tensor([train_step(run, order) for _ in range(steps)], dtype=torch.float64)
    # the raw weights, not the EMA: three steps of EMA would hide most of what training changed
    samples = edm_task.generate(run.model.eval(), torch.arange(4), cfg, num_steps=4)
    return run, losses, samples


def test_defaults_leave_the_cpu_eager_float32():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not fast_path(None, cpu) and fast_path(None, cuda)
    assert fast_path(True, cpu) and not fast_path(False, cuda)


def test_compile_and_bf16_agree_with_eager_float32(tmp_path):
    torch._dynamo.reset()
    eager_run, eager_loss, eager_x = trained(tmp_path, "eager")
    assert eager_run.train_model is eager_run.model  # nothing wrapped on the CPU by default

    compiled_run, compiled_loss, compiled_x = trained(tmp_path, "compiled", compile=True)
    assert compiled_run.train_model is not compiled_run.model  # the loop trained through torch.compile
    assert all(not p.is_cuda for p in compiled_run.model.parameters())
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(compiled_x, eager_x, rtol=0, atol=1e-3)

    _, bf16_loss, bf16_x = trained(tmp_path, "bf16", bf16=True)
    assert not torch.equal(bf16_loss, eager_loss)  # autocast did run in bf16 ...
    torch.testing.assert_close(bf16_loss, eager_loss, rtol=3e-2, atol=0)  # ... and stays close
    torch.testing.assert_close(bf16_x, eager_x, rtol=0, atol=0.1)
    # the samples moved away from the untrained model's: the comparison is not between two copies of the noise
    untrained = edm_task.generate(edm_task.build_model(eager_run.cfg).eval(), torch.arange(4), eager_run.cfg, num_steps=4)
    assert (eager_x - untrained).abs().max() > 1e-2
