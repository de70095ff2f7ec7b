"""The catalogue's rows, parsed without a server: what a user would notice if these broke is
experiments silently missing from the mirror, or --limit taking the wrong ones."""

import json

import pytest

from ambasync.mirror.catalog import (COLUMNS, InvalidRow, Row, Total, merge_by_id, parse_page, row_in_plane, validate_row)
from ambasync.errors import TransientError, UpstreamError


def test_a_good_row_keeps_every_column_and_empty_strings_become_null():
    raw = {c: f"v{i}" for i, c in enumerate(COLUMNS)} | {"experiment_id": "74272479", "gene": "Nrp1", "entrez_id": ""}
    row = validate_row(raw)
    assert isinstance(row, Row) and row.experiment_id == 74272479 and row.gene == "Nrp1"
    assert list(row.fields) == list(COLUMNS) and row.fields["entrez_id"] is None
    assert row.fields["experiment_id"] == 74272479  # as a number, whatever upstream sent


@pytest.mark.parametrize("raw, why", [
    ({"experiment_id": None, "gene": "Avp"}, "no valid experiment_id"),
    ({"experiment_id": "abc", "gene": "Avp"}, "no valid experiment_id"),
    ({"experiment_id": -5, "gene": "Avp"}, "no valid experiment_id"),
    ({"experiment_id": True, "gene": "Avp"}, "no valid experiment_id"),
    (["not", "a", "dict"], "is not an object"),
])
def test_rows_that_cannot_be_mirrored_are_reported_with_the_reason(raw, why):
    row = validate_row(raw)
    assert isinstance(row, InvalidRow) and why in row.reason


@pytest.mark.parametrize("gene", ["", "   ", None, "missing"])
def test_a_row_with_an_id_but_no_gene_is_still_mirrored_with_its_gene_left_empty(gene):
    raw = {"experiment_id": 12, "plane": "coronal"} | ({} if gene == "missing" else {"gene": gene})
    row = validate_row(raw)
    assert isinstance(row, Row) and row.experiment_id == 12 and row.gene == "" and row.fields["gene"] is None


def test_a_row_without_its_plane_gets_the_plane_it_was_queried_for():
    row = row_in_plane({"experiment_id": 7, "gene": "Avp", "plane": ""}, "sagittal")
    assert row.plane == "sagittal" and row.fields["plane"] == "sagittal"


def test_the_envelope_decides_success_not_the_http_status():
    ok = parse_page(json.dumps({"success": True, "msg": [{"a": 1}], "total_rows": 9}).encode(), "u")
    assert ok.total_rows == 9 and ok.rows == [{"a": 1}]
    with pytest.raises(UpstreamError, match="catalogue query failed"):
        parse_page(json.dumps({"success": False, "msg": "Data Access error"}).encode(), "u")
    with pytest.raises(UpstreamError, match="no RMA envelope"):
        parse_page(b"[]", "u")
    with pytest.raises(TransientError, match="not JSON"):  # an HTML error page: try again
        parse_page(b"<html>busy</html>", "u")


async def _stream(items):
    for item in items:
        yield item


def _row(eid: int, plane: str) -> Row:
    return Row(eid, f"G{eid}", plane, {"experiment_id": eid})


async def test_planes_merge_in_id_order_with_totals_and_invalid_rows_first_come():
    bad = InvalidRow("no gene", {})
    streams = {
        "coronal": _stream([Total(3), _row(1, "coronal"), _row(5, "coronal"), bad, _row(9, "coronal")]),
        "sagittal": _stream([Total(2), _row(2, "sagittal"), _row(6, "sagittal")]),
    }
    merged = [(plane, item) async for plane, item in merge_by_id(streams)]
    assert merged[:2] == [("coronal", Total(3)), ("sagittal", Total(2))]
    ids = [item.experiment_id if isinstance(item, Row) else item for _, item in merged[2:]]
    assert ids == [1, 2, 5, bad, 6, 9]  # the invalid row as soon as it is read
    assert [plane for plane, item in merged if isinstance(item, Row) and item.experiment_id == 6] == ["sagittal"]
