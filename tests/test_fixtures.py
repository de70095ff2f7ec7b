"""A fresh clone has everything its tests need: the real data lives in tests/fixtures,
unchanged, and nothing reads the folder beside the repository that only a developer
machine has. If this breaks, `git clone … && make test` fails for every new user."""

from __future__ import annotations

import hashlib
import re
import subprocess

from helpers import FIXTURES, REPO

# One row per file of tests/fixtures/README.md: a silently replaced fixture would make the
# parity tests compare against the wrong data.
CHECKSUMS = {
    "allen-grids/Nrp1_P56_coronal_74272479_200um.zip": "79ee124750a4f74f73d5aea53121f70feb6b6d23c639b36163078b42d1960dc5",
    "allen-grids/Pdyn_P56_coronal_71717084_200um.zip": "36564d3205b9b787b7bcf42a6947f878e27e227437ee858c428073cc0a9c2d08",
    "allen-grids/P56_Mouse_gridAnnotation.zip": "e7c7c625c80f6059f8683af1ac99e39fbf8b1b4ed2713385999161daa47b220c",
    "average_template_200um_mask.mnc": "37bc9ab0e03798266e6dd7ec659d7db71c85e00d4d5cc3f997856f203fe749cb",
    "coronal_200um_coverage_bin0.8.mnc": "78a2cb248d0fda37497670481f0afee4605bbb407dca027d66c9739bc10a484d",
    "mhts/sagittal_200um_coverage_bin0.8.mnc": "fa33fe89b85e90c253e11720645f74ddbeb6720c6e5b26e3ad29a60fae9209b9",
    "mhts/DSURQE_CCFv3_labels_200um.mnc": "82a5667e768dc4445303b6433cf4d0062d311c7dd88e34b18eae52689df2da51",
    "mhts/DSURQE_CCFv3_mask_200um.mnc": "ac71a57b0651bebdd945f949af7160131b962ffbfa82b6ad4abcc0a8fc520f55",
    "mhts/DSURQE_40micron_R_mapping_long.csv": "ce39e56ed4bc84a5ea8c3211b3abec56626e67596d08a5d646c6ab1bb3cdde40",
    "mhts/MouseHumanGeneHomologs.csv": "b99ae7bedc903106fec08a76ff4318e4ec897b26152d2fe17be715b7ea84a02e",
}


def test_every_fixture_is_committed_unchanged_and_documented():
    readme = (FIXTURES / "README.md").read_text(encoding="utf-8")
    tracked = set(subprocess.run(["git", "ls-files", "tests/fixtures"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.split())
    for name, digest in CHECKSUMS.items():
        path = FIXTURES / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{name} changed"
        assert f"tests/fixtures/{name}" in tracked, f"{name} is not committed: a clone would lack it"
        assert name in readme and digest in readme, f"{name} has no provenance row in tests/fixtures/README.md"
    assert "GPL-3.0" in readme and "terms of use" in readme and "Lein" in readme


def test_no_code_or_test_reads_outside_the_repository():
    """Nothing names the developer-only folder beside the clone (its name is built here so that
    this file does not match itself)."""
    sibling = re.compile(r"\.\.[/\\]" + "shared" + r"|parents\[\d\]\s*/\s*[\"']" + "shared")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        path = REPO / name
        if path.suffix not in (".py", ".sh", ".toml", ".cfg", ".yaml", ".yml") and path.name not in (
                "Makefile", "Dockerfile", "run"):
            continue
        if path.is_file() and sibling.search(path.read_text(encoding="utf-8", errors="replace")):
            offenders.append(name)
    assert offenders == []
