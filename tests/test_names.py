"""Hostile gene acronyms from upstream: a name must never escape the output folder,
collide, hide, or crash the run (the notebook wrote `../../escape` two folders up)."""

import pytest

from ambasync.names import output_name, safe_gene

TEMPLATE = "{gene}_{experiment_id}.mnc"
HOSTILE = ["a/b", "../../escape", "..", "with space", "Gène-ü", "ctl\x00\x07\n", "x" * 300, "CON", "lpt1",
           "\\\\server\\share", ".hidden", "Nrp1"]


@pytest.mark.parametrize("gene", HOSTILE)
def test_names_stay_plain_visible_and_short(gene):
    name = output_name(TEMPLATE, gene, 12345, "coronal", "energy")
    assert "/" not in name and "\\" not in name and ".." not in name
    assert not name.startswith(".") and name.endswith("_12345.mnc")
    assert len(name.encode()) <= 255
    assert all(ch.isprintable() for ch in name)
    assert name.split("_")[0].split(".")[0].upper() not in {"CON", "PRN", "AUX", "NUL", "LPT1", "COM1"}


def test_readable_names_are_kept_and_unicode_survives():
    assert safe_gene("Nrp1") == "Nrp1"
    assert safe_gene("Gène-ü") == "Gène-ü"
    assert safe_gene("a/b") == "a_b"


def test_two_experiments_of_one_gene_and_colliding_sanitised_genes_stay_unique():
    names = {output_name(TEMPLATE, g, eid, "coronal", "energy")
             for g, eid in [("Avp", 1), ("Avp", 2), ("a/b", 3), ("a_b", 4), ("a?b", 5)]}
    assert len(names) == 5


def test_other_volumes_carry_their_name():
    assert output_name(TEMPLATE, "Nrp1", 7, "coronal", "density") == "Nrp1_7_density.mnc"
    assert output_name("{plane}-{volume}-{experiment_id}.mnc", "Nrp1", 7, "coronal", "density") == "coronal-density-7.mnc"
