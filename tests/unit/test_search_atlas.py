"""Search statistics at atlas scale, on arrays (no cube): the search's own null maps
(:func:`ambasync.analysis.search.nulls.phase_randomised`), correlations
(:func:`ambasync.analysis.search.stats.block_correlations`) and p-values
(:func:`ambasync.analysis.search.stats.spatial_pvalues`, the GPD tail) over thousands of
synthetic smooth experiments generated directly as arrays.

* Planted map: the real Nrp1 grid plus smooth noise (r ~ 0.7) among 1,500 experiments, default
  1,000 nulls: it ranks first with q < 0.05. The empirical p alone (never below 1/1001) cannot:
  BH would need ~75 experiments at that floor.
* Smooth noise: no q < 0.05 among the same experiments.
* Tail calibration: smooth random maps against smooth experiments, p < 0.05 in [0.02, 0.09] and
  p < 0.001 in [0.0002, 0.003] over 24,000 map-experiment pairs; with 200 nulls the empirical p is
  never below 1/201, so every p < 0.001 comes from the fitted tail.

To stay fast, the planted test works on the 400 µm grid (every other voxel of the cube's 200 µm
grid: ~8,000 brain voxels) and the calibration on a 12 x 14 x 12 box; smooth fields are made by
filtering white noise in Fourier space, many at once.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import FIXTURES, notebook_ras, raw_from_zip, read_minc
from ambasync.analysis.search.nulls import phase_randomised
from ambasync.analysis.search.stats import bh_q, block_correlations, spatial_pvalues, standardise_columns


def smooth_fields(rng: np.random.Generator, n: int, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """``n`` Gaussian-smoothed white-noise fields of ``shape`` (float32, each standardised), cut from
    a box padded by 4 sigma so the FFT's wrap-around does not reach them."""
    import scipy.fft as sfft

    pad = int(np.ceil(4 * sigma))
    big = tuple(s + 2 * pad for s in shape)
    freqs = np.meshgrid(*[np.fft.fftfreq(s) for s in big[:-1]], np.fft.rfftfreq(big[-1]), indexing="ij")
    transfer = np.exp(-2 * np.pi ** 2 * sigma ** 2 * sum(f ** 2 for f in freqs)).astype(np.float32)
    out = np.empty((n, *shape), dtype=np.float32)
    for start in range(0, n, 64):
        k = min(64, n - start)
        noise = sfft.rfftn(rng.standard_normal((k, *big), dtype=np.float32), axes=(1, 2, 3))
        field = sfft.irfftn(noise * transfer, s=big, axes=(1, 2, 3))[:, pad:-pad, pad:-pad, pad:-pad]
        field -= field.mean(axis=(1, 2, 3), keepdims=True)
        out[start:start + k] = field / field.std(axis=(1, 2, 3), keepdims=True)
    return out


def scored(map_volume: np.ndarray, mask: np.ndarray, experiments: np.ndarray, nulls: int, seed: int):
    """r (experiments x (map, nulls)), p_spatial, p_method and q as the search computes them."""
    filled = np.where(mask, map_volume, 0.0)
    made = phase_randomised(filled, mask, nulls, np.random.SeedSequence(seed))
    y, y2 = standardise_columns(np.column_stack([filled[mask].astype(np.float32), made]))
    r, _ = block_correlations(experiments, y, y2=y2)
    p, how = spatial_pvalues(r, "gpd")
    return r, p, how, bh_q(p)


@pytest.fixture(scope="module")
def coarse():
    """The 400 µm brain (every other voxel), the real Nrp1 grid on it, and 1,500 smooth
    experiments (0.5 mm, as ISH energy) over its voxels: random unit-norm combinations of 150
    independent smooth fields (each one is then a smooth Gaussian field of the same kind; any two
    correlate by ~1/sqrt(150), as unrelated genes do), 10x cheaper than 1,500 fields."""
    from helpers import GRIDS

    brain = read_minc(FIXTURES / "average_template_200um_mask.mnc")[0] > 0.5
    nrp1 = notebook_ras(raw_from_zip(GRIDS / "Nrp1_P56_coronal_74272479_200um.zip")).astype(np.float64)
    nrp1, brain = nrp1[::2, ::2, ::2], brain[::2, ::2, ::2]
    mask = brain & (nrp1 != -1)
    rng = np.random.default_rng(17)
    basis = smooth_fields(rng, 150, mask.shape, 1.25)[:, mask]
    weights = rng.standard_normal((1500, len(basis))).astype(np.float32)
    weights /= np.linalg.norm(weights, axis=1, keepdims=True)
    experiments = np.concatenate([nrp1[mask][None, :].astype(np.float32), weights @ basis])
    return mask, nrp1, experiments, rng


