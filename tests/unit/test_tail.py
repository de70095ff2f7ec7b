"""Calibration of the tail-fitted p-values (ambasync/analysis/search/tail.py).

Every statistical claim is checked over many random cases at once (vectorised), never on one
draw: the fraction of null cases below 0.05 and 0.001, the ratio to a known tail probability,
the fallback rate. Parameter estimates are checked against scipy's maximum-likelihood fit and
the Anderson-Darling step against scipy's GPD distribution functions.

How many cases, and the bounds. With n independent null cases the count below a level a is
Binomial(n, a). At n = 20,000: for a = 0.05 the SD of the fraction is 0.0015, so [0.02, 0.09]
is ±20 SD (only a gross miscalibration fails); for a = 0.001 the count is ~Poisson(20) and
[0.0002, 0.003] is 4..60 cases: P(count < 4) ≈ 2e-6 and P(count > 60) < 1e-12 if calibrated,
while a 3x liberal method (mean 60) fails half the time and a 5x one always does. Cases are
drawn in groups that share their null maps (as every experiment in a search shares the same
nulls): given the nulls, the cases of a group are independent, and the group-to-group spread
of the conditional rate (about a / sqrt(number of groups): 2,000 groups of values, 200 of
fields) adds well under the binomial SD; over 8 seeds the fractions' run-to-run SD was within
the binomial SD's range (0.0006-0.0019 at 0.05, 0.00014-0.0003 at 0.001).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from scipy import stats
from threadpoolctl import threadpool_limits  # scikit-learn's dependency

from ambasync.analysis.search.tail import (
    GPD,
    ad_critical_value,
    anderson_darling,
    empirical_pvalues,
    exceedance_counts,
    gpd_fit,
    gpd_sf,
    tail_pvalues,
)

N_NULLS = 1000
CASES = 20_000
GROUP = 10  # cases sharing one set of null values: 2,000 independent null sets per family
FIELD_GROUP = 100  # cases sharing one set of null fields: 200 sets, each case its own experiment


# ---------------------------------------------------------------------------------------------
# Null families
# ---------------------------------------------------------------------------------------------

def _grouped(rng: np.random.Generator, draw, cases: int = CASES, n_nulls: int = N_NULLS,
             group: int = GROUP) -> tuple[np.ndarray, np.ndarray]:
    """observed (cases,) and nulls (cases x n_nulls, float32) where each group of ``group``
    cases shares its nulls and every value is an independent draw of ``draw(rng, shape)``."""
    groups = cases // group
    nulls = np.repeat(draw(rng, (groups, n_nulls)).astype(np.float32), group, axis=0)
    return draw(rng, (cases,)).astype(np.float64), nulls


def _field_correlations(rng: np.random.Generator, spectrum: np.ndarray, cases: int = CASES,
                        n_nulls: int = N_NULLS, group: int = FIELD_GROUP) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r between independent stationary Gaussian random fields on a periodic grid.

    By Parseval, r of two mean-removed fields is the cosine between their Fourier coefficients
    weighted by the amplitude spectrum (each frequency's real and imaginary parts are independent
    dimensions with variance ``spectrum``), so the few non-negligible coefficients of a smooth
    field are drawn instead of its voxels (:func:`test_field_correlations_are_pearson_r` checks
    the identity on synthesised fields). Each case has its own "experiment" field and its own
    observed "map"; each group of cases shares its null maps, as every experiment of a search
    shares the same nulls. Returns observed r (cases,) and null r (cases x n_nulls, float32).
    """
    scale = np.sqrt(np.repeat(spectrum, 2)).astype(np.float32)

    def unit(shape):
        v = rng.standard_normal((*shape, scale.size), dtype=np.float32) * scale
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    experiments, maps = unit((cases,)), unit((cases,))
    observed = np.einsum("ij,ij->i", experiments, maps).astype(np.float64)
    nulls = np.empty((cases, n_nulls), dtype=np.float32)
    with threadpool_limits(1):  # many small products: BLAS threads only contend on a busy machine
        for g in range(0, cases, group):
            nulls[g:g + group] = experiments[g:g + group] @ unit((n_nulls,)).T
    return np.clip(observed, -1, 1), np.clip(nulls, -1, 1)


