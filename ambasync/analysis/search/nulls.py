"""Spatial null maps: random maps with the user's map's spatial autocorrelation.

Method: Fourier phase randomisation inside a mask, with the autocovariance corrected
for the mask and amplitude adjustment (Theiler et al. 1992, "AAFT"):

1. The map's autocovariance is estimated inside the mask, each lag divided by the
   number of voxel pairs the mask holds at that lag. Plain phase randomisation of the
   zero-filled map divides by the whole mask instead, which shrinks the autocovariance
   at every lag by the mask's overlap with itself: its nulls are rougher than the map,
   their correlations too narrow, and p-values too small (measured over smooth random
   maps: 6.7 % of p < 0.05 with plain phase randomisation, 6.1-6.2 % with this
   correction, for a nominal 4.95 %; docs/search.md).
2. The autocovariance is tapered to zero at ``max_lag_fraction`` of the mask's extent
   (beyond that few pairs exist and the estimate is noise) and turned into an
   amplitude spectrum on a grid padded by that lag, so nulls do not wrap around.
3. Each null takes that amplitude spectrum with random phases (``QUARTER_TURNS``; the
   inverse real FFT keeps the real part's Hermitian half, so the null is real): a
   stationary random field with the map's autocovariance (Wiener-Khinchin).
4. Inside the mask the null's voxels are given the map's own values in the null's rank
   order, so every null has exactly the map's value distribution.

Why not brainsmash's variogram-matched surrogates: its volumetric path
(``brainsmash.workbench.geo.volume`` + ``mapgen.sampled.Sampled``) needs every
voxel's sorted distances to all others on disk (two N×N memory maps, 2 × 16 GB for the
~63,000 voxels of a 200 µm mouse brain) and a k-nearest-neighbour smoothing of a
permuted map per null; an FFT null costs ~12 ms of CPU on this grid.

Pure functions: arrays in, arrays out; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

# Longest lag kept in the autocovariance, as a fraction of the mask's extent along each
# axis: beyond half the extent fewer than half the voxels have a partner and the
# estimate is mostly noise.
DEFAULT_MAX_LAG_FRACTION = 0.5
# Random phases are drawn from the four quarter-turns π/4 + kπ/2: a constant modulus keeps
# the amplitude spectrum exactly (as phase randomisation does); they are zero-mean, independent
# between frequencies and E[e^{2iφ}] = 0, so each null's expected autocovariance is the map's;
# the sum over ~10^5 frequencies makes every voxel Gaussian. Ten times cheaper to draw than
# continuous phases or Gaussian noise, which dominated the cost of a null.
QUARTER_TURNS = (np.array([1 + 1j, -1 + 1j, -1 - 1j, 1 - 1j]) / np.sqrt(2)).astype(np.complex64)
# Nulls made per FFT batch (memory: about 16 bytes × batch × padded voxels).
DEFAULT_BATCH = 16


def _lags(n: int) -> np.ndarray:
    """Signed lag of each index of a circular axis of length ``n``."""
    i = np.arange(n)
    return np.where(i <= n // 2, i, i - n)


def _taper(lags: np.ndarray, full: float, zero: float) -> np.ndarray:
    """1 up to ``full``, a cosine down to 0 at ``zero``, 0 beyond."""
    a = np.abs(lags).astype(float)
    t = np.clip((a - full) / max(zero - full, 1e-9), 0.0, 1.0)
    return 0.5 * (1 + np.cos(np.pi * t))


@dataclass(frozen=True)
class NullSpectrum:
    """What every null of one map shares: the amplitude spectrum (``rfftn`` layout, float32)
    on the FFT grid ``shape`` (the mask's box padded by the longest lag kept)."""

    amplitude: np.ndarray
    shape: tuple[int, int, int]


def null_spectrum(values: np.ndarray, mask: np.ndarray, max_lag_fraction: float = DEFAULT_MAX_LAG_FRACTION,
                  correct_overlap: bool = True) -> NullSpectrum:
    """The amplitude spectrum of nulls with the autocovariance of ``values`` inside ``mask``.
    ``correct_overlap=False`` gives plain phase randomisation of the zero-filled map (each lag
    divided by all the mask's voxels, not by the pairs at that lag): kept to measure it against."""
    mask = np.asarray(mask, dtype=bool)
    inside = np.asarray(values, dtype=np.float64)[mask]
    extent = [np.ptp(np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != d)))[0]) + 1 for d in range(3)]
    max_lag = [max(1, int(max_lag_fraction * e)) for e in extent]
    # On a circular grid at least (box + max_lag) long, lags shorter than max_lag do not wrap:
    # the autocovariance is estimated on the nulls' own FFT grid, exactly for the lags kept.
    shape = generation_shape(mask.shape, max_lag)
    box = tuple(slice(0, s) for s in mask.shape)
    field = np.zeros(shape)
    field[box][mask] = inside - inside.mean()
    inmask = np.zeros(shape)
    inmask[box][mask] = 1.0
    cov = sfft.irfftn(np.abs(sfft.rfftn(field)) ** 2, s=shape)
    pairs = np.rint(sfft.irfftn(np.abs(sfft.rfftn(inmask)) ** 2, s=shape))
    cov = np.where(pairs >= 1, cov / (np.maximum(pairs, 1) if correct_overlap else inside.size), 0.0)
    for d in range(3):  # taper to 0 at max_lag: the longer (wrapped) lags are dropped
        cov *= _taper(_lags(shape[d]), max_lag[d] / 2, max_lag[d]).reshape([-1 if a == d else 1 for a in range(3)])
    power = np.clip(sfft.rfftn(cov).real, 0.0, None)  # an even function: real spectrum; clip estimation noise
    return NullSpectrum(np.sqrt(power).astype(np.float32), shape)


