"""EDM: preconditioning, loss, time steps, samplers against the exact denoiser of a Gaussian, augmentation."""

import math

import pytest
import torch

from minidiffit.diffusion import (AUGMENT_DIM, EDMPrecond, augment, dpm_solver_2m, dpm_solver_sample, edm_loss,
                                  euler_sample, heun_sample, sigma_steps, stochastic_sample)

# ----------------------------------------------------------------------------
# A Gaussian data set N(mu, Sigma) has an exact denoiser: E[y | y + n] = mu + Sigma (Sigma + s^2 I)^-1 (x - mu).

MU = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
_A = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.5, 0.0], [-0.3, 0.4, 0.3]], dtype=torch.float64)
SIGMA = _A @ _A.T  # non-diagonal covariance, eigenvalues between ~0.04 and ~1.6


def gaussian_denoiser(x, sigma, augment_labels=None):
    """Exact D(x; sigma) for N(MU, SIGMA); x (B, 3), sigma (B,) or scalar.

    With SIGMA = U diag(l) U^T, SIGMA (SIGMA + s^2 I)^-1 = U diag(l / (l + s^2)) U^T.
    """
    x = x.to(torch.float64)
    lam, U = torch.linalg.eigh(SIGMA)
    s2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2  # (B or 1, 1)
    return MU + (((x - MU) @ U) * (lam / (lam + s2))) @ U.T


def check_moments(samples, atol_mean=0.03, atol_cov=0.05):
    torch.testing.assert_close(samples.mean(0), MU, atol=atol_mean, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), SIGMA, atol=atol_cov, rtol=0)


def test_gaussian_denoiser_is_a_reference():
    # At sigma -> 0 the exact denoiser is the identity; at huge sigma it returns the mean.
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(gaussian_denoiser(x, 1e-6), x)
    torch.testing.assert_close(gaussian_denoiser(x, 1e6), MU.expand(5, 3))


def test_heun_recovers_gaussian_moments():
    # 40 steps: the discretization error is then ~1% of the variance, below the sampling tolerance (with the
    # default 18 steps the largest variance comes out ~9% high on this data: see notebooks/03_diffusion).
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    check_moments(heun_sample(gaussian_denoiser, noise, num_steps=40))


def test_stochastic_recovers_gaussian_moments():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    x = stochastic_sample(gaussian_denoiser, noise, num_steps=100, S_churn=10, S_min=0.01, S_max=50,
                          S_noise=1.0, generator=g)
    check_moments(x)


def test_stochastic_with_zero_churn_is_heun():
    noise = torch.randn(64, 3, dtype=torch.float64)
    torch.testing.assert_close(stochastic_sample(gaussian_denoiser, noise, num_steps=6),
                               heun_sample(gaussian_denoiser, noise, num_steps=6))


def test_stochastic_per_image_generators_make_images_batch_independent():
    # EDM samples every image from its own seed: with one generator per image, image 2 of a batch of 4 is
    # image 2 sampled alone. S_churn > 0 over the whole schedule, so every step draws noise.
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    kw = dict(num_steps=8, S_churn=4, S_min=0, S_max=float("inf"))
    batch = stochastic_sample(gaussian_denoiser, noise, generator=[torch.Generator().manual_seed(i) for i in range(4)],
                              **kw)
    alone = stochastic_sample(gaussian_denoiser, noise[2:3], generator=[torch.Generator().manual_seed(2)], **kw)
    torch.testing.assert_close(batch[2:3], alone)
    # One generator shared by the batch (the only option before): image 2's noise depends on its batch-mates.
    shared = stochastic_sample(gaussian_denoiser, noise, generator=torch.Generator().manual_seed(2), **kw)
    assert (shared[2] - alone[0]).abs().max() > 1e-2
    # A single generator and no generator still work, and the list must have one generator per image.
    assert torch.equal(shared, stochastic_sample(gaussian_denoiser, noise, generator=torch.Generator().manual_seed(2),
                                                 **kw))
    assert stochastic_sample(gaussian_denoiser, noise, **kw).shape == (4, 3)
    with pytest.raises(ValueError, match="one per image"):
        stochastic_sample(gaussian_denoiser, noise, generator=[torch.Generator()] * 3, **kw)