def _spectrum_1d(length_scale: float = 4.0, size: int = 256) -> np.ndarray:
    k = np.arange(1, size // 2)
    s = np.exp(-0.5 * (2 * np.pi * k * length_scale / size) ** 2)
    return s[s > 1e-3 * s.max()]


def _spectrum_3d(length_scale: float = 4.0, size: int = 16) -> np.ndarray:
    """Gaussian-smoothed white noise on a periodic size³ grid; each ±k pair once (real field)."""
    g = np.fft.fftfreq(size, 1 / size)
    kx, ky, kz = np.meshgrid(g, g, g[: size // 2 + 1].clip(0), indexing="ij")
    k2 = (kx ** 2 + ky ** 2 + kz ** 2).ravel()
    half = (kz.ravel() > 0) | ((kz.ravel() == 0) & ((ky.ravel() > 0) | ((ky.ravel() == 0) & (kx.ravel() > 0))))
    s = np.exp(-0.5 * k2[half] * (2 * np.pi * length_scale / size) ** 2)
    return s[s > 1e-3 * s.max()]


def _normal(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _student3(rng, shape):
    return rng.standard_t(3, shape)


FAMILIES = {
    # name: (maker, fisher): fisher=False for statistics that are not correlations
    "normal": (lambda rng: _grouped(rng, _normal), False),
    "student_t3": (lambda rng: _grouped(rng, _student3), False),
    # Pearson r of 8 independent normal pairs: a cosine in 7 isotropic dimensions
    "r_of_8_points": (lambda rng: _field_correlations(rng, np.ones(7) / 2), True),
    "r_smooth_1d": (lambda rng: _field_correlations(rng, _spectrum_1d()), True),
    "r_smooth_3d": (lambda rng: _field_correlations(rng, _spectrum_3d()), True),
}


def test_field_correlations_are_pearson_r():
    """The spectral shortcut is Pearson r of the synthesised 1-D fields (Parseval)."""
    rng = np.random.default_rng(7)
    spectrum = _spectrum_1d()
    size = 256
    a, b = (rng.standard_normal((50, spectrum.size, 2)) * np.sqrt(spectrum)[:, None] for _ in range(2))

    def field(c):
        full = np.zeros((c.shape[0], size // 2 + 1), dtype=complex)
        full[:, 1:spectrum.size + 1] = c[..., 0] + 1j * c[..., 1]
        return np.fft.irfft(full, n=size, axis=1)

    fa, fb = field(a), field(b)
    pearson = np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(fa, fb, strict=True)])
    ua, ub = a.reshape(50, -1), b.reshape(50, -1)
    cosine = (ua * ub).sum(1) / np.linalg.norm(ua, axis=1) / np.linalg.norm(ub, axis=1)
    np.testing.assert_allclose(pearson, cosine, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Calibration under the null
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_calibrated_under_the_null(family):
    maker, fisher = FAMILIES[family]
    rng = np.random.default_rng(100 + list(FAMILIES).index(family))
    observed, nulls = maker(rng)
    alternatives = ("greater", "two-sided") if family in ("normal", "r_smooth_3d") else ("greater",)
    for alternative in alternatives:
        result = tail_pvalues(observed, nulls, alternative=alternative, fisher=fisher)
        p = result.p
        assert np.isfinite(p).all() and (p > 0).all() and (p <= 1).all()
        below_05, below_001 = np.mean(p < 0.05), np.mean(p < 0.001)
        assert 0.02 <= below_05 <= 0.09, (family, alternative, below_05)
        assert 0.0002 <= below_001 <= 0.003, (family, alternative, below_001)
        # the tail is used where it should be: about the p_threshold (0.1) fraction of rows
        assert 0.05 < np.mean(result.method == GPD) < 0.15, (family, alternative)


# ---------------------------------------------------------------------------------------------
# A real effect: far beyond every null
# ---------------------------------------------------------------------------------------------

def test_strong_effect_reaches_the_true_tail_probability():
    """Normal nulls, N = 1,000, observed at z = 5 in 2,000 cases (each its own nulls): the true
    p is norm.sf(5) = 2.9e-7, 3,500 times below the empirical floor 1/1001. The GPD p must be
    far below 1/(N+1) in (nearly) every case and within a factor ~3 of the truth in the median
    (measured 2.8-3.1, conservative-leaning; asserted within [1/3, 4]); the case-to-case spread is that of extrapolating 3.5 decades from 1,000 draws (the shape's
    standard error is ~0.06 on 250 exceedances), measured here and in docs/search.md."""
    rng = np.random.default_rng(5)
    n = 2000
    nulls = rng.standard_normal((n, N_NULLS))
    truth = stats.norm.sf(5.0)
    result = tail_pvalues(np.full(n, 5.0), nulls, fisher=False)
    assert (result.method == GPD).all()
    assert (result.p > 0).all() and (result.p < 1 / (N_NULLS + 1)).all()
    assert np.mean(result.p < 1e-4) > 0.98  # at least ten times below the empirical floor
    ratio = result.p / truth
    assert 1 / 3 <= np.median(ratio) <= 4, np.median(ratio)
    # the fit is conservative-leaning (shape floored at the Gaussian tail): gross
    # anti-conservatism is rare, and half the cases are within a factor 3
    assert np.mean(ratio < 1 / 10) < 0.02
    assert np.mean(np.abs(np.log10(ratio)) < np.log10(3)) > 0.35
    # the empirical p could not have said more than 1/1001 (a null beyond z = 5 is rare)
    assert np.mean(result.p_empirical == 1 / (N_NULLS + 1)) > 0.99


def test_larger_effects_get_smaller_p():
    """Beyond every null, p decreases with the observed value (same nulls)."""
    rng = np.random.default_rng(8)
    nulls = np.repeat(np.tanh(rng.normal(0, 0.1, (1, N_NULLS))), 40, axis=0)
    observed = np.linspace(nulls.max() + 0.01, 0.95, 40)
    result = tail_pvalues(observed, nulls)
    assert (result.method == GPD).all()
    assert (np.diff(result.p) < 0).all()


# ---------------------------------------------------------------------------------------------
# Poor fit: fall back
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lumpy", ["rounded_normal", "poisson", "rounded_r"])
def test_discrete_nulls_fall_back_to_empirical(lumpy):
    """Nulls with few distinct values (ties throughout the tail) never pass the
    Anderson-Darling test at any threshold: every row keeps its empirical p."""
    rng = np.random.default_rng(9)
    n = 1000
    if lumpy == "rounded_normal":
        nulls, fisher = np.round(rng.standard_normal((n, N_NULLS)) * 2) / 2, False
    elif lumpy == "poisson":
        nulls, fisher = rng.poisson(2.0, (n, N_NULLS)).astype(float), False
    else:
        nulls, fisher = np.round(np.tanh(rng.normal(0, 0.2, (n, N_NULLS))), 1), True
    observed = np.minimum(nulls.max(axis=1) + 0.05, 0.99 if fisher else np.inf)
    result = tail_pvalues(observed, nulls, fisher=fisher)
    assert (result.method == "empirical").all()
    assert (result.n_exceedances == 0).all()
    np.testing.assert_array_equal(result.p, result.p_empirical)
    np.testing.assert_allclose(result.p, 1 / (N_NULLS + 1))


def test_threshold_is_raised_until_the_fit_is_accepted():
    """A tail whose lower part is a second mode (20 % of the nulls near 3 SD) fails at the
    75th percentile; the accepted fits use fewer exceedances, and still give p < 1/(N+1)."""
    rng = np.random.default_rng(10)
    n = 500
    mode = rng.random((n, N_NULLS)) < 0.2
    nulls = np.where(mode, rng.normal(3.0, 0.2, (n, N_NULLS)), rng.standard_normal((n, N_NULLS)))
    result = tail_pvalues(nulls.max(axis=1) + 0.5, nulls, fisher=False)
    accepted = result.n_exceedances > 0
    assert accepted.mean() > 0.9
    assert np.median(result.n_exceedances[accepted]) <= 200
    assert np.median(result.p) < 1 / (N_NULLS + 1)
    # unimodal normal nulls: nearly always accepted at the first threshold (250 exceedances)
    plain = tail_pvalues(np.full(n, 10.0), rng.standard_normal((n, N_NULLS)), fisher=False)
    assert np.mean(plain.n_exceedances == 250) > 0.85


def test_rows_that_cannot_be_fitted():
    rng = np.random.default_rng(11)
    nulls = np.tanh(rng.normal(0, 0.1, (4, N_NULLS)))
    observed = np.array([0.9, np.nan, 0.9, 0.05])
    nulls[2, 17] = np.nan  # a NaN null: empirical p (the NaN never counts as extreme)
    result = tail_pvalues(observed, nulls)
    assert list(result.method) == ["gpd", "none", "empirical", "empirical"]
    assert np.isnan(result.p[1])
    assert result.p[2] == pytest.approx(1 / (N_NULLS + 1))
    assert result.p[3] == result.p_empirical[3] > 0.1  # not in the tail: not fitted
    # too few nulls for 30 exceedances at the 75th percentile: empirical only
    few = tail_pvalues(np.full(3, 0.9), np.tanh(rng.normal(0, 0.1, (3, 100))))
    assert (few.method == "empirical").all()
    assert exceedance_counts(100).size == 0
    assert list(exceedance_counts(1000)) == list(range(250, 20, -10))


# ---------------------------------------------------------------------------------------------
# Against scipy and plain formulas
# ---------------------------------------------------------------------------------------------

def test_empirical_pvalues_count_as_today():
    rng = np.random.default_rng(12)
    r = np.tanh(rng.normal(0, 0.3, (300, 51)))
    r[5, 7], r[9, 0] = np.nan, np.nan
    obs, nulls = r[:, 0], r[:, 1:]
    expected = {
        "greater": (1 + np.sum(np.nan_to_num(nulls, nan=-np.inf) >= obs[:, None], axis=1)) / 51,
        "less": (1 + np.sum(np.nan_to_num(nulls, nan=np.inf) <= obs[:, None], axis=1)) / 51,
        "two-sided": (1 + np.sum(np.nan_to_num(np.abs(nulls), nan=-np.inf) >= np.abs(obs)[:, None], axis=1)) / 51,
    }
    for alternative, want in expected.items():
        want[9] = np.nan
        np.testing.assert_array_equal(empirical_pvalues(obs, nulls, alternative), want)


def test_gpd_fit_agrees_with_scipy_maximum_likelihood():
    """Zhang-Stephens estimates vs scipy.stats.genpareto.fit (ML, location 0) on a handful of
    samples: within a fraction of the standard error (SE of xi ≈ (1 + xi) / sqrt(n) ≈ 0.06)."""
    rng = np.random.default_rng(13)
    shapes = np.array([-0.3, -0.1, 0.0, 0.1, 0.25, 0.5])
    n = 250
    x = np.sort(np.stack([stats.genpareto.rvs(c, scale=2.0, size=n, random_state=rng) for c in shapes]), axis=1)
    xi, sigma = gpd_fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = np.array([stats.genpareto.fit(row, floc=0) for row in x])
    np.testing.assert_allclose(xi, ml[:, 0], atol=0.05)
    np.testing.assert_allclose(sigma, ml[:, 2], rtol=0.08)
    # and both near the truth
    np.testing.assert_allclose(xi, shapes, atol=0.2)
    # survival function and A² against scipy's GPD at the same parameters
    y = x[:, ::25]
    np.testing.assert_allclose(gpd_sf(y, xi[:, None], sigma[:, None]),
                               stats.genpareto.sf(y, xi[:, None], scale=sigma[:, None]), rtol=1e-10)
    f = stats.genpareto.cdf(x, xi[:, None], scale=sigma[:, None])
    i = np.arange(1, n + 1)
    a2 = -n - np.sum((2 * i - 1) * (np.log(f) + np.log(1 - f[:, ::-1])), axis=1) / n
    np.testing.assert_allclose(anderson_darling(x, xi, sigma), a2, rtol=1e-8)


def test_anderson_darling_test_has_its_size():
    """GPD samples with known shape, fitted and tested at 5 %: rejected about 5 % of the time
    for light and heavy tails alike (2,000 samples each: SD of the rate 0.005). This is what
    fixes the orientation of Choulakian & Stephens' table: read with Hosking's k = -xi (as PALM
    passes it) the rate is ~9 % at xi = -0.3 and ~1 % at xi = 0.4."""
    rng = np.random.default_rng(14)
    for shape in (-0.3, 0.0, 0.4, 0.8):
        x = np.sort(stats.genpareto.rvs(shape, size=(2000, 250), random_state=rng), axis=1)
        xi, sigma = gpd_fit(x)
        rejected = np.mean(anderson_darling(x, xi, sigma) >= ad_critical_value(xi, 0.05))
        assert 0.025 <= rejected <= 0.08, (shape, rejected)


def test_alternatives_are_mirror_images():
    rng = np.random.default_rng(15)
    nulls = np.tanh(rng.normal(0, 0.15, (3000, N_NULLS)))
    observed = np.tanh(rng.normal(0, 0.3, 3000))
    greater = tail_pvalues(observed, nulls)
    less = tail_pvalues(-observed, -nulls, alternative="less")
    np.testing.assert_array_equal(greater.p, less.p)
    np.testing.assert_array_equal(greater.method, less.method)
    flip = np.where(rng.random(3000) < 0.5, -1.0, 1.0)
    two = tail_pvalues(observed, nulls, alternative="two-sided")
    flipped = tail_pvalues(observed * flip, nulls * flip[:, None], alternative="two-sided")
    np.testing.assert_array_equal(two.p, flipped.p)


def test_tail_agrees_with_the_empirical_p_where_both_are_well_determined():
    """Where the empirical p is 0.01..0.1 (10 to 100 nulls beyond the observed value) the
    GPD p must tell the same story: median ratio ~1, 90 % within about ±20 %."""
    rng = np.random.default_rng(17)
    nulls = np.tanh(np.float32(0.15) * rng.standard_normal((20_000, N_NULLS), dtype=np.float32))
    observed = np.tanh(0.15 * rng.standard_normal(20_000))
    result = tail_pvalues(observed, nulls)
    body = (result.method == GPD) & (result.p_empirical >= 0.01)
    ratio = result.p[body] / result.p_empirical[body]
    assert body.sum() > 1000
    assert 0.9 < np.median(ratio) < 1.1
    low, high = np.quantile(ratio, [0.05, 0.95])
    assert 0.8 < low and high < 1.25, (low, high)


def _bh_q(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values, plainly."""
    order = np.argsort(p)
    scaled = p[order] * p.size / np.arange(1, p.size + 1)
    q = np.empty_like(p)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


def test_a_search_sized_run_finds_strong_matches_fast():
    """The problem this solves, at a search's size: 26,078 experiments (smooth 3-D fields), one
    map, 1,000 shared null maps; 20 experiments are noisy copies of the map (r ≈ 0.9). With the
    empirical p no q can go below 0.05 (smallest q = m / (20 * 1,001) = 1.3); with the tail fit
    all 20 do, while the unrelated experiments stay calibrated. One call, well under 5 s."""
    rng = np.random.default_rng(16)
    m, planted = 26_078, 20
    scale = np.sqrt(np.repeat(_spectrum_3d(), 2))

    def fields(n):
        return rng.standard_normal((n, scale.size)) * scale

    the_map, null_maps, experiments = fields(1)[0], fields(N_NULLS), fields(m)
    experiments[:planted] = the_map + 0.4 * fields(planted)

    def unit(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    with threadpool_limits(1):
        observed = unit(experiments) @ unit(the_map)
        nulls = (unit(experiments) @ unit(null_maps).T).astype(np.float32)
    assert observed[:planted].min() > nulls[:planted].max()

    start = time.perf_counter()
    result = tail_pvalues(observed, nulls)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, elapsed

    assert (_bh_q(result.p_empirical) >= 0.05).all()
    q = _bh_q(result.p)
    assert (q[:planted] < 0.05).all(), np.sort(q[:planted])[-3:]
    assert (result.method[:planted] == GPD).all()
    unrelated = result.p[planted:]
    assert 0.02 <= np.mean(unrelated < 0.05) <= 0.09
    assert np.mean(q[planted:] < 0.05) < 0.001  # at most a few false discoveries
