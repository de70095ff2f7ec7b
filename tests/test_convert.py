"""Conversion parity with the reference notebook, on real Allen data.

What a user would notice if these broke: volumes misplaced or flipped in their
template, or voxel values that differ from the notebook's output."""

from pathlib import Path

import numpy as np
import pytest

from ambasync.mirror.convert import ConvertJob, convert
from ambasync.settings import ConvertSettings
from ambasync.target import Target
from helpers import (
    GRIDS, NOTEBOOK_DIMS, NOTEBOOK_SIZES, NOTEBOOK_STARTS, NOTEBOOK_STEPS, REAL_ZIPS, REFERENCE, dice,
    mincinfo, notebook_ras, quantisation_step, raw_from_zip, read_minc, require_reference, resample_like,
)


def run_convert(body: bytes, out: Path, volume: str = "energy", dtype: str = "ushort",
                orientation: str = "RAS", space: str = "MICe", expansion: float = 1.0) -> Path:
    target = out / f"{volume}_{dtype}_{orientation}_{space}.mnc"
    result = convert(ConvertJob(1, body, str(out), (Target(volume, target.name),),
                                ConvertSettings(orientation, space, expansion, dtype)))
    assert result.outputs[0][1].path == str(target)
    return target


def assert_notebook_geometry(path: Path) -> None:
    _, geo = read_minc(path)
    assert geo["dimnames"] == NOTEBOOK_DIMS
    assert geo["sizes"] == NOTEBOOK_SIZES
    assert geo["starts"] == pytest.approx(NOTEBOOK_STARTS)
    assert geo["steps"] == pytest.approx(NOTEBOOK_STEPS)
    assert geo["cosines"] == {"xspace": (1, 0, 0), "yspace": (0, 1, 0), "zspace": (0, 0, 1)}
    info = mincinfo(path)
    assert info["order"] == NOTEBOOK_DIMS  # -vardims image: the image's own order
    for name, size, start in zip(NOTEBOOK_DIMS, NOTEBOOK_SIZES, NOTEBOOK_STARTS):
        assert info["dims"][name] == pytest.approx((size, 0.2, start))
    assert info["cosines"] == {"xspace": (1, 0, 0), "yspace": (0, 1, 0), "zspace": (0, 0, 1)}


@pytest.mark.parametrize("eid", sorted(REAL_ZIPS))
def test_real_grids_match_the_notebook_exactly_as_float_and_within_a_step_as_ushort(eid, tmp_path):
    require_reference()
    raw = raw_from_zip(REAL_ZIPS[eid])
    expected = notebook_ras(raw)
    body = REAL_ZIPS[eid].read_bytes()

    exact = run_convert(body, tmp_path, dtype="float")
    assert_notebook_geometry(exact)
    data, _ = read_minc(exact)
    np.testing.assert_array_equal(data.astype(np.float32), expected)
    assert "float" in mincinfo(exact)["text"]

    packed = run_convert(body, tmp_path, dtype="ushort")
    assert_notebook_geometry(packed)
    data, _ = read_minc(packed)
    assert "unsigned short" in mincinfo(packed)["text"]
    assert np.abs(data - expected).max() <= quantisation_step(expected)
    np.testing.assert_array_equal(data[expected == -1], -1)  # "no data" stays exactly -1 (allen-api.md §4)


def test_pir_output_keeps_the_stored_order_and_ccfv3_geometry(tmp_path):
    require_reference()
    body = REAL_ZIPS[74272479].read_bytes()
    path = run_convert(body, tmp_path, dtype="float", orientation="PIR", space="CCFv3")
    data, geo = read_minc(path)
    np.testing.assert_array_equal(data.astype(np.float32), raw_from_zip(REAL_ZIPS[74272479]))
    assert geo["sizes"] == (58, 41, 67) and geo["starts"] == pytest.approx((0, 0, 0))
    ras_ccf = run_convert(body, tmp_path, dtype="float", space="CCFv3", expansion=10.0)
    _, geo = read_minc(ras_ccf)
    assert geo["starts"] == pytest.approx((-80.0, -132.0, 0.0))  # -(8000, 13200, 0) µm * 10 / 1000
    assert geo["steps"] == pytest.approx((2.0, 2.0, 2.0))
    assert geo["cosines"]["xspace"] == (0, 0, 1) and geo["cosines"]["yspace"] == (-1, 0, 0)