def test_dpm_solver_recovers_gaussian_moments():
    noise = torch.randn(20000, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    check_moments(dpm_solver_sample(gaussian_denoiser, noise, num_steps=40))


def exact_ode_solution(noise, sigma_max=80.0):
    """x(0) of the probability-flow ODE from x(sigma_max) = sigma_max * noise, for N(MU, SIGMA) data: along each
    eigenvector (variance l) x - MU scales by sqrt(l + s^2), so x(0) = MU + U diag(sqrt(l / (l + s_max^2))) U^T (x - MU)."""
    lam, U = torch.linalg.eigh(SIGMA)
    return MU + (((noise * sigma_max - MU) @ U) * (lam / (lam + sigma_max**2)).sqrt()) @ U.T


def test_dpm_solver_is_second_order():
    # Against the exact ODE solution: doubling the steps cuts DPM-Solver++(2M)'s error ~4x (2nd order); the same
    # steps taken first order (D = this step's denoised: DDIM) only ~2x. sigma_min 1e-4 keeps the final jump small.
    noise = torch.randn(256, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = exact_ode_solution(noise)

    def error(n, first_order=False):
        t = sigma_steps(n, sigma_min=1e-4)
        if first_order:
            x = noise * t[0]
            for i in range(n):
                d = gaussian_denoiser(x, t[i])
                x = d if t[i + 1] == 0 else (t[i + 1] / t[i]) * x + (1 - t[i + 1] / t[i]) * d
        else:
            x = dpm_solver_2m(lambda x, i: gaussian_denoiser(x, t[i]), noise * t[0], t)
        return (x - exact).abs().max().item()

    assert error(40) / error(80) > 3.2
    assert error(40, True) / error(80, True) < 2.5
    assert error(20) < error(20, True) / 2  # and at a few steps it is already closer than first order


def test_two_steps_of_euler_are_far_from_the_data():
    # The moment check above can fail: a crude sampler misses the covariance.
    noise = torch.randn(20000, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = euler_sample(gaussian_denoiser, noise, num_steps=2)
    assert (torch.cov(x.T) - SIGMA).abs().max() > 0.05


class CountingDenoiser:
    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, augment_labels=None):
        self.calls += 1
        return gaussian_denoiser(x, sigma)


@pytest.mark.parametrize("steps", [1, 2, 18])
def test_function_evaluations(steps):
    noise = torch.randn(4, 3)
    for sampler, nfe in [(heun_sample, 2 * steps - 1), (stochastic_sample, 2 * steps - 1), (euler_sample, steps),
                         (dpm_solver_sample, steps)]:
        d = CountingDenoiser()
        sampler(d, noise, num_steps=steps)
        assert d.calls == nfe, sampler.__name__


# ----------------------------------------------------------------------------
# Time steps


def test_sigma_steps():
    t = sigma_steps(18, sigma_min=0.002, sigma_max=80, rho=7)
    assert t.dtype == torch.float64 and t.shape == (19,)
    assert t[0].item() == pytest.approx(80) and t[17].item() == pytest.approx(0.002) and t[18].item() == 0
    assert (t[1:] < t[:-1]).all()
    # rho-spacing: t^(1/rho) is evenly spaced between the endpoints
    r = t[:-1] ** (1 / 7)
    torch.testing.assert_close(r[1:] - r[:-1], torch.full((17,), (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 17,
                                                          dtype=torch.float64))


# ----------------------------------------------------------------------------
# Preconditioning


class StubNet(torch.nn.Module):
    """F(z; c_noise) = 2 z + c_noise, recording what it was given."""

    def forward(self, z, c_noise, augment_labels=None):
        self.z, self.c_noise, self.labels = z, c_noise, augment_labels
        return 2 * z + c_noise.reshape(-1, *[1] * (z.ndim - 1))


def test_preconditioning_formulas():
    sd = 0.5
    net = StubNet()
    D = EDMPrecond(net, sigma_data=sd)
    x = torch.randn(4, 3, 2, 2)
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0])
    out = D(x, sigma, augment_labels=torch.ones(4, 9))
    for b, s in enumerate(sigma.tolist()):
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / math.sqrt(s**2 + sd**2)
        c_in = 1 / math.sqrt(s**2 + sd**2)
        c_noise = math.log(s) / 4
        torch.testing.assert_close(net.z[b], c_in * x[b])
        assert net.c_noise[b].item() == pytest.approx(c_noise, rel=1e-6)
        torch.testing.assert_close(out[b], c_skip * x[b] + c_out * (2 * c_in * x[b] + c_noise))
    assert net.c_noise.shape == (4,) and torch.equal(net.labels, torch.ones(4, 9))


def test_preconditioning_scalar_sigma_equals_batch_sigma():
    D = EDMPrecond(StubNet())
    x = torch.randn(3, 5)
    torch.testing.assert_close(D(x, 1.7), D(x, torch.full((3,), 1.7)))
    assert D(x.double(), 1.7).dtype == torch.float32  # the net runs in float32


def test_preconditioning_makes_unit_variance_targets():
    # With y ~ N(0, sd^2) and n ~ N(0, s^2), both the net's input c_in (y + n) and its effective target
    # (y - c_skip (y + n)) / c_out have unit variance at every sigma (EDM Sec. 5).
    g = torch.Generator().manual_seed(0)
    D = EDMPrecond(StubNet(), sigma_data=0.5)
    for s in [0.01, 0.5, 20.0]:
        c_skip, c_out, c_in, _ = D.coefficients(torch.tensor(s))
        y = 0.5 * torch.randn(200000, generator=g)
        x = y + s * torch.randn(200000, generator=g)
        assert (c_in * x).var().item() == pytest.approx(1, abs=0.02)
        assert ((y - c_skip * x) / c_out).var().item() == pytest.approx(1, abs=0.02)


# ----------------------------------------------------------------------------
# Loss


class OffsetDenoiser:
    """D(x; sigma) = y + 0.3 everywhere (knows the clean images), recording its inputs."""

    def __init__(self, images):
        self.images = images

    def __call__(self, x, sigma, augment_labels=None):
        self.x, self.sigma, self.labels = x, sigma, augment_labels
        return self.images + 0.3


def test_loss_weighting():
    images = torch.rand(4000, 1, 2, 2) * 2 - 1
    d = OffsetDenoiser(images)
    loss = edm_loss(d, images, augment_labels=torch.zeros(4000, 9), generator=torch.Generator().manual_seed(0))
    s, sd = d.sigma, 0.5
    assert loss.shape == (4000,)
    # summed over the C * H * W = 4 pixels, each off by 0.3
    torch.testing.assert_close(loss, (s**2 + sd**2) / (s * sd) ** 2 * 0.3**2 * 4)
    # ln sigma ~ N(-1.2, 1.2^2); the input is images + sigma * N(0, I)
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.06)
    assert s.log().std().item() == pytest.approx(1.2, abs=0.06)
    z = (d.x - images) / s.reshape(-1, 1, 1, 1)
    assert z.mean().item() == pytest.approx(0, abs=0.02) and z.std().item() == pytest.approx(1, abs=0.02)
    assert d.labels is not None


