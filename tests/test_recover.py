"""A damaged state.sqlite (truncated, random bytes, another version's schema): what a user
would see if this broke is a traceback from every command, or, after a rebuild, the whole
mirror downloaded again, or a file trusted that is not the one the manifest recorded."""

import hashlib
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from ambasync.errors import ConfigError
from ambasync.settings import ConvertSettings
from ambasync.mirror.health import Health, check_state, refuse_damaged, set_aside_state
from ambasync.mirror.rebuild import recover_state
from ambasync.mirror.rebuild import rebuild_state
from ambasync.replica import ReplicaConfig, serve
from ambasync.mirror.state import Output, State
from helpers import ambasync_cmd, mirror, mirror_config

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out

SETTINGS = "RAS/MICe/x1/ushort"  # the shipped defaults' settings key


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_on_disk(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): digest(p) for plane in ("coronal", "sagittal") if (out / plane).is_dir()
            for p in sorted((out / plane).iterdir()) if p.suffix == ".mnc"}


def records(state: Path) -> dict[str, tuple[str, str]]:
    """path -> (status, sha256) as the state records it, read with plain sqlite3."""
    db = sqlite3.connect(state)
    try:
        return {path: (status, sha) for path, status, sha in db.execute(
            "SELECT o.path, e.status, o.sha256 FROM outputs o JOIN experiments e USING (experiment_id)")}
    finally:
        db.close()


def grid_requests(replica) -> int:
    return sum(replica.stats.grid_requests.values())


def small_state(path: Path) -> None:
    """An intact state written through State's public methods."""
    state = State(path)
    state.seen(100000, "Gene0", "coronal", {"experiment_id": 100000, "gene": "Gene0"}, 1)
    state.mark_done(100000, [Output("energy", "coronal/Gene0_100000.mnc", "ab" * 32, 10)], SETTINGS, 1,
                    None, None, None, None)
    state.close()


def test_check_state_tells_intact_missing_and_damaged_apart_without_touching_the_file(tmp_path):
    state = tmp_path / "state.sqlite"
    assert check_state(state).health is Health.MISSING
    small_state(state)
    before = (state.read_bytes(), state.stat().st_mtime_ns)
    assert check_state(state).health is Health.INTACT
    assert (state.read_bytes(), state.stat().st_mtime_ns) == before

    good = state.read_bytes()
    cases = {
        "truncated": good[:100],
        "random": os.urandom(len(good)),
        "empty": b"",
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.sqlite"
        path.write_bytes(data)
        check = check_state(path)
        assert check.health is Health.DAMAGED and check.reason, name
        assert path.read_bytes() == data, name
        if name == "random":
            assert "file is not a database" in check.reason

    other = tmp_path / "other-version.sqlite"
    db = sqlite3.connect(other)
    db.executescript("CREATE TABLE experiments (id INTEGER PRIMARY KEY, name TEXT); CREATE TABLE runs (n INTEGER);")
    db.close()
    check = check_state(other)
    assert check.health is Health.DAMAGED and "schema from another version" in check.reason
    assert "no table outputs" in check.reason and "table experiments lacks experiment_id" in check.reason

    newer = tmp_path / "newer.sqlite"
    small_state(newer)
    db = sqlite3.connect(newer)
    db.execute("ALTER TABLE outputs ADD COLUMN format TEXT")
    db.close()
    assert "table outputs has unknown format" in check_state(newer).reason


def test_set_aside_renames_the_state_with_its_wal_and_shm_and_never_overwrites(tmp_path):
    state = tmp_path / "state.sqlite"
    when = 1_790_000_000.0
    names = []
    for round_ in range(2):
        for suffix, data in (("", b"db"), ("-wal", b"wal"), ("-shm", b"shm")):
            Path(f"{state}{suffix}").write_bytes(data + bytes([round_]))
        names.append(set_aside_state(state, now=when))
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(when))
    assert names[0].name == f"state.sqlite.damaged-{stamp}" and names[1].name == f"state.sqlite.damaged-{stamp}-2"
    for round_, dest in enumerate(names):
        assert dest.read_bytes() == b"db" + bytes([round_])
        assert Path(f"{dest}-wal").read_bytes() == b"wal" + bytes([round_])
        assert Path(f"{dest}-shm").read_bytes() == b"shm" + bytes([round_])
    assert not any(Path(f"{state}{s}").exists() for s in ("", "-wal", "-shm"))


def test_rebuild_refuses_to_replace_a_state_that_was_not_set_aside(tmp_path):
    small_state(tmp_path / "state.sqlite")
    with pytest.raises(FileExistsError, match="set it aside"):
        rebuild_state(tmp_path / "state.sqlite", tmp_path / "manifest.csv", tmp_path, SETTINGS)


