"""Discrete Gaussian diffusion as ADM and DiT use it: the latent DiffiT's training loss and samplers.

DDPM (Ho et al. 2020) with 1000 linear betas, epsilon prediction, the learned-range variance and hybrid
loss of Improved DDPM (Nichol & Dhariwal 2021, Sec. 3.1), timestep respacing for fast sampling (Sec. 4),
the ancestral sampler, DDIM (Song et al. 2021) and DPM-Solver++(2M) (Lu et al. 2022). DiffiT's latent model
uses exactly DiT's settings (DESIGN.md Sec. 4). The image-space model uses EDM instead (`diffusion.py`). No model is imported here:
`model(x, t, **kwargs)` is any callable returning (B, 2C, ...) [eps | v], or (B, C, ...) eps only.
Introduced in notebooks/08_latent_diffit.ipynb.
"""

import itertools
import math

import torch

from .base.runtime import randn
from .diffusion import dpm_solver_2m

# ----------------------------------------------------------------------------
# Schedules


def linear_betas(num_steps=1000, beta_start=1e-4, beta_end=0.02):
    """(T,) float64 betas, linear from 1e-4 to 0.02 for T = 1000 (DDPM; rescaled by 1000/T as ADM does)."""
    scale = 1000 / num_steps
    return torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64)


def space_timesteps(num_steps, spec):
    """The original steps kept by respacing `spec`, exactly those ADM's `space_timesteps` (respace.py) keeps.

    "250": 250 steps spread evenly over 0..T-1, both ends kept. "10,15,20": T cut into three sections, the first
    T % 3 of them one step longer, with 10, 15 and 20 steps spread evenly in each. Inside a section of n steps
    taking k, ADM adds up the stride, cur += (n - 1) / (k - 1), and keeps round(cur) (Python's round: a tie goes
    to the even neighbour); the running sum drifts from i * stride by round-off, which moves one kept step for
    278 of the counts 1..1000 (e.g. "21"), so we add it up the same way.
    "ddim30": range(0, T, s) for the smallest stride s in 1..T-1 giving exactly 30 steps (s = 34 for T = 1000);
    a ValueError if none does (ADM searches the same strides, so "ddim1" is refused too).
    """
    spec = str(spec)
    if spec.startswith("ddim"):
        k = int(spec[4:])
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == k:
                return list(range(0, num_steps, stride))
        raise ValueError(f"ddim{k}: no integer stride takes exactly {k} of {num_steps} steps")
    counts = [int(c) for c in spec.split(",")]
    size, extra = divmod(num_steps, len(counts))
    kept, start = [], 0
    for i, k in enumerate(counts):
        n = size + (1 if i < extra else 0)
        # Choice: a count of 0 is refused, where ADM silently keeps no step of that section.
        if not 1 <= k <= n:
            raise ValueError(f"respacing {spec!r}: cannot take {k} steps from a section of {n}")
        stride = (n - 1) / (k - 1) if k > 1 else 1
        # accumulate: 0, s, (0 + s) + s, ... the same float additions as ADM's `cur_idx += frac_stride`.
        kept += [start + round(cur) for cur in itertools.accumulate([stride] * (k - 1), initial=0.0)]
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


