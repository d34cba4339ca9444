"""EDM diffusion for the image-space model (Karras et al. 2022, "Elucidating the Design Space..."), as DiffiT
Sec. 4 / App. I.1 uses it: preconditioning (EDM Table 1), the log-normal training loss (EDM Sec. 5), the
deterministic Heun sampler (EDM Algorithm 1), the stochastic sampler (EDM Algorithm 2), DPM-Solver++(2M) for
few steps (Lu et al. 2022), and EDM's non-leaky geometric augmentation with its 9-d label vector (EDM App. F.2).
Imports no model: any `net(x, c_noise, augment_labels)` works. Introduced in notebooks/03_diffusion.ipynb.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base.runtime import rand, randn

AUGMENT_DIM = 9  # xflip, yflip, scale, rotate (cos-1, sin), aniso (2), translate (2)


# ----------------------------------------------------------------------------
# Preconditioning (EDM Sec. 5, Table 1): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)


class EDMPrecond(nn.Module):
    """Wrap a raw network F into EDM's denoiser D(x; sigma) with unit-variance inputs and targets.

    c_skip = sd^2 / (s^2 + sd^2)      c_out = s sd / sqrt(s^2 + sd^2)
    c_in   = 1 / sqrt(s^2 + sd^2)     c_noise = ln(s) / 4
    At small sigma D ~ x (the net barely matters); at large sigma D ~ c_out F (the net predicts the image).
    """

    def __init__(self, net, sigma_data=0.5):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) for a tensor of noise levels, same shape as `sigma`."""
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x, sigma, augment_labels=None):  # x: (B, ...), sigma: scalar or (B,)
        # The skip path and the coefficients stay in float32 even when the net runs under bf16 autocast:
        # at small sigma D is almost exactly x, and bf16 would round that away.
        x = x.to(torch.float32)
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(B)  # (B,)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma.reshape(B, *[1] * (x.ndim - 1)))
        F_x = self.net(c_in * x, c_noise.reshape(B), augment_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)


# ----------------------------------------------------------------------------
# Training loss (EDM Sec. 5, Eq. 8): ln sigma ~ N(P_mean, P_std^2), weight lambda = 1 / c_out^2


def edm_loss(denoiser, images, augment_labels=None, P_mean=-1.2, P_std=1.2, sigma_data=0.5, generator=None):
    """(B,) per-sample loss lambda(sigma) * ||D(y + n; sigma) - y||^2, summed over C, H, W; n ~ N(0, sigma^2 I).

    lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 makes the effective target of F unit-variance at
    every sigma. `images` are the (possibly augmented) training images in [-1, 1]. Average the result
    over the batch (sum / B) to get EDM's training objective. `generator`: None, one torch.Generator, or a list of one per image (base.runtime.draw).
    """
    # The scale is EDM's: training/loss.py (EDMLoss) returns the per-pixel weighted error, and
    # training_loop.py calls loss.sum().mul(loss_scaling / batch_gpu_total).backward(), a sum over pixels and
    # a mean over the batch. A pixel mean would shrink the gradients C*H*W times (3072 at CIFAR-10), and
    # Adam's eps (1e-8) would weigh that much more against them: the optimizer step would not be EDM's.
    # So the loss reads ~C*H*W per image, not O(1).
    B = images.shape[0]
    sigma = (randn((B,), generator, images.device) * P_std + P_mean).exp()  # (B,) log-normal noise levels
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # (B,)
    noise = randn(images.shape, generator, images.device) * sigma.reshape(B, *[1] * (images.ndim - 1))
    denoised = denoiser(images + noise, sigma, augment_labels)
    return weight * (denoised - images).square().flatten(1).sum(dim=1)  # (B,)


# ----------------------------------------------------------------------------
# Samplers (EDM Sec. 3). Time steps: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho


