"""A hostile upstream (issue 10, items 8 to 10): redirects that never end, catalogue rows
without a gene, one experiment listed with two genes. What a lab would notice if these
broke: a bad grid asked for hundreds of times every night with an empty reason, real
experiments missing from the mirror, a gene silently dropped, or a file renamed and
downloaded again night after night. Real runs against the replica; files read back."""

import numpy as np

from ambasync.fetch import MAX_REDIRECTS
from ambasync.replica import ReplicaConfig, serve
from conftest import manifest, mirror, notebook_ras, quantisation_step, read_minc, sha256

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
