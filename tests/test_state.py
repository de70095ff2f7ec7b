"""The state, on its own: a lab would notice a mirror that claims files it does not have, loses
its failures between nights, or forgets which settings made a file."""

import sqlite3

import pytest

from ambasync.mirror.record import Output, Status
from ambasync.mirror.state import State

CATALOG = {"experiment_id": 1, "gene": "Avp"}


def test_done_records_files_and_settings_in_one_transaction_and_reads_back_typed(tmp_path):
    state = State(tmp_path / "state.sqlite")
    run = state.start_run()
    state.seen(1, "Avp", "coronal", CATALOG, run)
    state.mark_done(1, [Output("energy", "coronal/Avp_1.mnc", "f" * 64, 123)], "RAS/MICe/x1/ushort", 2,
                    "a" * 64, 999, "Tue, 01 Oct 2024 10:00:00 GMT", '"etag"')
    rec = state.get(1)
    assert rec.status is Status.DONE and rec.attempts == 2 and rec.settings == "RAS/MICe/x1/ushort"
    assert [(t.volume, t.path) for t in rec.targets] == [("energy", "coronal/Avp_1.mnc")]
    state.close()
    db = sqlite3.connect(tmp_path / "state.sqlite")  # what other tools read: the plain strings
    assert db.execute("SELECT status, zip_size, etag FROM experiments").fetchall() == [("done", 999, '"etag"')]


def test_a_failure_counts_once_per_run_and_clears_the_files_and_a_later_success_resets_it(tmp_path):
    state = State(tmp_path / "state.sqlite")
    for _ in range(2):
        run = state.start_run()
        state.seen(1, "Avp", "coronal", CATALOG, run)
        state.mark_failed(1, "HTTP 503", True, 3, run)
        state.mark_failed(1, "HTTP 503", True, 3, run)  # twice in one run: one failed run
    rec = state.get(1)
    assert rec.status is Status.FAILED and rec.failed_runs == 2 and rec.transient and rec.outputs == []
    assert state.ids_with_status(Status.FAILED) == [1]
    state.mark_done(1, [Output("energy", "p", "f" * 64, 1)], "k", 1, None, None, None, None)
    assert state.get(1).failed_runs == 0 and state.get(1).status is Status.DONE
    state.close()


def test_experiments_the_catalogue_no_longer_lists_are_found_and_forgotten(tmp_path):
    state = State(tmp_path / "state.sqlite")
    first = state.start_run()
    for eid in (1, 2):
        state.seen(eid, "Avp", "coronal", {**CATALOG, "experiment_id": eid}, first)
    second = state.start_run()
    state.seen(1, "Avp", "coronal", CATALOG, second)
    assert [r.experiment_id for r in state.vanished(second, ("coronal",))] == [2]
    assert state.vanished(second, ("sagittal",)) == []
    state.forget(2)
    assert state.get(2) is None
    rows = list(state.manifest_rows())
    assert [(r["experiment_id"], r["status"], r["gene"]) for r in rows] == [(1, "pending", "Avp")]
    state.close()


def test_a_read_only_state_reads_but_cannot_write(tmp_path):
    State(tmp_path / "state.sqlite").close()
    ro = State(tmp_path / "state.sqlite", readonly=True)
    try:
        assert ro.get(1) is None
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            ro.start_run()
    finally:
        ro.close()


def test_a_state_from_before_nifti_is_migrated_and_keeps_every_file_record(tmp_path):
    """An existing mirror upgraded to this version must not re-download the atlas: its state,
    keyed by (experiment, volume), becomes keyed by file, rows intact, and is not 'damaged'."""
    from ambasync.mirror.health import Health, check_state
    from ambasync.mirror.state import SCHEMA

    path = tmp_path / "state.sqlite"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA.replace("PRIMARY KEY (experiment_id, path)", "PRIMARY KEY (experiment_id, volume)"))
    old.execute("INSERT INTO experiments (experiment_id, gene, plane, catalog, status, first_seen, updated) "
                "VALUES (1, 'Avp', 'coronal', '{}', 'done', 0, 0)")
    old.execute("INSERT INTO outputs VALUES (1, 'energy', 'coronal/Avp_1.mnc', ?, 123)", ("f" * 64,))
    old.commit()
    old.close()
    state = State(path)
    state.mark_done(1, [Output("energy", "coronal/Avp_1.mnc", "f" * 64, 123),
                        Output("energy", "coronal/Avp_1.nii.gz", "e" * 64, 99)], "RAS/MICe/x1/float", 1,
                    None, None, None, None)
    assert [(t.path, t.format) for t in state.get(1).targets] == [("coronal/Avp_1.mnc", "minc"),
                                                                   ("coronal/Avp_1.nii.gz", "nifti")]
    state.close()
    assert check_state(path).health is Health.INTACT