def generation_shape(mask_shape: tuple[int, ...], max_lag: list[int]) -> tuple[int, ...]:
    """FFT grid of the nulls: the mask's box padded by the longest lag, so no lag wraps."""
    return tuple(sfft.next_fast_len(s + m, real=True) for s, m in zip(mask_shape, max_lag))


def phase_randomised(values: np.ndarray, mask: np.ndarray, n: int, seed: int | np.random.SeedSequence,
                     max_lag_fraction: float = DEFAULT_MAX_LAG_FRACTION, batch: int = DEFAULT_BATCH,
                     spectrum: NullSpectrum | None = None) -> np.ndarray:
    """``n`` null maps of ``values`` (a volume) inside ``mask`` (bool, same shape).

    Returns float32 of shape (number of mask voxels, n): column j is null j at the
    mask's voxels in C order (``values[mask]`` order). The same ``seed`` gives the same
    nulls (numpy's PCG64, a deterministic FFT). ``spectrum`` (from :func:`null_spectrum`)
    saves recomputing the spectrum when nulls are made in several batches.
    """
    mask = np.asarray(mask, dtype=bool)
    if np.shape(values) != mask.shape:
        raise ValueError(f"values {np.shape(values)} and mask {mask.shape} differ in shape")
    inside = np.asarray(values, dtype=np.float64)[mask]
    if inside.size < 2 or not np.all(np.isfinite(inside)):
        raise ValueError("the map needs at least two voxels in the mask, all finite")
    if spectrum is None:
        spectrum = null_spectrum(values, mask, max_lag_fraction)
    amplitude, shape = spectrum.amplitude, spectrum.shape
    sorted_values = np.sort(inside).astype(np.float32)

    rng = np.random.default_rng(seed)
    out = np.empty((inside.size, n), dtype=np.float32)
    box = (slice(None),) + tuple(slice(0, s) for s in mask.shape)
    for start in range(0, n, batch):
        k = min(batch, n - start)
        phases = QUARTER_TURNS[rng.integers(0, 4, size=(k, *amplitude.shape), dtype=np.uint8)]
        phases *= amplitude
        nulls = sfft.irfftn(phases, s=shape, axes=(1, 2, 3))[box][:, mask]  # (k, voxels)
        adjusted = np.empty_like(nulls)
        np.put_along_axis(adjusted, np.argsort(nulls, axis=1), sorted_values[None, :], axis=1)
        out[:, start:start + k] = adjusted.T
    return out