def test_loss_generator_is_deterministic():
    images = torch.rand(8, 3, 4, 4)
    a = edm_loss(OffsetDenoiser(images), images, generator=torch.Generator().manual_seed(3))
    b = edm_loss(OffsetDenoiser(images), images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


SD = 0.5


class NearOptimalNet(torch.nn.Module):
    """For all-zero images the exact denoiser is D = 0, i.e. F(z; c_noise) = -(sd / sigma) z with
    sigma = exp(4 c_noise); a 1x1 conv of tiny weights adds a small error, as near the end of training."""

    def __init__(self, err):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1, bias=False)
        torch.nn.init.normal_(self.conv.weight, std=err)

    def forward(self, z, c_noise, augment_labels=None):
        sigma = (4 * c_noise).exp().reshape(-1, 1, 1, 1)
        return -(SD / sigma) * z + self.conv(z)


def adam_step(objective, seed=0):
    """One Adam step (EDM's settings) of objective(denoiser, images, generator) on 4 zero CIFAR-size images:
    (the gradient, the change in the weights)."""
    torch.manual_seed(0)
    D = EDMPrecond(NearOptimalNet(err=1e-7), sigma_data=SD)
    w0 = D.net.conv.weight.detach().clone()
    opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    objective(D, torch.zeros(4, 3, 32, 32), torch.Generator().manual_seed(seed)).backward()
    grad = D.net.conv.weight.grad.clone()
    opt.step()
    return grad, D.net.conv.weight.detach() - w0


def edm_reference_objective(D, y, generator):
    # EDM written out: training/loss.py EDMLoss draws ln sigma ~ N(-1.2, 1.2^2), then n ~ N(0, sigma^2 I),
    # and returns weight * (D(y + n) - y)^2 per pixel; training_loop.py sums it and divides by the batch.
    B = y.shape[0]
    sigma = (torch.randn(B, generator=generator) * 1.2 - 1.2).exp()
    n = torch.randn(y.shape, generator=generator) * sigma.reshape(B, 1, 1, 1)
    weight = ((sigma**2 + SD**2) / (sigma * SD) ** 2).reshape(B, 1, 1, 1)
    return (weight * (D(y + n, sigma) - y) ** 2).sum() / B


def test_loss_scale_gives_edm_adam_step():
    # train.py's objective: the (B,) losses summed over the batch, divided by B.
    grad, step = adam_step(lambda D, y, g: edm_loss(D, y, sigma_data=SD, generator=g).sum() / y.shape[0])
    ref_grad, ref_step = adam_step(edm_reference_objective)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=0)
    torch.testing.assert_close(step, ref_step, rtol=1e-5, atol=0)
    # A pixel mean (the old scale) shrinks these small gradients 3072x, to the order of Adam's eps = 1e-8,
    # and the first step lr * g / (|g| + eps) shrinks with them; at EDM's scale it is ~lr * sign(g).
    _, mean_step = adam_step(lambda D, y, g: edm_loss(D, y, sigma_data=SD, generator=g).sum() / y.numel())
    assert ((mean_step - step).abs().max() / step.abs().max()).item() > 0.1


