"""ADM/DiT discrete diffusion against closed forms: posterior, KL, likelihood, respacing, loss, samplers."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from minidiffit.adm import (
    GaussianDiffusion, discretized_gaussian_log_likelihood, linear_betas, normal_kl, space_timesteps,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_linear_betas():
    b = linear_betas()
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    torch.testing.assert_close(b.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    d = GaussianDiffusion()
    torch.testing.assert_close(d.alphas_cumprod, torch.tensor(np.cumprod(1 - b.numpy())))


def test_posterior_against_bayes_rule():
    """q(x_{t-1} | x_t, x_0) from the product of the two Gaussians, computed with numpy."""
    d = GaussianDiffusion()
    b, acp = d.betas.numpy(), d.alphas_cumprod.numpy()
    rng = np.random.default_rng(0)
    x0, xt = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    t = np.array([1, 2, 10, 500, 999])
    acp_prev = acp[t - 1]
    # x_{t-1} | x_0 ~ N(sqrt(acp_prev) x_0, 1 - acp_prev);  x_t | x_{t-1} ~ N(sqrt(1 - b_t) x_{t-1}, b_t)
    precision = 1 / (1 - acp_prev) + (1 - b[t]) / b[t]
    var = 1 / precision
    mean = var[:, None] * (np.sqrt(acp_prev)[:, None] * x0 / (1 - acp_prev)[:, None]
                           + np.sqrt(1 - b[t])[:, None] * xt / b[t][:, None])
    m, v, logv = d.q_posterior(torch.tensor(x0), torch.tensor(xt), torch.tensor(t))
    torch.testing.assert_close(m, torch.tensor(mean))
    torch.testing.assert_close(v[:, 0], torch.tensor(var))
    torch.testing.assert_close(logv[:, 0], torch.tensor(np.log(var)))
    # t = 0: the posterior is a point mass at x_0; its log variance is clipped to the t = 1 value.
    m0, v0, logv0 = d.q_posterior(torch.tensor(x0), torch.tensor(xt), torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(m0, torch.tensor(x0))
    assert (v0 == 0).all() and torch.isfinite(logv0).all()
    torch.testing.assert_close(logv0, logv0.new_full(logv0.shape, math.log(d.posterior_variance[1].item())))


def test_normal_kl():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4, 100, generator=g, dtype=torch.float64)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-12
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)
    # A known value: KL(N(0, 1) || N(1, 4)) = ln 2 + (1 + 1) / 8 - 1/2.
    one = torch.tensor(1.0, dtype=torch.float64)
    assert normal_kl(0 * one, 0 * one, one, math.log(4) * one).item() == pytest.approx(math.log(2) + 0.25 - 0.5)


def test_discretized_gaussian_log_likelihood():
    centers = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 256 pixel values
    mean, log_scale = torch.tensor(0.1, dtype=torch.float64), torch.tensor(math.log(0.3), dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(centers, mean, log_scale)
    # Probabilities of the 256 bins (end bins open) sum to one.
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # Interior bin against scipy.
    x = centers[100].item()
    ref = math.log(norm.cdf((x + 1 / 255 - 0.1) / 0.3) - norm.cdf((x - 1 / 255 - 0.1) / 0.3))
    assert logp[100].item() == pytest.approx(ref, rel=1e-9)
    assert logp[0].item() == pytest.approx(math.log(norm.cdf((-1 + 1 / 255 - 0.1) / 0.3)), rel=1e-9)


def test_q_sample_statistics():
    d = GaussianDiffusion()
    n = 200_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    for step in (0, 300, 999):
        t = torch.full((n,), step)
        xt = d.q_sample(x0, t, torch.randn(n, 1, generator=torch.Generator().manual_seed(step), dtype=torch.float64))
        a = d.alphas_cumprod[step].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=4 * math.sqrt((1 - a) / n) + 1e-12)
        assert xt.var().item() == pytest.approx(1 - a, rel=0.02, abs=1e-8)


def adm_space_timesteps(num_timesteps, section_counts):
    """ADM's respace.py `space_timesteps` for comma-separated counts, in its literal form: the fractional stride
    is added up in `cur_idx`, not multiplied."""
    section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if section_count <= 1:
            frac_stride = 1
        else:
            frac_stride = (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return sorted(set(all_steps))


def test_space_timesteps():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert kept == adm_space_timesteps(1000, "250")
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    sections = space_timesteps(30, "2,3,10")
    assert sections == [0, 9, 10, 14, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]
    assert space_timesteps(1000, "1000") == list(range(1000))
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(10, "11")


def test_space_timesteps_match_adm():
    for k in range(1, 1001):
        assert space_timesteps(1000, str(k)) == adm_space_timesteps(1000, str(k)), k
    # Sections of unequal size (1000 = 334 + 333 + 333, 31 = 16 + 15) and a section count that is not T's divisor.
    for T, spec in [(1000, "10,15,20"), (1000, "2,3"), (31, "2,3"), (1000, "7,1,333")]:
        assert space_timesteps(T, spec) == adm_space_timesteps(T, spec), spec


def test_space_timesteps_accumulate_the_stride():
    """The counts where ADM's running sum and round(i * stride) part: we used to keep the latter."""
    for k, moved in [(21, {500: 499}), (43, {500: 499, 832: 833})]:
        multiplied = [round(i * 999 / (k - 1)) for i in range(k)]
        ours = space_timesteps(1000, str(k))
        assert ours == adm_space_timesteps(1000, str(k))
        assert ours != multiplied
        assert ours == sorted(moved.get(s, s) for s in multiplied)


