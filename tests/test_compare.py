"""tools/compare.py: intervals against scipy's own t test, and verdicts that only separate what differs."""

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from minidiffit.tools.compare import interval, paired_difference, verdict

ROOT = Path(__file__).resolve().parents[1]


def test_interval_is_scipys_paired_t_interval():
    a, b = [166.2, 167.4, 163.9, 170.1], [170.6, 172.7, 169.0, 171.2]
    mean, low, high = paired_difference(b, a)
    ci = scipy.stats.ttest_rel(b, a).confidence_interval(0.95)
    assert mean == pytest.approx(np.mean(np.subtract(b, a)))
    assert (low, high) == pytest.approx((ci.low, ci.high), rel=1e-12)


def test_identical_variants_are_not_separated():
    fids = [166.2, 167.4, 163.9]
    assert verdict(*paired_difference(fids, fids)[1:]) == "not separated at this budget"


def test_separation_needs_the_interval_to_exclude_zero():
    tmsa = [160.0, 170.0, 150.0]
    assert verdict(*paired_difference([165.0, 175.1, 155.2], tmsa)[1:]) == "separated: TMSA better"  # +5 each seed
    assert verdict(*paired_difference([155.0, 164.8, 145.1], tmsa)[1:]) == "separated: TMSA worse"
    # the same mean difference with the signs mixed: the seeds disagree, nothing is separated
    assert verdict(*paired_difference([175.0, 160.0, 160.0], tmsa)[1:]) == "not separated at this budget"
    # unpaired, the +5 shift would drown in the 10-point spread between seeds
    assert interval([165.0, 175.1, 155.2])[1] < interval(tmsa)[2]


def test_one_seed_separates_nothing_and_lengths_must_match():
    mean, low, high = interval([3.0])
    assert mean == 3.0 and math.isinf(low) and math.isinf(high)
    with pytest.raises(ValueError, match="paired seeds"):
        paired_difference([1.0, 2.0], [1.0])


def test_the_ablations_report_pairs_each_variant_with_tmsa_by_seed():
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "experiments"))  # the scripts import their runner as the script's folder allows
    spec = importlib.util.spec_from_file_location("ablations", ROOT / "experiments" / "ablations.py")
    ablations = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablations)
    rows = [dict(variant=v, seed=s, fid=f) for v, s, f in [("tmsa", 0, 166.2), ("tmsa", 1, 167.4), ("tmsa", 2, 165.0),
                                                          ("bias", 1, 172.7), ("bias", 0, 170.6), ("bias", 2, 171.0),
                                                          ("same", 0, 166.2), ("same", 1, 167.4), ("same", 2, 165.0)]]
    by_name = {c["variant"]: c for c in ablations.compare_to_tmsa(rows)}
    assert by_name["bias"]["verdict"] == "separated: TMSA better"  # +4.4, +5.3, +6.0: paired by seed, not by order
    assert by_name["bias"]["diff"] == pytest.approx((4.4 + 5.3 + 6.0) / 3)
    assert by_name["same"]["verdict"] == "not separated at this budget"
    assert "verdict" not in by_name["tmsa"] and ablations.compare_to_tmsa(rows[3:6]) == []
    # rows from another recipe's length neither count as done nor enter the tables; they stay in the file
    old_and_new = [dict(family=f, variant="tmsa", seed=0, kimg=k) for f, k in [("image", 36.0), ("image", 48.0),
                                                                               ("latent", 96.0), ("latent", 192.0)]]
    assert ablations.rows_at(old_and_new, {"image": 48.0, "latent": 192.0}) == old_and_new[1::2]