async def test_a_truncated_state_is_rebuilt_and_no_intact_file_is_fetched_again(tmp_path):
    out = tmp_path
    async with serve(ReplicaConfig(n_coronal=10, n_sagittal=4, real_dir="/nonexistent")) as (rep, url):
        first = await mirror(url, out, source__plane="all")
        assert first.exit_code == 0
        on_disk = files_on_disk(out)
        assert len(on_disk) == 14
        state = out / ".ambasync" / "state.sqlite"
        with open(state, "r+b") as fh:
            fh.truncate(100)
        assert check_state(state).health is Health.DAMAGED

        # a different dtype: no file is trusted, since the manifest cannot say which settings made it
        other = rebuild_state(tmp_path / "other.sqlite", out / "manifest.csv", out, "RAS/MICe/x1/float")
        assert other.trusted == () and len(other.differed) == 14
        assert all("stores ushort, the settings say float" in r for r in other.reasons.values())

        settings = ConvertSettings.from_config(mirror_config(url, out, source__plane="all")).key()
        recovery = recover_state(state, out / "manifest.csv", out, settings)
        assert recovery is not None and recovery.set_aside.stat().st_size == 100
        rebuilt = recovery.rebuild
        assert sorted(rebuilt.trusted) == sorted(on_disk)
        assert rebuilt.differed == () and rebuilt.missing == () and rebuilt.untracked == ()
        assert "14 files trusted" in recovery.text() and "\n" not in recovery.text()
        assert check_state(state).health is Health.INTACT
        assert records(state) == {path: ("done", sha) for path, sha in on_disk.items()}

        requests = grid_requests(rep)
        again = await mirror(url, out, source__plane="all")
        assert grid_requests(rep) == requests, "an intact file was fetched again"
        assert again.done == 0 and again.skipped == 14 and again.exit_code == 0
        assert files_on_disk(out) == on_disk


async def test_files_that_differ_or_are_gone_are_reported_and_only_they_are_fetched_again(tmp_path):
    out = tmp_path
    broken_id = 100000 + 13 * 2
    async with serve(ReplicaConfig(n_coronal=8, n_sagittal=0, real_dir="/nonexistent",
                                   bad={broken_id: "404"})) as (rep, url):
        await mirror(url, out)
        on_disk = files_on_disk(out)
        altered, deleted = sorted(on_disk)[:2]
        with open(out / altered, "r+b") as fh:
            fh.seek(2000)
            fh.write(b"\xff\xfe\xfd\xfc")
        (out / deleted).unlink()
        (out / "coronal" / "Stray_1.mnc").write_bytes(b"not in the manifest")
        state = out / ".ambasync" / "state.sqlite"
        state.write_bytes(os.urandom(8192))

        recovery = recover_state(state, out / "manifest.csv", out, ConvertSettings.from_config(mirror_config(url, out)).key())
        assert "file is not a database" in recovery.check.reason
        rebuilt = recovery.rebuild
        assert rebuilt.differed == (altered,) and "sha256 differs" in rebuilt.reasons[altered]
        assert rebuilt.missing == (deleted,)
        assert rebuilt.untracked == ("coronal/Stray_1.mnc",)
        assert sorted(rebuilt.trusted) == sorted(set(on_disk) - {altered, deleted})
        assert rebuilt.failed == 1
        db = sqlite3.connect(state)
        status, error, transient = db.execute(
            "SELECT status, error, transient FROM experiments WHERE experiment_id = ?", (broken_id,)).fetchone()
        db.close()
        assert status == "failed" and "404" in error and transient == 1  # retried by the next run

        before = dict(rep.stats.grid_requests)
        await mirror(url, out)
        fetched = {eid for eid, n in rep.stats.grid_requests.items() if n > before.get(eid, 0)}
        ids = {int(Path(p).stem.rsplit("_", 1)[1]) for p in (altered, deleted)}
        assert fetched == ids | {broken_id}
        now = files_on_disk(out)
        assert {p: now[p] for p in rebuilt.trusted} == {p: on_disk[p] for p in rebuilt.trusted}  # untouched
        assert records(state) == {p: ("done", now[p]) for p in on_disk}  # refetched ones recorded anew


def test_a_rebuild_without_a_manifest_gives_an_empty_state_and_says_so(tmp_path):
    rebuilt = rebuild_state(tmp_path / ".ambasync" / "state.sqlite", tmp_path / "manifest.csv", tmp_path, SETTINGS)
    assert not rebuilt.manifest_found and "every experiment is fetched again" in rebuilt.text()
    assert check_state(tmp_path / ".ambasync" / "state.sqlite").health is Health.INTACT
    assert records(tmp_path / ".ambasync" / "state.sqlite") == {}