def test_space_timesteps_ddim():
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))  # 25 divides 1000
    kept = space_timesteps(1000, "ddim30")  # it does not: ADM's search finds stride 34 (ceil(1000 / 34) = 30)
    assert kept == list(range(0, 1000, 34)) and len(kept) == 30
    with pytest.raises(ValueError, match="no integer stride"):
        space_timesteps(1000, "ddim999")  # stride 1 gives 1000 steps, stride 2 gives 500


def test_coefficients_rounded_once_from_float64():
    """At t = 0, 1 - alpha-bar = 1e-4: float32 arithmetic on a float32 alpha-bar there is off by 8e-5 (relative);
    ADM's float64 tables rounded once to float32 are off by float32's rounding only."""
    acp0 = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[0]
    d = GaussianDiffusion()
    t = torch.zeros(1, dtype=torch.long)
    zero, one = torch.zeros(1, 1), torch.ones(1, 1)
    assert d.q_sample(zero, t, noise=one).dtype == torch.float32
    assert d.q_sample(zero, t, noise=one).item() == pytest.approx(math.sqrt(1 - acp0), rel=1e-6)  # sqrt(1 - a) eps
    assert d.q_sample(one, t, noise=zero).item() == pytest.approx(math.sqrt(acp0), rel=1e-6)  # sqrt(a) x_0
    x0_hat = d.p_mean_variance(one, zero, t)["pred_xstart"]  # eps-only model output 1 at x_t = 0
    assert x0_hat.item() == pytest.approx(-math.sqrt(1 / acp0 - 1), rel=1e-6)


def test_steps_stay_on_their_device():
    """The steps t index tables already on x's device: never a copy to the CPU and back (a sync per step on a
    GPU). Meta tensors have no data to copy, so any such round trip raises here."""
    d = GaussianDiffusion.respaced("5")
    seen = []

    def model(x, t):
        seen.append(t.device)
        return torch.zeros_like(x).repeat(1, 2, 1, 1)

    x = torch.empty(2, 3, 4, 4, device="meta")
    t = torch.zeros(2, dtype=torch.long, device="meta")
    assert d.q_sample(x, t, x).is_meta and d.training_losses(model, x, t)["loss"].is_meta
    assert d.p_sample_loop(model, x).is_meta and d.ddim_sample_loop(model, x, eta=1.0).is_meta
    assert set(seen) == {torch.device("meta")}