def sigma_steps(num_steps=18, sigma_min=0.002, sigma_max=80, rho=7):
    """(num_steps + 1,) float64 noise levels from sigma_max down to sigma_min, then a final 0 (EDM Eq. 5).

    rho = 7 spends most steps at low noise, where the images' fine detail is decided.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: need at least 1 step")
    i = torch.arange(num_steps, dtype=torch.float64)
    frac = i / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def _denoise(denoiser, x, sigma):
    """D(x; sigma) in float64 for the sampler's bookkeeping; sigma as a (B,) tensor, as the net expects."""
    return denoiser(x, torch.full((x.shape[0],), float(sigma), dtype=torch.float64, device=x.device)).to(torch.float64)


@torch.no_grad()
def heun_sample(denoiser, noise, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7):
    """EDM Algorithm 1: deterministic 2nd-order Heun steps on the probability-flow ODE; 2N - 1 evaluations.

    `noise` is N(0, I) (B, ...); the state is kept in float64, as EDM does, and returned in noise's dtype.
    """
    t = sigma_steps(num_steps, sigma_min, sigma_max, rho)
    x_next = noise.to(torch.float64) * t[0]  # line 2: x_0 ~ N(0, t_0^2 I)
    for i in range(num_steps):  # line 3
        x_cur, t_cur, t_next = x_next, t[i], t[i + 1]
        d_cur = (x_cur - _denoise(denoiser, x_cur, t_cur)) / t_cur  # line 4: d_i = dx/dt at t_i
        x_next = x_cur + (t_next - t_cur) * d_cur  # line 5: Euler step
        if t_next != 0:  # line 6: 2nd-order correction, except on the last step to sigma = 0
            d_prime = (x_next - _denoise(denoiser, x_next, t_next)) / t_next  # line 7
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)  # line 8: trapezoidal rule
    return x_next.to(noise.dtype)  # line 9


@torch.no_grad()
def euler_sample(denoiser, noise, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7):
    """1st-order Euler on the same ODE and time steps: N evaluations (the baseline Heun beats in notebook 03)."""
    t = sigma_steps(num_steps, sigma_min, sigma_max, rho)
    x = noise.to(torch.float64) * t[0]
    for i in range(num_steps):
        x = x + (t[i + 1] - t[i]) * (x - _denoise(denoiser, x, t[i])) / t[i]
    return x.to(noise.dtype)