def _mask(name: str) -> tuple[np.ndarray, dict]:
    return read_minc(REFERENCE / name)


def test_annotation_converted_by_ambasync_overlaps_the_template_mask(tmp_path):
    """Dice 0.966 for the right orientation; 0.872 / 0.746 for S-I / A-P flips (reference README)."""
    require_reference()
    path = run_convert((GRIDS / "P56_Mouse_gridAnnotation.zip").read_bytes(), tmp_path, volume="gridAnnotation",
                       dtype="float")
    labels, geo = read_minc(path)
    mask, mask_geo = _mask("average_template_200um_mask.mnc")
    brain = resample_like(labels, geo, mask_geo) > 0
    assert dice(brain, mask > 0.5) >= 0.95
    # the same measure tells a flip apart, so the threshold is meaningful
    assert dice(brain[:, ::-1, :], mask > 0.5) < 0.9


@pytest.mark.parametrize("eid, fraction", [(74272479, 0.998), (71717084, 0.988)])
def test_real_grids_hold_data_over_the_coverage_mask(eid, fraction, tmp_path):
    require_reference()
    path = run_convert(REAL_ZIPS[eid].read_bytes(), tmp_path, dtype="float")
    data, geo = read_minc(path)
    coverage, cov_geo = _mask("coronal_200um_coverage_bin0.8.mnc")
    inside = resample_like(data, geo, cov_geo)[coverage > 0.5]
    held = float((inside != -1).mean())
    assert held >= 0.95 and held == pytest.approx(fraction, abs=0.002)


@pytest.mark.e2e
async def test_the_conversion_pool_is_replaced_by_fresh_processes_and_never_left_without_workers(tmp_path):
    """Fresh processes bound libminc's per-file memory over a 26,000-volume night; if the pool
    were left with no worker (Python 3.11's max_tasks_per_child can do that) the run would hang."""
    import asyncio

    from ambasync.mirror.pool import ConversionPool
    from ambasync.replica import Replica, ReplicaConfig

    rep = Replica(ReplicaConfig(n_coronal=12, n_sagittal=0, real_dir="/nonexistent"))
    pool = ConversionPool(workers=2, recycle=3)

    async def one(eid: int):
        job = ConvertJob(eid, rep.zip_for(eid), str(tmp_path), (Target("energy", f"{eid}.mnc"),),
                         ConvertSettings("RAS", "MICe", 1.0, "float"))
        return await asyncio.wait_for(await pool.submit(job), 120)

    try:
        first = set(await asyncio.to_thread(pool.pids))
        results = await asyncio.gather(*(one(r["experiment_id"]) for r in rep.rows))
        last = set(await asyncio.to_thread(pool.pids))
    finally:
        await pool.shutdown()
    assert first.isdisjoint(last) and len(last) == 2
    for r in results:
        data, _ = read_minc(Path(r.outputs[0][1].path))
        np.testing.assert_array_equal(data.astype(np.float32), notebook_ras(rep.raw_grid(r.experiment_id)))


def test_workers_see_a_killed_run_as_gone_even_before_it_is_reaped():
    """After `kill -9` of a run, its conversion workers must leave (issue 10: within 1 s); a
    killed process its parent has not reaped yet is a zombie that kill(pid, 0) still reaches."""
    import subprocess
    import time

    from ambasync.workers import _alive

    child = subprocess.Popen(["sleep", "30"])
    assert _alive(child.pid)
    child.kill()
    deadline = time.monotonic() + 5
    while _alive(child.pid) and time.monotonic() < deadline:  # the kernel makes it a zombie
        time.sleep(0.01)
    assert not _alive(child.pid)  # still unreaped here: nobody called wait() yet
    child.wait()
