"""What a run does with each experiment, decided without a server: a lab would notice a night
that downloads the atlas again, never retries, or retries for ever."""

from pathlib import Path

import pytest

from ambasync.mirror.catalog import Row
from ambasync.config import DEFAULT_CONFIG_TEXT, load_config
from ambasync.mirror.decide import Action, Policy, Verdict, decide
from ambasync.mirror.selection import Selection, Take
from ambasync.settings import ConvertSettings
from ambasync.mirror.record import Output, Record, Status
from ambasync.target import Target

SETTINGS = "RAS/MICe/x1/ushort"
TARGETS = (Target("energy", "coronal/Nrp1_74272479.mnc"),)


def record(tmp_path: Path, status: Status = Status.DONE, *, settings: str | None = SETTINGS, size: int = 5,
           transient: bool = False, failed_runs: int = 0, zip_sha256: str | None = None,
           content: bytes = b"hello") -> Record:
    """A record of one file on disk (written here, so its size and sha256 are real)."""
    import hashlib

    path = tmp_path / TARGETS[0].path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    outputs = [Output("energy", TARGETS[0].path, hashlib.sha256(b"hello").hexdigest(), size)]
    return Record(74272479, "Nrp1", "coronal", status, 1, failed_runs, None, transient, settings, zip_sha256,
                  outputs if status is Status.DONE else [])


def policy(tmp_path: Path, **kw) -> Policy:
    return Policy(out=tmp_path, zips=kw.pop("zips", None), quarantine_after=3, **kw)


def test_a_new_experiment_is_fetched_and_force_fetches_even_a_good_one(tmp_path):
    assert decide(None, TARGETS, SETTINGS, policy(tmp_path)) == Verdict(Action.FETCH)
    assert decide(record(tmp_path), TARGETS, SETTINGS, policy(tmp_path, force=True)).action is Action.FETCH


def test_a_done_experiment_with_its_files_whole_is_skipped(tmp_path):
    assert decide(record(tmp_path), TARGETS, SETTINGS, policy(tmp_path)) == Verdict(Action.SKIP)


def test_a_missing_or_resized_file_is_fetched_again(tmp_path):
    rec = record(tmp_path)
    (tmp_path / TARGETS[0].path).unlink()
    assert decide(rec, TARGETS, SETTINGS, policy(tmp_path)).action is Action.FETCH
    assert decide(record(tmp_path, size=6), TARGETS, SETTINGS, policy(tmp_path)).action is Action.FETCH


def test_an_altered_file_of_the_same_size_is_caught_only_with_verify(tmp_path):
    rec = record(tmp_path, content=b"HELLO")  # same size, other bytes
    assert decide(rec, TARGETS, SETTINGS, policy(tmp_path)).action is Action.SKIP
    assert decide(rec, TARGETS, SETTINGS, policy(tmp_path, verify=True)).action is Action.FETCH


def test_new_settings_or_names_reconvert_from_the_kept_zip_and_download_without_it(tmp_path):
    zips = tmp_path / "zips"
    sha = "ab" + "0" * 62
    rec = record(tmp_path, zip_sha256=sha)
    float_settings = "RAS/MICe/x1/float"
    assert decide(rec, TARGETS, float_settings, policy(tmp_path, zips=zips)).action is Action.FETCH  # not kept
    (zips / "ab").mkdir(parents=True)
    (zips / "ab" / f"{sha}.zip").write_bytes(b"zip")
    verdict = decide(rec, TARGETS, float_settings, policy(tmp_path, zips=zips))
    assert verdict == Verdict(Action.RECONVERT, zips / "ab" / f"{sha}.zip")
    renamed = (Target("energy", "coronal/Nrp1-renamed_74272479.mnc"),)
    assert decide(rec, renamed, SETTINGS, policy(tmp_path, zips=zips)).action is Action.RECONVERT
    assert decide(rec, renamed, SETTINGS, policy(tmp_path)).action is Action.FETCH  # keep_zips off