def dpm_solver_2m(denoise, x, sigmas):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): one denoiser evaluation per step.

    In EDM's variables (x = y + sigma n) the probability-flow ODE solved exactly in lambda = -ln sigma gives
        x_next = (s_next / s) x - expm1(-h) D,    h = ln(s / s_next),
    with D the data prediction over the step. First order: D = D(x; s) (this step is DDIM). Second order
    ("multistep"): D extrapolated from this step's denoised and the previous one's, without a new evaluation:
        D = (1 + 1 / (2r)) D_i - D_{i-1} / (2r),    r = h_{i-1} / h_i.
    The first step has no previous D and the step to sigma = 0 returns D itself (both first order, as the
    paper and diffusers' DPMSolverMultistepScheduler do). `denoise(x, i)` -> D(x; sigmas[i]); `sigmas` (N + 1,)
    float64, decreasing, ending in 0; `x` the state at sigmas[0]. Used for both models: adm.py maps the latent
    model's discrete VP diffusion onto these variables.
    """
    d_prev = h_prev = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, i)
        if s_next == 0:  # the last step: x_next = D
            return d
        h = torch.log(s / s_next)
        D = d if d_prev is None else (1 + 1 / (2 * h_prev / h)) * d - d_prev / (2 * h_prev / h)
        x = (s_next / s) * x - torch.expm1(-h) * D
        d_prev, h_prev = d, h
    return x


@torch.no_grad()
def dpm_solver_sample(denoiser, noise, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7):
    """DPM-Solver++(2M) on EDM's time steps: `num_steps` evaluations (Heun needs 2 num_steps - 1)."""
    t = sigma_steps(num_steps, sigma_min, sigma_max, rho)
    x = dpm_solver_2m(lambda x, i: _denoise(denoiser, x, t[i]), noise.to(torch.float64) * t[0], t)
    return x.to(noise.dtype)


@torch.no_grad()
def stochastic_sample(denoiser, noise, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                      S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, generator=None):
    """EDM Algorithm 2: Heun steps with "churn", fresh noise added before each step, then removed.

    S_churn sets the total amount of noise added, spread over the steps with sigma in [S_min, S_max];
    S_noise slightly > 1 offsets the detail the denoiser removes. S_churn=0 is Algorithm 1 exactly.
    `generator`: None, one torch.Generator, or a list of one per image; with a list, image i's churn noise
    comes from generator i only, so it does not depend on its batch-mates (EDM seeds every image).
    """
    t = sigma_steps(num_steps, sigma_min, sigma_max, rho)
    x_next = noise.to(torch.float64) * t[0]  # line 2: x_0 ~ N(0, t_0^2 I)
    for i in range(num_steps):  # line 3
        x_cur, t_cur, t_next = x_next, t[i], t[i + 1]
        # line 4: gamma_i = min(S_churn / N, sqrt(2) - 1) if t_i in [S_min, S_max], else 0
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        eps = randn(x_cur.shape, generator, x_cur.device, torch.float64) * S_noise  # line 5: eps ~ N(0, S_noise^2 I)
        t_hat = t_cur + gamma * t_cur  # line 6: raise the noise level ...
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * eps  # line 7: ... by adding exactly that much noise
        d_cur = (x_hat - _denoise(denoiser, x_hat, t_hat)) / t_hat  # line 8
        x_next = x_hat + (t_next - t_hat) * d_cur  # line 9: Euler step from t_hat to t_{i+1}
        if t_next != 0:  # line 10
            d_prime = (x_next - _denoise(denoiser, x_next, t_next)) / t_next  # line 11
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)  # line 12
    return x_next.to(noise.dtype)  # line 13


# ----------------------------------------------------------------------------
# Non-leaky augmentation (EDM App. F.2; the geometric part of StyleGAN2-ADA's pipeline). Every transform
# is applied to an image with probability p, and what was done is written into a label vector the network
# sees; at sampling time the labels are zero, so the model generates un-augmented images ("non-leaky").


def _matrix(rows):
    """Stack nested lists of (B,) tensors into per-image 3x3 matrices (B, 3, 3)."""
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


def _scale(sx, sy):  # (B,) x (B,) -> (B, 3, 3): x' = sx x, y' = sy y
    z, o = torch.zeros_like(sx), torch.ones_like(sx)
    return _matrix([[sx, z, z], [z, sy, z], [z, z, o]])


def _rotate(a):  # (B,) -> (B, 3, 3): counter-clockwise by angle a
    z, o = torch.zeros_like(a), torch.ones_like(a)
    return _matrix([[a.cos(), -a.sin(), z], [a.sin(), a.cos(), z], [z, z, o]])


def _translate(tx, ty):  # (B,) x (B,) -> (B, 3, 3)
    z, o = torch.zeros_like(tx), torch.ones_like(tx)
    return _matrix([[o, z, tx], [z, o, ty], [z, z, o]])


