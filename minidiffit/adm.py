"""Discrete Gaussian diffusion as ADM and DiT use it: the latent DiffiT's training loss and samplers.

DDPM (Ho et al. 2020) with 1000 linear betas, epsilon prediction, the learned-range variance and hybrid
loss of Improved DDPM (Nichol & Dhariwal 2021, Sec. 3.1), timestep respacing for fast sampling (Sec. 4),
the ancestral sampler and DDIM (Song et al. 2021). DiffiT's latent model uses exactly DiT's settings
(DESIGN.md Sec. 4). The image-space model uses EDM instead (`diffusion.py`). No model is imported here:
`model(x, t, **kwargs)` is any callable returning (B, 2C, ...) [eps | v], or (B, C, ...) eps only.
Introduced in notebooks/08_latent_diffit.ipynb.
"""

import math

import torch

# ----------------------------------------------------------------------------
# Schedules


def linear_betas(num_steps=1000, beta_start=1e-4, beta_end=0.02):
    """(T,) float64 betas, linear from 1e-4 to 0.02 for T = 1000 (DDPM; rescaled by 1000/T as ADM does)."""
    scale = 1000 / num_steps
    return torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64)


def space_timesteps(num_steps, spec):
    """The original steps kept by respacing `spec`: "250" -> 250 steps evenly spread over 0..T-1 (ends kept);
    "10,15,20" -> three equal sections of T, with that many steps each; "ddim50" -> 0, T/50, 2T/50, ...

    As ADM's `space_timesteps`: inside a section of size n with k steps, the steps are round(i * (n-1)/(k-1)).
    """
    spec = str(spec)
    if spec.startswith("ddim"):
        k = int(spec[4:])
        if num_steps % k:
            raise ValueError(f"ddim{k}: {num_steps} steps are not divisible by {k}")
        return list(range(0, num_steps, num_steps // k))
    counts = [int(c) for c in spec.split(",")]
    size, extra = divmod(num_steps, len(counts))
    kept, start = [], 0
    for i, k in enumerate(counts):
        n = size + (1 if i < extra else 0)
        if not 1 <= k <= n:
            raise ValueError(f"respacing {spec!r}: cannot take {k} steps from a section of {n}")
        stride = (n - 1) / (k - 1) if k > 1 else 0
        kept += [start + round(i_ * stride) for i_ in range(k)]
        start += n
    return sorted(set(kept))


# ----------------------------------------------------------------------------
# Gaussian helpers (natural log; the loss reports bits per dimension)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) elementwise for data x in [-1, 1] quantised to 256 bins of width 2/255 (DDPM Sec. 3.3).

    The two end bins extend to -inf and +inf. Used for the t = 0 term of the bound, as DiT does for latents.
    # Choice: the exact normal CDF (torch.special.ndtr) where ADM uses a tanh approximation of it.
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def randn_like(x, generator=None):
    """Standard normal noise shaped like x. `generator`: None, one torch.Generator (on x's device), or a list
    of one per image, so that each image's noise is the same whatever the batch it is sampled in."""
    if isinstance(generator, (list, tuple)):
        noise = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generator]
        return torch.stack(noise).to(x.device)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def mean_flat(x):
    """(B, ...) -> (B,): mean over all but the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------
# The diffusion


class GaussianDiffusion:
    """All per-step coefficients of a discrete diffusion with betas (T,), precomputed in float64.

    `timestep_map[i]` is the original step of this (possibly respaced) diffusion's step i: the model is
    always called with original steps, so one network serves every respacing.
    """

    def __init__(self, betas=None, timestep_map=None):
        b = linear_betas() if betas is None else torch.as_tensor(betas, dtype=torch.float64)
        self.num_timesteps = len(b)
        self.timestep_map = torch.arange(len(b)) if timestep_map is None else torch.as_tensor(timestep_map)
        self.betas = b
        self.alphas_cumprod = torch.cumprod(1 - b, 0)  # alpha-bar_t
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        acp, prev = self.alphas_cumprod, self.alphas_cumprod_prev
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance) (DDPM Eq. 6-7).
        self.posterior_variance = b * (1 - prev) / (1 - acp)
        # Zero at t = 0: clip its log to the t = 1 value so it stays finite (as ADM).
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = b * prev.sqrt() / (1 - acp)
        self.posterior_mean_coef2 = (1 - prev) * (1 - b).sqrt() / (1 - acp)

    @classmethod
    def respaced(cls, spec="250", betas=None):
        """A diffusion over the steps kept by `space_timesteps(T, spec)`, with the same alpha-bars there:
        new beta_i = 1 - alpha-bar(kept_i) / alpha-bar(kept_{i-1}) (Improved DDPM Sec. 4)."""
        base = cls(betas)
        kept = space_timesteps(base.num_timesteps, spec)
        acp = base.alphas_cumprod[kept]
        new_betas = 1 - acp / torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        return cls(new_betas, timestep_map=kept)

    @staticmethod
    def _at(arr, t, x):
        """arr[t] broadcast to x's shape, in x's dtype: (B,) steps -> (B, 1, 1, ...).

        Coefficients are kept in float64 and rounded to x's dtype only here, as ADM does (float32 on GPU)."""
        out = arr[t.cpu()].to(device=x.device, dtype=x.dtype)
        return out.view(-1, *([1] * (x.ndim - 1)))

    # --- forward process -------------------------------------------------------

    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps (DDPM Eq. 4)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        acp = self._at(self.alphas_cumprod, t, x_start)
        return acp.sqrt() * x_start + (1 - acp).sqrt() * noise

    def q_posterior(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x_start + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t), self._at(self.posterior_log_variance_clipped, t, x_t)

    # --- reverse process -------------------------------------------------------

    def p_mean_variance(self, model_output, x_t, t, clip_denoised=False):
        """From the network's (B, 2C, ...) output [eps | v] to p(x_{t-1} | x_t) = N(mean, e^log_variance).

        Learned range (Improved DDPM Eq. 15): log sigma^2 = frac * log beta_t + (1 - frac) * log beta-tilde_t,
        frac = (v + 1) / 2, so v in [-1, 1] spans the two natural choices of the DDPM paper.
        An output with C channels (eps only) uses the fixed "large" variance beta_t instead.
        """
        C = x_t.shape[1]
        model_output = model_output.to(x_t.dtype)  # bf16 under autocast: do the diffusion math in x's precision
        if model_output.shape[1] == 2 * C:
            eps, v = model_output.split(C, dim=1)
            min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._at(torch.log(self.betas), t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        elif model_output.shape[1] == C:
            # Choice: eps-only models are accepted too (DiT's learn_sigma=False), with ADM's fixed-large variance.
            # Fixed large: beta_t, with beta_0 replaced by the posterior variance at t=1 (as ADM).
            eps = model_output
            large = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
            log_variance = self._at(torch.log(large), t, x_t).expand_as(x_t)
        else:
            raise ValueError(f"model output has {model_output.shape[1]} channels; "
                             f"expected {C} (eps) or {2 * C} (eps, v)")
        # x_0 from eps (DDPM Eq. 4 solved for x_0), then the posterior mean given that x_0.
        acp = self._at(self.alphas_cumprod, t, x_t)
        pred_xstart = (x_t - (1 - acp).sqrt() * eps) / acp.sqrt()
        if clip_denoised:  # pixels in [-1, 1]; latents are not clipped (DiT samples with clip_denoised=False)
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    def _model(self, model, x, t, model_kwargs):
        """Call the network with the original step of each respaced step."""
        return model(x, self.timestep_map[t.cpu()].to(x.device), **(model_kwargs or {}))

    # --- the loss ----------------------------------------------------------------

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample hybrid loss (Improved DDPM Sec. 3.1): MSE(eps) + L_vlb term at step t, each (B,).

        The bound term sees the mean with a stop-gradient, so it trains only the variance and the MSE alone
        trains eps. Draw t uniformly: `torch.randint(0, diffusion.num_timesteps, (B,))`.
        Returns {"loss", "mse", "vb"} (vb in bits per dimension).
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        out = self._model(model, x_t, t, model_kwargs).to(x_t.dtype)  # float32 loss under bf16 autocast
        C = x_start.shape[1]
        if out.shape[1] != 2 * C:
            raise ValueError(f"the hybrid loss needs a learned variance: model output has {out.shape[1]} channels, "
                             f"expected {2 * C}")
        eps, v = out.split(C, dim=1)
        mse = mean_flat((noise - eps) ** 2)
        vb = self.vb_terms_bpd(torch.cat([eps.detach(), v], dim=1), x_start, x_t, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        """(B,) the bound's term at t in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
        the discretized decoder NLL -log p(x_0|x_1) at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x_start, x_t, t)
        p = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        log_px = discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"])
        nll = -mean_flat(log_px) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)

    # --- samplers ------------------------------------------------------------------

    @torch.no_grad()
    def p_sample_loop(self, model, noise, model_kwargs=None, clip_denoised=False, generator=None):
        """Ancestral sampling (DDPM Algorithm 2) from x_T = `noise` over this diffusion's steps -> x_0.

        x_{t-1} = mean + exp(log_variance / 2) * z, with no noise at the last step. `generator`: see `randn_like`
        (a list of per-image generators makes image i's trajectory independent of its batch).
        """
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            p = self.p_mean_variance(self._model(model, x, t, model_kwargs), x, t, clip_denoised)
            if i > 0:
                x = p["mean"] + torch.exp(0.5 * p["log_variance"]) * randn_like(x, generator)
            else:
                x = p["mean"]
        return x

    @torch.no_grad()
    def ddim_sample_loop(self, model, noise, model_kwargs=None, clip_denoised=False, eta=0.0, generator=None):
        """DDIM (Song et al. 2021, Eq. 12): deterministic at eta = 0, DDPM-like noise at eta = 1.

        x_{t-1} = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z,
        sigma = eta * sqrt((1 - a_prev) / (1 - a)) * sqrt(1 - a / a_prev). The variance output is unused.
        `generator` (eta > 0): see `randn_like`.
        """
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            p = self.p_mean_variance(self._model(model, x, t, model_kwargs), x, t, clip_denoised)
            a = self._at(self.alphas_cumprod, t, x)
            a_prev = self._at(self.alphas_cumprod_prev, t, x)
            x0 = p["pred_xstart"]
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # re-derived so that a clipped x0 stays consistent
            sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
            if i > 0 and eta > 0:
                x = x + sigma * randn_like(x, generator)
        return x