@pytest.mark.parametrize("spec", ["250", "ddim25", "ddim30", "10,20,30"])
def test_respacing_keeps_alphas_cumprod(spec):
    base = GaussianDiffusion()
    d = GaussianDiffusion.respaced(spec)
    kept = space_timesteps(1000, spec)
    assert d.num_timesteps == len(kept) and d.timestep_map.tolist() == kept
    torch.testing.assert_close(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)


class StubModel(torch.nn.Module):
    """eps and v are parameters (one value per channel), so gradients show which loss term trains what."""

    def __init__(self):
        super().__init__()
        self.eps = torch.nn.Parameter(torch.tensor([0.3, -0.2]))
        self.v = torch.nn.Parameter(torch.tensor([0.5, -0.5]))
        self.seen_t = []

    def forward(self, x, t):
        self.seen_t.append(t.clone())
        B, C, H, W = x.shape
        return torch.cat([self.eps.view(1, C, 1, 1).expand(B, C, H, W), self.v.view(1, C, 1, 1).expand(B, C, H, W)], 1)


def test_hybrid_loss_on_a_stub_model():
    d = GaussianDiffusion()
    model = StubModel()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 10, 700])
    out = d.training_losses(model, x0, t, noise=noise)
    assert torch.equal(model.seen_t[0], t)
    eps = model.eps.detach().view(1, 2, 1, 1)
    torch.testing.assert_close(out["mse"], ((noise - eps) ** 2).mean(dim=(1, 2, 3)))
    # The t > 0 terms by hand: KL between the true posterior and N(mean from eps, learned-range variance).
    xt = d.q_sample(x0, t, noise)
    a, b = d.alphas_cumprod[t].float().view(-1, 1, 1, 1), d.betas[t].float().view(-1, 1, 1, 1)
    x0_hat = (xt - (1 - a).sqrt() * eps) / a.sqrt()
    true_mean, _, true_logv = d.q_posterior(x0, xt, t)
    model_mean, _, _ = d.q_posterior(x0_hat, xt, t)
    frac = (model.v.detach().view(1, 2, 1, 1) + 1) / 2
    model_logv = frac * b.log() + (1 - frac) * true_logv  # the true posterior's clipped log variance is the min
    kl = 0.5 * (model_logv - true_logv + (true_logv - model_logv).exp()
                + (true_mean - model_mean) ** 2 / model_logv.exp() - 1)
    torch.testing.assert_close(out["vb"][1:], kl.mean(dim=(1, 2, 3))[1:] / math.log(2), rtol=1e-4, atol=1e-6)
    nll = -discretized_gaussian_log_likelihood(x0[:1], model_mean[:1], 0.5 * model_logv[:1]).mean() / math.log(2)
    torch.testing.assert_close(out["vb"][0], nll, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])
    # Stop-gradient: the bound trains only v; the MSE trains only eps.
    out["vb"].sum().backward()
    assert model.eps.grad is None or (model.eps.grad == 0).all()
    assert (model.v.grad != 0).all()
    model.zero_grad()
    out = d.training_losses(model, x0, t, noise=noise)
    out["mse"].sum().backward()
    assert (model.eps.grad != 0).all() and (model.v.grad is None or (model.v.grad == 0).all())


def test_respaced_model_sees_original_steps():
    d = GaussianDiffusion.respaced("10")
    model = StubModel()
    d.p_sample_loop(model, torch.randn(2, 2, 2, 2, generator=torch.Generator().manual_seed(0)))
    assert [s[0].item() for s in model.seen_t] == list(reversed(space_timesteps(1000, "10")))


# A Gaussian data set x_0 ~ N(mu, S) has an exact eps predictor:
#   E[eps | x_t] = sqrt(1 - a) (a S + (1 - a) I)^-1 (x_t - sqrt(a) mu),  a = alpha-bar_t.
MU = torch.tensor([0.5, -0.3], dtype=torch.float64)
COV = torch.tensor([[0.30, 0.10], [0.10, 0.20]], dtype=torch.float64)