def augment(images, p=0.12, generator=None, xflip=1e8, yflip=1.0, scale=1.0, rotate=1.0, aniso=1.0,
            translate=1.0, scale_std=0.2, aniso_std=0.2, aniso_rotate_prob=0.5, translate_std=0.125):
    """EDM's CIFAR-10 augmentation: (B, C, H, W) images -> (augmented images, (B, 9) labels).

    Each transform fires for an image with probability p * multiplier (EDM's settings as defaults:
    xflip=1e8, i.e. a coin-flip x-flip on every image whenever p > 0; every other multiplier 1).
    Labels: [xflip, yflip, scale exponent, cos(angle) - 1, sin(angle), aniso w cos r, aniso w sin r,
    translate x, translate y], all zero for an untouched image. p = 0 returns the images unchanged.
    """
    B, C, H, W = images.shape
    dev = images.device

    def fires(multiplier):  # (B,) bool: does this transform act on each image?
        return rand((B,), generator, dev) < multiplier * p

    # Pixel blitting: exact flips.
    w_x = torch.where(fires(xflip), (rand((B,), generator, dev) < 0.5).float(), 0.0)  # (B,) 1 = flipped
    images = torch.where(w_x.reshape(B, 1, 1, 1) == 1, images.flip(3), images)
    w_y = torch.where(fires(yflip), (rand((B,), generator, dev) < 0.5).float(), 0.0)
    images = torch.where(w_y.reshape(B, 1, 1, 1) == 1, images.flip(2), images)

    # Geometric transformations, composed as one inverse matrix G_inv that maps each output pixel (centred
    # pixel coordinates) to where it is read from in the input.
    G_inv = torch.eye(3, device=dev).expand(B, 3, 3)
    w_s = torch.where(fires(scale), randn((B,), generator, dev), 0.0)  # isotropic scale 2^(w * scale_std)
    s = (w_s * scale_std).exp2()
    G_inv = G_inv @ _scale(1 / s, 1 / s)
    w_r = torch.where(fires(rotate), (rand((B,), generator, dev) * 2 - 1) * math.pi, 0.0)  # any angle
    G_inv = G_inv @ _rotate(w_r)  # the inverse of rotating by -w_r
    w_a = torch.where(fires(aniso), randn((B,), generator, dev), 0.0)  # anisotropic: stretch x, squash y ...
    r_a = (rand((B,), generator, dev) * 2 - 1) * math.pi  # ... along a random axis r (half of the time)
    r_a = torch.where(rand((B,), generator, dev) < aniso_rotate_prob, r_a, 0.0)
    s_a = (w_a * aniso_std).exp2()
    G_inv = G_inv @ _rotate(-r_a) @ _scale(1 / s_a, s_a) @ _rotate(r_a)
    on_t = fires(translate)
    t_x = torch.where(on_t, randn((B,), generator, dev), 0.0)  # fractional translation, in units of
    t_y = torch.where(on_t, randn((B,), generator, dev), 0.0)  # translate_std * image size
    G_inv = G_inv @ _translate(-t_x * W * translate_std, -t_y * H * translate_std)

    moved = (w_s != 0) | (w_r != 0) | (w_a != 0) | (t_x != 0) | (t_y != 0)  # (B,) any geometry for this image?
    if moved.any():
        # Pixel coordinates (centred) -> grid_sample's [-1, 1] coordinates (align_corners=False: the image
        # spans [-W/2, W/2] pixels): theta = S G_inv S^-1 with S = diag(2/W, 2/H, 1).
        S = torch.diag(torch.tensor([2 / W, 2 / H, 1.0], device=dev))
        theta = S @ G_inv @ torch.linalg.inv(S)  # (B, 3, 3)
        grid = F.affine_grid(theta[:, :2], (B, C, H, W), align_corners=False)  # (B, H, W, 2)
        # Deviation: EDM pads by reflection, upsamples 2x with a wavelet filter, resamples bilinearly and
        # downsamples again (less aliasing); we resample bilinearly once with reflected borders.
        warped = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="reflection",
                               align_corners=False)
        images = torch.where(moved.reshape(B, 1, 1, 1), warped, images)  # untouched images stay exact

    labels = torch.stack([w_x, w_y, w_s, w_r.cos() - 1, w_r.sin(), w_a * r_a.cos(), w_a * r_a.sin(), t_x, t_y],
                         dim=1)  # (B, 9), EDM's order
    return images, labels.to(torch.float32)