@pytest.mark.e2e  # thousands of experiments: make test runs it
def test_planted_real_grid_ranks_first_with_q_below_005_among_thousands(coarse):
    mask, nrp1, experiments, rng = coarse
    z = (nrp1 - nrp1[mask].mean()) / nrp1[mask].std()
    noise = smooth_fields(rng, 1, mask.shape, 1.25)[0]
    noise = (noise - noise[mask].mean()) / noise[mask].std()
    planted = z + 1.0 * noise  # r = 1 / sqrt(2) ~ 0.7 with Nrp1
    r, p, how, q = scored(planted, mask, experiments, 1000, seed=0)
    want = np.corrcoef(planted[mask], nrp1[mask])[0, 1]
    assert 0.6 < want < 0.8
    assert r[0, 0] == pytest.approx(want, abs=1e-5)
    assert np.nanargmax(r[:, 0]) == 0  # Nrp1 first
    assert how[0] == "gpd" and p[0] < 1 / 1001  # below the empirical floor, from the fitted tail
    assert q[0] < 0.05, (p[0], q[0])
    # The empirical floor alone: BH over 1,501 experiments cannot go below 1501 / 1001 x (1/1001) > 0.05 ...
    empirical, _ = spatial_pvalues(r, "empirical")
    assert bh_q(empirical)[0] >= 0.05
    # ... and no synthetic experiment is called.
    assert np.nanmin(q[1:]) >= 0.05


@pytest.mark.e2e  # thousands of experiments: make test runs it
def test_smooth_noise_map_calls_nothing_among_thousands(coarse):
    mask, _, experiments, rng = coarse
    noise = smooth_fields(rng, 1, mask.shape, 1.25)[0]
    _, p, _, q = scored(noise, mask, experiments, 1000, seed=1)
    assert np.nanmin(q) >= 0.05
    assert 0.01 <= np.mean(p < 0.05) <= 0.12  # one map: loose; the calibration test below is the tight one


@pytest.mark.e2e  # ~10 s of calibration: make test runs it, make test-fast leaves it out
def test_tail_calibration_over_smooth_random_maps():
    """Smooth random maps against independent smooth experiments: every small p is a false
    positive. 60 maps x 400 experiments, 200 nulls each; the tail's p < 0.001 (below the
    empirical floor 1/201) stays near its nominal rate. The experiments are shared by all maps,
    as in a search (the maps and their nulls are independent draws)."""
    rng = np.random.default_rng(2017)
    shape, sigma, maps, per_map, nulls = (12, 14, 12), 1.0, 60, 400, 200
    mask = np.ones(shape, dtype=bool)
    experiments = smooth_fields(rng, per_map, shape, sigma).reshape(per_map, -1)
    ps, fitted = [], 0
    for m in range(maps):
        volume = smooth_fields(rng, 1, shape, sigma)[0].astype(np.float64)
        _, p, how, _ = scored(volume, mask, experiments, nulls, seed=m)
        ps.append(p)
        fitted += int(np.sum(how == "gpd"))
    p = np.concatenate(ps)
    below_05, below_001 = float(np.mean(p < 0.05)), float(np.mean(p < 0.001))
    print(f"p < 0.05: {below_05:.4f}; p < 0.001: {below_001:.5f} ({int(np.sum(p < 0.001))} of {p.size}); "
          f"{fitted} fitted")
    assert 0.02 <= below_05 <= 0.09
    assert 0.0002 <= below_001 <= 0.003
    assert fitted > 0