def exact_eps_model(learned_v=None):
    acp = GaussianDiffusion().alphas_cumprod
    lam, Q = torch.linalg.eigh(COV)  # (a S + (1 - a) I)^-1 = Q diag(1 / (a lam + 1 - a)) Q^T

    def model(x, t):  # x: (B, 2), t: (B,) original steps
        a = acp[t].view(-1, 1)
        r = (x - a.sqrt() * MU) @ Q
        eps = (1 - a).sqrt() * (r / (a * lam + 1 - a)) @ Q.T
        return eps if learned_v is None else torch.cat([eps, torch.full_like(eps, learned_v)], dim=1)

    return model


@pytest.mark.parametrize("sampler", ["ancestral-small", "ancestral-large", "ancestral-fixed", "ddim", "ddim-eta1",
                                     "dpm++2m"])
def test_samplers_recover_a_gaussian(sampler):
    d = GaussianDiffusion.respaced("250")
    g = torch.Generator().manual_seed(0)
    # 16k samples: the mean's standard error is ~0.004, well inside the tolerance.
    noise = torch.randn(16_000, 2, generator=g, dtype=torch.float64)
    if sampler.startswith("ancestral"):
        v = {"ancestral-small": -1.0, "ancestral-large": 1.0, "ancestral-fixed": None}[sampler]
        x = d.p_sample_loop(exact_eps_model(v), noise, generator=g)
    elif sampler == "dpm++2m":
        x = d.dpm_solver_sample_loop(exact_eps_model(-1.0), noise)  # the variance channel is ignored
    else:
        x = d.ddim_sample_loop(exact_eps_model(), noise, eta=1.0 if sampler == "ddim-eta1" else 0.0, generator=g)
    torch.testing.assert_close(x.mean(0), MU, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), COV, atol=0.02, rtol=0)


def test_per_image_generators_make_samples_batch_independent():
    d = GaussianDiffusion.respaced("20")
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    batch = d.p_sample_loop(exact_eps_model(-1.0), noise, generator=gens)
    alone = d.p_sample_loop(exact_eps_model(-1.0), noise[1:2], generator=[torch.Generator().manual_seed(11)])
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=0)
    batch = d.ddim_sample_loop(exact_eps_model(), noise, eta=1.0,
                               generator=[torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    alone = d.ddim_sample_loop(exact_eps_model(), noise[1:2], eta=1.0, generator=[torch.Generator().manual_seed(11)])
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["1", "2", "10", "25"])
def test_dpm_solver_matches_diffusers_with_guidance(spec):
    # The reference: diffusers' DPMSolverMultistepScheduler (dpmsolver++, 2nd order, midpoint, final sigma 0) at the
    # same time steps, driven by the same guided model function (the release's forward_with_cfg, eps channels).
    diffusers = pytest.importorskip("diffusers")
    from minidiffit.latent import LATENT_PRESETS, LatentDiffiT

    torch.manual_seed(0)
    net = LatentDiffiT(LATENT_PRESETS["tiny"]).eval()
    for p in net.parameters():  # random weights everywhere (the final layer is zero-initialised)
        torch.nn.init.normal_(p, std=0.05)
    y = torch.tensor([0, 3, 7])
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def guided(x, t):
        return net.forward_with_cfg(x, t, y, scale=3.0)

    d = GaussianDiffusion.respaced(spec)
    ours = d.dpm_solver_sample_loop(lambda x, t, y=None: guided(x, t), noise)

    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                                  beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2)
    sched.set_timesteps(timesteps=d.timestep_map.flip(0).tolist())
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps = guided(x, t.expand(3))[:, :4]
            x = sched.step(eps, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
    assert (ours - noise).abs().max() > 1e-3  # it did move


def test_dpm_solver_one_evaluation_per_step():
    calls = []
    model = exact_eps_model()

    def counting(x, t):
        calls.append(int(t[0]))
        return model(x, t)

    GaussianDiffusion.respaced("10").dpm_solver_sample_loop(counting, torch.randn(5, 2, dtype=torch.float64))
    assert calls == space_timesteps(1000, "10")[::-1]  # original steps, from 999 down to 0
