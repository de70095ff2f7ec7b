"""The replica's RMA catalogue: rows built from the settings, paged queries, CSV rendering."""

from __future__ import annotations

import re
from typing import Any

from ambasync.mirror.catalog import COLUMNS
from ambasync.replica.grids import REAL_IDS, SAGITTAL_IDS
from ambasync.replica.settings import ReplicaConfig


def catalogue_row(eid: int, gene: str, plane: str, i: int) -> dict[str, Any]:
    return {
        "experiment_id": eid, "section_thickness": 25, "specimen_id": 700000 + 7 * i, "plane": plane,
        "gene": gene, "gene_name": f"{gene} gene", "chromosome_id": 30 + i % 21,
        "entrez_id": None if i % 11 == 5 else 10000 + 17 * i, "genomic_reference_update_id": 491928275,
        "homologene_id": 100 + 3 * i, "organism_id": 2,
    }


def build_rows(c: ReplicaConfig, with_real: bool) -> list[dict[str, Any]]:
    """Every row the catalogue lists, in id order (repeated ids kept, as upstream repeats some)."""
    rows = []
    for i in range(c.n_coronal):  # ~2 experiments per gene, like the real atlas
        rows.append(catalogue_row(100000 + 13 * i, f"Gene{(i * 7) % max(1, c.n_coronal // 2 + 1)}", "coronal", i))
    for i in range(c.n_sagittal):
        rows.append(catalogue_row(SAGITTAL_IDS.start + 11 * i, f"Sgene{(i * 5) % max(1, c.n_sagittal // 2 + 1)}", "sagittal",
                                  c.n_coronal + i))
    if with_real:
        for j, (eid, gene) in enumerate(REAL_IDS.items()):
            rows.append(catalogue_row(eid, gene, "coronal", 9000 + j))
    for j, extra in enumerate(c.extra_rows):
        rows.append({**catalogue_row(int(extra["experiment_id"]), "", "coronal", 20000 + j), **extra})
    rows.sort(key=lambda r: r["experiment_id"])
    for eid in c.duplicate_ids:
        rows.extend([dict(r) for r in rows if r["experiment_id"] == eid][:1])
    for eid, genes in c.duplicate_genes.items():  # the same experiment again, under other genes
        first = next(r for r in rows if r["experiment_id"] == eid)
        rows.extend({**first, "gene": gene, "gene_name": f"{gene} gene"} for gene in genes)
    rows.sort(key=lambda r: r["experiment_id"])  # stable: repeats come after the row they repeat
    return rows


def select_page(rows: list[dict[str, Any]], params: dict[str, str]) -> tuple[int, list[dict[str, Any]] | str]:
    """(total_rows, rows of the page) or (0, error string) for a query the real API would refuse."""
    criteria = params.get("criteria", "")
    if "treatments[name$eqISH]" not in criteria or "products[abbreviation$eqMouse]" not in criteria:
        return 0, f"Unsupported criteria for this replica: {criteria!r}"
    match = re.search(r"plane_of_section\[name\$eq(\w+)\]", criteria)
    rows = [r for r in rows if match is None or r["plane"] == match.group(1)]
    try:
        start = int(params.get("start_row", "0"))
        num = len(rows) if params.get("num_rows") == "all" else int(params.get("num_rows", "50"))
    except ValueError:
        return 0, "start_row and num_rows must be integers"
    return len(rows), rows[start:start + num]


def csv_field(value: Any) -> str:
    if value is None:
        return ""
    text = str(value)
    return '"' + text.replace('"', '""') + '"' if any(ch in text for ch in ',"\n') else text


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The page as the API's CSV: the tabular columns as header, nulls empty, no BOM."""
    lines = [",".join(COLUMNS)] + [",".join(csv_field(r[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines) + "\n"