def test_manifest_rows_pointing_outside_the_mirror_are_not_trusted(tmp_path):
    """A manifest edited by hand must not make a later run overwrite or delete files elsewhere."""
    outside = tmp_path / "precious.mnc"
    outside.write_bytes(b"precious")
    out = tmp_path / "mirror"
    out.mkdir()
    header = "experiment_id,section_thickness,specimen_id,plane,gene,gene_name,chromosome_id,entrez_id," \
             "genomic_reference_update_id,homologene_id,organism_id,volume,status,path,sha256,error\n"
    (out / "manifest.csv").write_text(
        header + f"5,25,1,coronal,A,a,1,,1,1,2,energy,done,../precious.mnc,{digest(outside)},\n"
        + f"6,25,1,coronal,B,b,1,,1,1,2,energy,done,/etc/hostname,{'0' * 64},\n"
        + "x,25,1,coronal,C,c,1,,1,1,2,energy,done,coronal/C_7.mnc,,\n")
    rebuilt = rebuild_state(out / ".ambasync" / "state.sqlite", out / "manifest.csv", out, SETTINGS)
    assert rebuilt.unusable_rows == 3 and rebuilt.trusted == () and rebuilt.experiments == 0
    assert outside.read_bytes() == b"precious"


def test_status_and_verify_get_one_line_about_a_damaged_state_and_what_the_next_run_does(tmp_path):
    state = tmp_path / "state.sqlite"
    assert refuse_damaged(state, tmp_path / "manifest.csv").health is Health.MISSING
    small_state(state)
    assert refuse_damaged(state, tmp_path / "manifest.csv").health is Health.INTACT
    state.write_bytes(b"SQLite format 3\x00" + os.urandom(4000))
    with pytest.raises(ConfigError) as exc:
        refuse_damaged(state, tmp_path / "manifest-shard0of2.csv")
    message = str(exc.value)
    assert "\n" not in message and f"state {state} is damaged" in message
    assert "rebuilds it from manifest-shard0of2.csv" in message


def test_every_command_survives_a_damaged_state_without_a_traceback(tmp_path):
    """Today run, status and verify crash with exit 1 and a traceback."""
    meta = tmp_path / ".ambasync"
    meta.mkdir()
    (meta / "state.sqlite").write_bytes(os.urandom(8192))
    for command, code in (("status", 2), ("verify", 2)):
        proc = subprocess.run(ambasync_cmd(command, "--out", str(tmp_path)), capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "is damaged" in proc.stderr
    proc = subprocess.run(ambasync_cmd("run", "--out", str(tmp_path), "--base-url", "http://127.0.0.1:9"),
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "AMBASYNC_DOWNLOAD_ATTEMPTS": "1"})
    assert "Traceback" not in proc.stderr and proc.returncode == 4, proc.stderr  # got as far as the catalogue
    assert len(list(meta.glob("state.sqlite.damaged-*"))) == 1
    assert check_state(meta / "state.sqlite").health is Health.INTACT


async def test_a_run_on_a_truncated_state_rebuilds_it_fetches_nothing_and_reports_what_it_did(tmp_path):
    """Issue 10 item 6: a complete mirror, its state cut to 100 bytes, then a run: exit 0 and 0
    grid requests (today the run crashes with a traceback, and deleting the state refetches all)."""
    import json

    async with serve(ReplicaConfig(n_coronal=6, n_sagittal=0, real_dir="/nonexistent")) as (rep, url):
        assert (await mirror(url, tmp_path)).exit_code == 0
        on_disk = files_on_disk(tmp_path)
        state = tmp_path / ".ambasync" / "state.sqlite"
        with open(state, "r+b") as fh:
            fh.truncate(100)
        requests = grid_requests(rep)
        again = await mirror(url, tmp_path)
        assert grid_requests(rep) == requests, "an intact file was fetched again"
    assert again.exit_code == 0 and again.skipped == 6 and again.done == 0
    assert files_on_disk(tmp_path) == on_disk
    aside = [p for p in state.parent.glob("state.sqlite.damaged-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].stat().st_size == 100  # kept, never deleted
    report = json.loads(max((tmp_path / "reports").glob("run-*.json")).read_text())
    recovery = report["state_recovery"]
    assert recovery["trusted"] == 6 and recovery["set_aside"] == str(aside[0]) and recovery["missing"] == 0
    assert records(state) == {path: ("done", sha) for path, sha in on_disk.items()}
