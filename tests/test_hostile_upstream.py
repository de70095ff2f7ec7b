"""A hostile upstream (issue 10, items 8 to 10): redirects that never end, catalogue rows
without a gene, one experiment listed with two genes. What a lab would notice if these
broke: a bad grid asked for hundreds of times every night with an empty reason, real
experiments missing from the mirror, a gene silently dropped, or a file renamed and
downloaded again night after night. Real runs against the replica; files read back."""

import numpy as np

from ambasync.mirror.fetch import MAX_REDIRECTS
from ambasync.replica import ReplicaConfig, serve
from helpers import manifest, mirror, notebook_ras, quantisation_step, read_minc, sha256

import pytest

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out

FIRST = 100000  # the replica's coronal ids: 100000 + 13 * i


async def test_a_grid_that_redirects_in_a_loop_or_to_ftp_fails_once_for_good_naming_the_url(tmp_path):
    loop_id, ftp_id = FIRST + 13, FIRST + 26
    config = ReplicaConfig(n_coronal=4, n_sagittal=0, real_dir="/nonexistent",
                           bad={loop_id: "redirect_loop", ftp_id: "redirect_ftp"})
    async with serve(config) as (rep, url):
        s = await mirror(url, tmp_path, download__attempts=4)
        loop_requests = rep.stats.grid_requests[loop_id]
        assert loop_requests == MAX_REDIRECTS  # one attempt, its hops bounded: not retried
        assert rep.stats.grid_requests[ftp_id] == 1
        again = await mirror(url, tmp_path)  # the next night: quarantined, not asked again
        assert rep.stats.grid_requests[loop_id] == loop_requests and rep.stats.grid_requests[ftp_id] == 1
    assert s.exit_code == 1 and s.failed == 2 and s.done == 2
    assert again.quarantined == 2 and again.skipped == 2
    failures = {f["experiment_id"]: f for f in s.failures}
    assert failures[loop_id]["kind"] == failures[ftp_id]["kind"] == "permanent"
    m = manifest(tmp_path).set_index("experiment_id")
    assert m.loc[loop_id, "status"] == "failed" and m.loc[ftp_id, "status"] == "failed"
    assert f"{url}/grid_data/download/{loop_id} redirects more than {MAX_REDIRECTS} times" in m.loc[loop_id, "error"]
    assert "redirect loop" in m.loc[loop_id, "error"]
    assert f"{url}/grid_data/download/{ftp_id} redirects to ftp://127.0.0.1/" in m.loc[ftp_id, "error"]
    assert "not an HTTP(S) URL" in m.loc[ftp_id, "error"]
    assert not list((tmp_path / "coronal").glob(f"*_{loop_id}.mnc")) + list((tmp_path / "coronal").glob(f"*_{ftp_id}.mnc"))


def assert_voxels(path, raw) -> None:
    """The file holds the served grid, reoriented as the notebook does, within ushort's step."""
    expected = notebook_ras(raw)
    data, _ = read_minc(path)
    assert np.abs(data - expected).max() <= quantisation_step(expected), path


async def test_rows_with_an_empty_blank_or_null_gene_are_mirrored_under_a_placeholder_name(tmp_path):
    """Only a row without a usable id is invalid; today a row without a gene is dropped as invalid."""
    no_gene = {900001: "", 900002: None, 900003: "   "}
    extra = [{"experiment_id": eid, "gene": gene} for eid, gene in no_gene.items()] + [
        {"experiment_id": 0, "gene": "Avp"}]
    config = ReplicaConfig(n_coronal=2, n_sagittal=0, real_dir="/nonexistent", extra_rows=extra)
    async with serve(config) as (rep, url):
        s = await mirror(url, tmp_path)
        raws = {eid: rep.raw_grid(eid) for eid in no_gene}
        requests = sum(rep.stats.grid_requests.values())
        again = await mirror(url, tmp_path)
        assert sum(rep.stats.grid_requests.values()) == requests  # the same names the next night
    assert s.exit_code == 0 and s.done == 5 and s.invalid == 1
    assert again.exit_code == 0 and again.skipped == 5 and again.done == 0
    m = manifest(tmp_path).set_index("experiment_id")
    for eid, raw in raws.items():
        rel = f"coronal/unknown-gene_{eid}.mnc"
        assert m.loc[eid, "status"] == "done" and m.loc[eid, "path"] == rel
        assert m.isna().loc[eid, "gene"] and m.isna().loc[eid, "genes"]  # the manifest's gene stays empty
        assert sha256(tmp_path / rel) == m.loc[eid, "sha256"]
        assert_voxels(tmp_path / rel, raw)
    assert m.loc[0, "status"] == "invalid" and "no valid experiment_id" in m.loc[0, "error"]


async def test_an_experiment_listed_with_two_genes_is_mirrored_once_keeps_both_and_one_name_every_night(
        tmp_path, caplog):
    """Today the second gene is dropped without a word, and which one wins follows upstream's order."""
    eid = 900010

    def replica(gene: str, other: str) -> ReplicaConfig:
        return ReplicaConfig(n_coronal=3, n_sagittal=0, real_dir="/nonexistent",
                             extra_rows=[{"experiment_id": eid, "gene": gene, "gene_name": f"{gene} gene"}], duplicate_genes={eid: (other,)})

    caplog.set_level("WARNING", logger="ambasync")
    async with serve(replica("Zeb2", "Avp")) as (rep, url):  # pages of 2: the two rows on two pages
        s = await mirror(url, tmp_path, source__page_size=2)
        assert rep.stats.grid_requests[eid] == 1
        raw = rep.raw_grid(eid)
    assert s.exit_code == 0 and s.done == 4
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and str(eid) in r.getMessage()]
    assert len(warned) == 1 and "Avp" in warned[0] and "Zeb2" in warned[0]
    m = manifest(tmp_path)
    rows = m[m["experiment_id"] == eid]
    assert len(rows) == 1 and rows["gene"].iloc[0] == "Avp" and rows["genes"].iloc[0] == "Avp;Zeb2"
    assert rows["path"].iloc[0] == f"coronal/Avp_{eid}.mnc"
    assert [p.name for p in (tmp_path / "coronal").glob(f"*_{eid}.mnc")] == [f"Avp_{eid}.mnc"]
    assert_voxels(tmp_path / "coronal" / f"Avp_{eid}.mnc", raw)
    before = sha256(tmp_path / "coronal" / f"Avp_{eid}.mnc")

    async with serve(replica("Avp", "Zeb2")) as (rep, url):  # upstream sends them the other way round
        again = await mirror(url, tmp_path, source__page_size=2)
        assert rep.stats.grid_requests[eid] == 0  # not renamed, not fetched again
        only_zeb2 = await mirror(url, tmp_path / "zeb2", source__genes=["Zeb2"])  # either gene selects it
    assert again.skipped == 4 and again.done == 0
    assert sha256(tmp_path / "coronal" / f"Avp_{eid}.mnc") == before
    assert manifest(tmp_path).equals(m)
    assert only_zeb2.done == 1 and (tmp_path / "zeb2" / "coronal" / f"Avp_{eid}.mnc").is_file()