def mean_flat(x):
    """(B, ...) -> (B,): mean over all but the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------
# The diffusion


class GaussianDiffusion:
    """All per-step coefficients of a discrete diffusion with betas (T,), precomputed in float64.

    `timestep_map[i]` is the original step of this (possibly respaced) diffusion's step i: the model is
    always called with original steps, so one network serves every respacing. The tables are fixed once built:
    `_at` caches a copy of each per device and dtype.
    """

    def __init__(self, betas=None, timestep_map=None):
        b = linear_betas() if betas is None else torch.as_tensor(betas, dtype=torch.float64)
        self.num_timesteps = len(b)
        self.timestep_map = torch.arange(len(b)) if timestep_map is None else torch.as_tensor(timestep_map)
        self.betas = b
        self.alphas_cumprod = torch.cumprod(1 - b, 0)  # alpha-bar_t
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        acp, prev = self.alphas_cumprod, self.alphas_cumprod_prev
        # Every coefficient is computed here in float64 and rounded to x's dtype only when indexed (`_at`), as ADM
        # does. Computed in float32 at call time, 1 - alpha-bar_0 = 1e-4 keeps only the digits that alpha-bar_0's
        # rounding left it: sqrt(1 - alpha-bar_0) came out 8e-5 off (relative) instead of within 6e-8.
        self.sqrt_alphas_cumprod = acp.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - acp).sqrt()
        self.sqrt_recip_alphas_cumprod = acp.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / acp - 1).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance) (DDPM Eq. 6-7).
        self.posterior_variance = b * (1 - prev) / (1 - acp)
        # Zero at t = 0: clip its log to the t = 1 value so it stays finite (as ADM).
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = b * prev.sqrt() / (1 - acp)
        self.posterior_mean_coef2 = (1 - prev) * (1 - b).sqrt() / (1 - acp)
        self.log_betas = b.log()  # the learned range's upper end
        # Fixed large variance: beta_t, with beta_0 replaced by the posterior variance at t=1 (as ADM).
        self.log_variance_fixed_large = torch.log(torch.cat([self.posterior_variance[1:2], b[1:]]))
        # DDIM's sigma at eta = 1 (Song et al. Eq. 16) and the rest of its step.
        # Choice: from float64 tables too, where ADM's DDIM step computes these in float32 at call time.
        self.ddim_sigma = ((1 - prev) / (1 - acp) * (1 - acp / prev)).sqrt()
        self.sqrt_alphas_cumprod_prev = prev.sqrt()
        self.one_minus_alphas_cumprod_prev = 1 - prev
        self._cache = {}  # (table name, device, dtype) -> that table there

    @classmethod
    def respaced(cls, spec="250", betas=None):
        """A diffusion over the steps kept by `space_timesteps(T, spec)`, with the same alpha-bars there:
        new beta_i = 1 - alpha-bar(kept_i) / alpha-bar(kept_{i-1}) (Improved DDPM Sec. 4)."""
        base = cls(betas)
        kept = space_timesteps(base.num_timesteps, spec)
        acp = base.alphas_cumprod[kept]
        new_betas = 1 - acp / torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        return cls(new_betas, timestep_map=kept)

    def _table(self, name, device, dtype):
        """The table `name` on `device` in `dtype`, copied there once. Indexing the CPU table instead would move
        t to the CPU and back at every call: a device sync per sampling step on a GPU."""
        key = (name, device, dtype)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._cache[key]

    def _at(self, name, t, x):
        """Table `name` at steps t (B,), in x's dtype, shaped (B, 1, 1, ...) to broadcast against x.

        Each float64 coefficient is rounded to x's dtype once, as ADM's `_extract_into_tensor` does."""
        out = self._table(name, x.device, x.dtype)[t.to(x.device)]
        return out.view(-1, *([1] * (x.ndim - 1)))

    # --- forward process -------------------------------------------------------

    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps (DDPM Eq. 4)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (self._at("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._at("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at("posterior_mean_coef1", t, x_t) * x_start + self._at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._at("posterior_variance", t, x_t), self._at("posterior_log_variance_clipped", t, x_t)

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
            min_log = self._at("posterior_log_variance_clipped", t, x_t)
            max_log = self._at("log_betas", t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        elif model_output.shape[1] == C:
            # Choice: eps-only models are accepted too (DiT's learn_sigma=False), with ADM's fixed-large variance.
            eps = model_output
            log_variance = self._at("log_variance_fixed_large", t, x_t).expand_as(x_t)
        else:
            raise ValueError(f"model output has {model_output.shape[1]} channels; "
                             f"expected {C} (eps) or {2 * C} (eps, v)")
        # x_0 from eps (DDPM Eq. 4 solved for x_0, in ADM's form), then the posterior mean given that x_0.
        pred_xstart = (self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                       - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)
        if clip_denoised:  # pixels in [-1, 1]; latents are not clipped (DiT samples with clip_denoised=False)
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    def _model(self, model, x, t, model_kwargs):
        """Call the network with the original step of each respaced step."""
        return model(x, self._table("timestep_map", x.device, t.dtype)[t.to(x.device)], **(model_kwargs or {}))

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

        x_{t-1} = mean + exp(log_variance / 2) * z, with no noise at the last step. `generator`: None, one
        torch.Generator, or a list of one per image (base.runtime.draw), which makes image i's trajectory
        independent of its batch.
        """
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            p = self.p_mean_variance(self._model(model, x, t, model_kwargs), x, t, clip_denoised)
            if i > 0:
                x = p["mean"] + torch.exp(0.5 * p["log_variance"]) * randn(x.shape, generator, x.device, x.dtype)
            else:
                x = p["mean"]
        return x

    @torch.no_grad()
    def ddim_sample_loop(self, model, noise, model_kwargs=None, clip_denoised=False, eta=0.0, generator=None):
        """DDIM (Song et al. 2021, Eq. 12): deterministic at eta = 0, DDPM-like noise at eta = 1.

        x_{t-1} = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z,
        sigma = eta * sqrt((1 - a_prev) / (1 - a)) * sqrt(1 - a / a_prev). The variance output is unused.
        `generator` (eta > 0): as p_sample_loop's.
        """
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            p = self.p_mean_variance(self._model(model, x, t, model_kwargs), x, t, clip_denoised)
            x0 = p["pred_xstart"]
            # eps re-derived from x0 so that a clipped x0 stays consistent (DDPM Eq. 4 again, in ADM's form)
            eps = ((self._at("sqrt_recip_alphas_cumprod", t, x) * x - x0)
                   / self._at("sqrt_recipm1_alphas_cumprod", t, x))
            sigma = eta * self._at("ddim_sigma", t, x)
            x = (self._at("sqrt_alphas_cumprod_prev", t, x) * x0
                 + (self._at("one_minus_alphas_cumprod_prev", t, x) - sigma**2).sqrt() * eps)
            if i > 0 and eta > 0:
                x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
        return x

    @torch.no_grad()
    def dpm_solver_sample_loop(self, model, noise, model_kwargs=None, generator=None):
        """DPM-Solver++(2M) over this diffusion's steps: deterministic, one network evaluation per step.
        (`generator` is unused, taken so that the three samplers share one signature.)

        With x~ = x / sqrt(a) and s~ = sqrt((1 - a) / a) (a = alpha-bar_t) the VP diffusion becomes EDM's
        x~ = x_0 + s~ eps, and the data prediction is D = x~ - s~ eps(sqrt(a) x~, t) (DDPM Eq. 4 solved for x_0):
        so `diffusion.dpm_solver_2m` solves it as it is, from step T'-1 down to 0, then to s~ = 0. Only the eps
        channels are used (a learned variance plays no part in an ODE solver); guidance acts through `model`
        exactly as in the other samplers. The same trajectory as diffusers' DPMSolverMultistepScheduler
        (dpmsolver++, order 2, midpoint) at these time steps (tests/test_adm.py).
        """
        acp = self.alphas_cumprod.to(noise.device)
        sigmas = torch.cat([((1 - acp) / acp).sqrt().flip(0), acp.new_zeros(1)])  # (T' + 1,): s~ at T'-1 .. 0, then 0
        steps = torch.arange(self.num_timesteps - 1, -1, -1, device=noise.device)  # respaced step of sigmas[i]

        def denoise(x, i):  # x: x~ at sigmas[i] (float64) -> D
            t = steps[i].expand(x.shape[0])
            x_t = (x / (1 + sigmas[i] ** 2).sqrt()).to(noise.dtype)  # x = sqrt(a) x~, in the network's dtype
            eps = self._model(model, x_t, t, model_kwargs)[:, :x.shape[1]].to(torch.float64)
            return x - sigmas[i] * eps

        # x_T = noise, as the other samplers start (so x~ = noise / sqrt(a_T), not noise * s~_T: a_T is not 0)
        x = noise.to(torch.float64) * (1 + sigmas[0] ** 2).sqrt()
        return dpm_solver_2m(denoise, x, sigmas).to(noise.dtype)
