"""File names from catalogue rows: safe on every file system, unique, still readable.

Gene acronyms come from upstream and are not trusted: a name never leaves its
folder, never hides as a dot file, never collides with a Windows device name,
and always fits the 255-byte limit. The experiment id in every name keeps names
unique; the manifest maps each file back to the real acronym.
"""

from __future__ import annotations

import re
import unicodedata

_UNSAFE = re.compile(r"[^\w.+-]+", re.UNICODE)  # \w keeps unicode letters and digits
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
MAX_GENE_BYTES = 100
# The {gene} of an experiment whose catalogue row has no gene (empty, blank or null): the
# experiment id beside it keeps the name unique; the manifest's gene stays empty.
UNKNOWN_GENE = "unknown-gene"
MAX_NAME_BYTES = 255


def safe_gene(gene: str) -> str:
    """A file-name-safe form of a gene acronym (non-empty)."""
    text = unicodedata.normalize("NFC", gene)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else "_" for ch in text)
    text = _UNSAFE.sub("_", text).strip("._ ")
    text = re.sub(r"\.{2,}", "_", text)
    if not text:
        return "unnamed"
    if text.split(".")[0].upper() in _RESERVED:
        text = "_" + text
    encoded = text.encode("utf-8")[:MAX_GENE_BYTES]
    return encoded.decode("utf-8", "ignore").rstrip("._ ") or "unnamed"


def output_name(template: str, gene: str, experiment_id: int, plane: str, volume: str) -> str:
    """Render the configured template; volumes other than energy are marked when the template does not."""
    gene = safe_gene(gene) if gene.strip() else UNKNOWN_GENE
    name = template.format(gene=gene, experiment_id=experiment_id, plane=plane, volume=volume)
    if volume != "energy" and "{volume}" not in template:
        name = f"{name[:-4]}_{volume}.mnc"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:  # only a very long template gets here
        name = f"{experiment_id}_{volume}.mnc"
    return name