@pytest.mark.parametrize("transient, failed_runs, expected", [
    (True, 1, Action.FETCH),  # a 503 last night: try again
    (True, 3, Action.QUARANTINE),  # failed in quarantine_after runs
    (False, 1, Action.QUARANTINE),  # a 404 or a broken zip: retrying cannot help
])
def test_failures_are_retried_next_night_until_quarantined(tmp_path, transient, failed_runs, expected):
    rec = record(tmp_path, Status.FAILED, settings=None, transient=transient, failed_runs=failed_runs)
    assert decide(rec, TARGETS, SETTINGS, policy(tmp_path)).action is expected
    assert decide(rec, TARGETS, SETTINGS, policy(tmp_path, retry_failed=True)).action is Action.FETCH


def test_pending_and_invalid_experiments_are_fetched(tmp_path):
    for status in (Status.PENDING, Status.INVALID):
        assert decide(record(tmp_path, status, settings=None), TARGETS, SETTINGS, policy(tmp_path)).action is Action.FETCH


def test_settings_keys_keep_the_format_existing_state_files_hold():
    s = ConvertSettings("RAS", "MICe", 1.0, "ushort")
    assert s.key() == "RAS/MICe/x1/ushort"
    assert ConvertSettings("PIR", "CCFv3", 2.5, "float").key() == "PIR/CCFv3/x2.5/float"
    for key in ("RAS/MICe/x1/ushort", "PIR/CCFv3/x2.5/float", "RAS/CCFv3/x10/float"):
        assert ConvertSettings.parse(key).key() == key
    assert ConvertSettings.parse("RAS/MICe/x1/ushort") == s
    # the config's [convert] section gives the same key (the one definition: ConvertSettings.key)
    cfg = load_config(DEFAULT_CONFIG_TEXT, {("convert", "dtype"): "float", ("convert", "expansion"): 2.5,
                                            ("convert", "orientation"): "PIR", ("convert", "space"): "CCFv3"},
                      environ={})
    assert ConvertSettings.from_config(cfg).key() == "PIR/CCFv3/x2.5/float"


def _row(eid: int, gene: str = "Avp") -> Row:
    return Row(eid, gene, "coronal", {})


def test_selection_takes_each_id_once_honours_filters_shards_and_stops_at_the_limit():
    sel = Selection(limit=2)
    assert [sel.take(_row(i)) for i in (1, 1, 2, 3)] == [Take.TAKE, Take.REPEAT, Take.TAKE, Take.LIMIT]
    assert not sel.complete()  # cut by the limit: experiments beyond it are not "vanished"
    shard = Selection(shard=(1, 3))
    assert [i for i in range(9) if shard.take(_row(i)) is Take.TAKE] == [1, 4, 7]
    assert shard.complete() and not shard.filtered
    genes = Selection(genes=frozenset({"Nrp1"}))
    assert [genes.take(_row(1, "Nrp1")), genes.take(_row(2, "Avp"))] == [Take.TAKE, Take.UNWANTED]
    assert genes.filtered


def test_a_done_experiment_the_cube_lacks_is_converted_again_from_its_kept_zip_or_fetched(tmp_path):
    """Asking an existing MINC mirror for the cube must fill the cube, from kept zips where
    they are, and must not leave it empty because the MINC files are up to date."""
    zips = tmp_path / "zips"
    kept = zips / "ab" / ("ab" + "0" * 62 + ".zip")
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"zip")
    rec = record(tmp_path, zip_sha256="ab" + "0" * 62)
    assert decide(rec, TARGETS, SETTINGS, policy(tmp_path, zips=zips), held=False) == Verdict(Action.RECONVERT, kept)
    assert decide(rec, TARGETS, SETTINGS, policy(tmp_path), held=False).action is Action.FETCH
    assert decide(rec, TARGETS, SETTINGS, policy(tmp_path, zips=zips), held=True).action is Action.SKIP
