"""Comparing variants over seeds: a mean with its 95% interval, and paired differences that say "separated" or not.

An ablation trains each variant with seeds 0..K-1; seed k of every variant shares its data order, initialisation
(where shapes allow) and sampling noise, so the difference variant - baseline at one seed cancels most of what
the seed moves, and the K differences are what is tested (a paired t interval, Student 1908). A comparison is
called separated only when that interval excludes zero. Used by experiments/ablations.py; introduced in
notebooks/10_ablations.ipynb.
"""

import math

import numpy as np
import scipy.stats


def interval(values, level=0.95):
    """(mean, low, high): the mean of `values` and its two-sided t interval; infinite for a single value."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("an interval needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return mean, -math.inf, math.inf
    half = float(scipy.stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def paired_difference(variant, baseline, level=0.95):
    """(mean, low, high) of variant[k] - baseline[k] over seeds k: both lists in seed order, of equal length."""
    if len(variant) != len(baseline):
        raise ValueError(f"paired seeds: {len(variant)} values vs {len(baseline)} for the baseline")
    return interval(np.subtract(variant, baseline), level)


def verdict(low, high, baseline="TMSA", lower_is_better=True):
    """The words for a paired interval of variant - baseline (FID and KID: lower is better)."""
    if low > 0:
        return f"separated: {baseline} {'better' if lower_is_better else 'worse'}"
    if high < 0:
        return f"separated: {baseline} {'worse' if lower_is_better else 'better'}"
    return "not separated at this budget"