# ----------------------------------------------------------------------------
# Augmentation

OFF = dict(xflip=0, yflip=0, scale=0, rotate=0, aniso=0, translate=0)


def test_augment_identity_at_p0():
    x = torch.rand(16, 3, 8, 8) * 2 - 1
    y, labels = augment(x, p=0)
    assert torch.equal(y, x) and labels.shape == (16, AUGMENT_DIM) and not labels.any()


@pytest.mark.parametrize("which,dim,col", [("xflip", 3, 0), ("yflip", 2, 1)])
def test_augment_flips_are_recorded(which, dim, col):
    x = torch.rand(64, 3, 8, 8)
    y, labels = augment(x, p=1, generator=torch.Generator().manual_seed(0), **{**OFF, which: 1})
    flipped = labels[:, col] == 1
    assert 0 < flipped.sum() < 64  # a coin flip per image
    assert torch.equal(y[flipped], torch.flip(x[flipped], dims=[dim]))
    assert torch.equal(y[~flipped], x[~flipped])
    assert not labels[:, [c for c in range(9) if c != col]].any()


def ramp(B, H=16, W=16):
    """(B, 2, H, W): channel 0 = centred x pixel coordinate, channel 1 = centred y (bilinear resampling of
    a linear function is exact, so warps can be checked against the formula away from the borders)."""
    ys, xs = torch.meshgrid(torch.arange(H) - (H - 1) / 2, torch.arange(W) - (W - 1) / 2, indexing="ij")
    return torch.stack([xs, ys]).expand(B, 2, H, W).float()


def interior(t):
    return t[..., 6:-6, 6:-6]


def test_augment_translate_label():
    x = ramp(32)
    y, labels = augment(x, p=1, generator=torch.Generator().manual_seed(0), **{**OFF, "translate": 1})
    tx, ty = labels[:, 7] * 16 * 0.125, labels[:, 8] * 16 * 0.125  # pixels
    keep = (tx.abs() < 2.5) & (ty.abs() < 2.5)  # shifts that keep the checked centre away from the border
    assert keep.sum() > 8
    x, y, tx, ty = x[keep], y[keep], tx[keep], ty[keep]
    # content moves by +t: out(p) = in(p - t)
    torch.testing.assert_close(interior(y[:, 0]), interior(x[:, 0] - tx.reshape(-1, 1, 1)), atol=1e-4, rtol=0)
    torch.testing.assert_close(interior(y[:, 1]), interior(x[:, 1] - ty.reshape(-1, 1, 1)), atol=1e-4, rtol=0)
    assert not labels[:, :7].any()


def test_augment_scale_and_rotate_labels():
    x = ramp(32)
    y, labels = augment(x, p=1, generator=torch.Generator().manual_seed(1), **{**OFF, "scale": 1})
    s = (labels[:, 2] * 0.2).exp2().reshape(-1, 1, 1)  # out(p) = in(p / s)
    torch.testing.assert_close(interior(y), interior(x / s[:, None]), atol=1e-4, rtol=0)

    y, labels = augment(x, p=1, generator=torch.Generator().manual_seed(2), **{**OFF, "rotate": 1})
    c, s = (labels[:, 3] + 1).reshape(-1, 1, 1), labels[:, 4].reshape(-1, 1, 1)  # out(p) = in(R(a) p)
    torch.testing.assert_close((c**2 + s**2), torch.ones_like(c))
    exp_x, exp_y = c * x[:, 0] - s * x[:, 1], s * x[:, 0] + c * x[:, 1]
    torch.testing.assert_close(interior(y[:, 0]), interior(exp_x), atol=1e-4, rtol=0)
    torch.testing.assert_close(interior(y[:, 1]), interior(exp_y), atol=1e-4, rtol=0)


def test_augment_probability_and_determinism():
    x = torch.rand(4000, 1, 4, 4)
    _, labels = augment(x, p=0.12, generator=torch.Generator().manual_seed(0))
    assert (labels[:, 2] != 0).float().mean().item() == pytest.approx(0.12, abs=0.02)  # scale fired
    assert (labels[:, 0] != 0).float().mean().item() == pytest.approx(0.5, abs=0.03)  # xflip: EDM's 1e8 x p
    a = augment(x[:8], generator=torch.Generator().manual_seed(5))
    b = augment(x[:8], generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
