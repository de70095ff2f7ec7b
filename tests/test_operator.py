"""The operator's view: what a researcher or lab admin reads and runs. Real CLI in
subprocesses against the replica; outputs read back from disk."""

import json
import re
import subprocess

import numpy as np
import pytest

from ambasync.config import Config, load_config
from ambasync.replica import Replica, ReplicaConfig, serve
from helpers import ReplicaProcess, ambasync_cmd, manifest, mirror, notebook_ras, read_minc, sha256, state_rows

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out

FAST = ["--concurrency", "4", "--workers", "2"]


@pytest.fixture(scope="module")
def replica():
    rep = ReplicaProcess("--experiments", "12", "--sagittal", "6", "--latency-ms", "20")
    yield rep
    rep.close()


def run_cli(*args, env=None, timeout=120):
    return subprocess.run(ambasync_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env)


def test_progress_lines_when_not_a_terminal_and_a_report_that_matches_files_and_state(replica, tmp_path):
    import os

    env = {**os.environ, "AMBASYNC_PIPELINE_PROGRESS_INTERVAL": "0.2"}
    proc = run_cli("run", "--out", str(tmp_path), "--base-url", replica.url, "--plane", "all", "--concurrency", "2",
                   env=env)
    assert proc.returncode == 0, proc.stderr
    assert "progress: " in proc.stderr and "experiments/s" in proc.stderr
    assert "\r" not in proc.stderr  # no bar redraws in a log file
    reports = list((tmp_path / "reports").glob("run-*.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    files = list(tmp_path.glob("*/*.mnc"))
    assert report["done"] == len(files) == 20 and report["failed"] == 0  # 12 + 2 real coronal, 6 sagittal
    assert report["bytes_written"] == sum(f.stat().st_size for f in files)
    assert state_rows(tmp_path, "SELECT count(*) FROM experiments WHERE status = 'done'")[0][0] == 20
    assert len(list((tmp_path / "sagittal").glob("*.mnc"))) == 6


def test_status_and_verify_tell_the_truth_and_repair_restores(replica, tmp_path):
    assert run_cli("run", "--out", str(tmp_path), "--base-url", replica.url, *FAST).returncode == 0
    status = run_cli("status", "--out", str(tmp_path))
    assert status.returncode == 0 and re.search(r"coronal\s+done\s+14\n", status.stdout)
    assert run_cli("verify", "--out", str(tmp_path)).returncode == 0
    files = sorted((tmp_path / "coronal").glob("*.mnc"))
    files[0].unlink()
    data = bytearray(files[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    files[1].write_bytes(bytes(data))
    verify = run_cli("verify", "--out", str(tmp_path))
    assert verify.returncode == 1 and "2 experiments broken or missing" in verify.stdout
    assert "missing" in verify.stderr and "sha256 differs" in verify.stderr
    m = manifest(tmp_path).set_index("experiment_id")  # verify rewrote it: no "done" with the old sha256
    broken = {int(f.stem.rsplit("_", 1)[1]) for f in files[:2]}
    assert set(m.index[m["status"] == "pending"]) == broken and m.loc[list(broken), "sha256"].isna().all()
    assert "verify:" in m.loc[list(broken), "error"].iloc[0]
    status = run_cli("status", "--out", str(tmp_path))
    assert re.search(r"coronal\s+done\s+12\n", status.stdout) and re.search(r"coronal\s+pending\s+2\n", status.stdout)
    repair = run_cli("verify", "--out", str(tmp_path), "--repair", "--base-url", replica.url)
    assert repair.returncode == 0, repair.stderr  # every broken file fetched again: success
    assert "2 experiments fetched again, 0 failed" in repair.stdout
    assert files[0].is_file()
    assert run_cli("verify", "--out", str(tmp_path)).returncode == 0
    m = manifest(tmp_path)
    assert all(sha256(tmp_path / p) == d for p, d in zip(m["path"], m["sha256"]))


def test_shards_cover_every_experiment_exactly_once(replica, tmp_path):
    for k in range(3):
        proc = run_cli("run", "--out", str(tmp_path), "--base-url", replica.url, "--plane", "all",
                       "--shard", f"{k}/3", *FAST)
        assert proc.returncode == 0, proc.stderr
    ids = []
    for k in range(3):
        manifest_path = tmp_path / f"manifest-shard{k}of3.csv"
        assert manifest_path.is_file()
        import pandas as pd

        ids += list(pd.read_csv(manifest_path)["experiment_id"])
    catalogue = [r["experiment_id"] for r in Replica(ReplicaConfig(n_coronal=12, n_sagittal=6)).rows]
    assert sorted(ids) == sorted(catalogue) and len(ids) == len(set(ids))


def test_dry_run_writes_nothing_and_counts(replica, tmp_path):
    out = tmp_path / "mirror"
    proc = run_cli("run", "--out", str(out), "--base-url", replica.url, "--dry-run", "--plane", "all")
    assert proc.returncode == 0, proc.stderr
    assert "would fetch 20 experiments" in proc.stdout and "nothing written" in proc.stdout
    assert not out.exists()


async def test_options_change_the_output_as_documented(tmp_path):
    async with serve(ReplicaConfig(n_coronal=2, n_sagittal=0, real_dir="/nonexistent")) as (rep, url):
        eid = rep.rows[0]["experiment_id"]
        await mirror(url, tmp_path / "pir", convert__orientation="PIR", convert__dtype="float")
        data, geo = read_minc(next((tmp_path / "pir" / "coronal").glob(f"*_{eid}.mnc")))
        np.testing.assert_array_equal(data.astype(np.float32), rep.raw_grid(eid))  # PIR = the raw order
        assert geo["starts"] == pytest.approx((-5.7, -5.3, -5.3))  # -(5300, 5300, 5700) reversed, µm -> mm

        await mirror(url, tmp_path / "ccf", convert__space="CCFv3")
        _, geo = read_minc(next((tmp_path / "ccf" / "coronal").glob(f"*_{eid}.mnc")))
        assert geo["starts"] == pytest.approx((-8.0, -13.2, 0.0))
        assert geo["cosines"]["yspace"] == (-1, 0, 0) and geo["cosines"]["zspace"] == (0, -1, 0)

        await mirror(url, tmp_path / "vol", convert__volumes=["energy", "density"], convert__dtype="float")
        names = sorted(p.name for p in (tmp_path / "vol" / "coronal").glob(f"*_{eid}*.mnc"))
        assert names == [f"{rep.rows[0]['gene']}_{eid}.mnc", f"{rep.rows[0]['gene']}_{eid}_density.mnc"]
        density, _ = read_minc(tmp_path / "vol" / "coronal" / names[1])
        np.testing.assert_array_equal(density.astype(np.float32), notebook_ras(rep.raw_grid(eid, "density")))
        assert len(manifest(tmp_path / "vol")) == 4  # one row per file

        await mirror(url, tmp_path / "tpl", convert__name_template="{plane}-{experiment_id}.mnc")
        assert sorted(p.name for p in (tmp_path / "tpl" / "coronal").iterdir()) == sorted(
            f"coronal-{r['experiment_id']}.mnc" for r in rep.rows)


def test_json_logs_name_the_failed_experiment(tmp_path):
    rep = ReplicaProcess("--experiments", "3", "--sagittal", "0", "--fault-rate", "1.0")
    try:
        import os

        env = {**os.environ, "AMBASYNC_DOWNLOAD_ATTEMPTS": "1"}
        proc = run_cli("run", "--out", str(tmp_path), "--base-url", rep.url, "--log-format", "json", *FAST, env=env)
    finally:
        rep.close()
    assert proc.returncode == 1
    lines = [json.loads(ln) for ln in proc.stderr.splitlines() if ln.startswith("{")]
    failed = [ln for ln in lines if ln.get("experiment_id") and ln["level"] == "ERROR"]
    assert len(failed) == 5
    assert all(f["url"].endswith(f"/grid_data/download/{f['experiment_id']}") and f["reason"] for f in failed)


def test_demo_runs_offline(tmp_path):
    proc = run_cli("demo", "--out", str(tmp_path / "demo"), "--experiments", "10", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "demo" / "coronal").glob("*.mnc"))) == 12  # + the two real grids
    assert "MINC files in" in proc.stdout


def test_init_config_writes_the_commented_defaults(tmp_path):
    dest = tmp_path / "my.toml"
    assert run_cli("init-config", str(dest)).returncode == 0
    assert load_config(dest, environ={}) == Config() and dest.read_text().count("#") > 30
    assert run_cli("init-config", str(dest)).returncode == 2  # never overwrites silently
