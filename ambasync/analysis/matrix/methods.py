"""The methods paragraph written beside every matrix, in the style of abagen's report.

Pure: a recipe and the facts of one build (counts, cube location and hash) in, Markdown out,
so what a paper's methods section says is generated from what was actually done.
"""

from __future__ import annotations

from typing import Any

from ambasync.analysis.matrix.recipe import Recipe, dumps

REFERENCES = {
    "lein": "Lein, E. S., et al. (2007). Genome-wide atlas of gene expression in the adult mouse brain. "
            "Nature, 445(7124), 168-176.",
    "beauchamp": "Beauchamp, A., et al. (2022). Whole-brain comparison of rodent and human brains using spatial "
                 "transcriptomics. eLife, 11, e79418 (MouseHumanTranscriptomicSimilarity).",
    "fulcher": "Fulcher, B. D., & Fornito, A. (2016). A transcriptional signature of hub connectivity in the mouse "
               "connectome. PNAS, 113(5), 1435-1440.",
    "markello": "Markello, R. D., et al. (2021). Standardizing workflows in imaging transcriptomics with the "
                "abagen toolbox. eLife, 10, e72129.",
    "troyanskaya": "Troyanskaya, O., et al. (2001). Missing value estimation methods for DNA microarrays. "
                   "Bioinformatics, 17(6), 520-525.",
}


def _plane_text(r: Recipe, facts: dict[str, Any]) -> str:
    if r.plane == "both":
        how = {"mean": "pooling the experiments of both planes",
               "prefer-coronal": "using a gene's coronal experiments where it had any and its sagittal ones "
                                 "otherwise",
               "zscore-mean": "z-scoring each experiment across the masked voxels before averaging"}[r.combine]
        return f"experiments of both planes of section, combined per gene by {how} (combine = {r.combine}; " \
               "after Fulcher & Fornito, 2016)"
    text = f"{r.plane} experiments"
    if r.plane == "sagittal":
        text += (" of genes that also had a coronal experiment (genes_in_coronal = true)" if r.genes_in_coronal
                 else " (genes_in_coronal = false: no restriction to genes with a coronal experiment)")
    return text


def methods_text(recipe: Recipe, facts: dict[str, Any], output: str = "") -> str:
    """Markdown: a methods paragraph naming every step and parameter, then references and the recipe."""
    r = recipe
    refs = ["lein", "beauchamp"]
    s = []
    s.append(
        f"Gene expression was obtained from the Allen Mouse Brain Atlas in situ hybridisation "
        f"expression grids at 200 µm (Lein et al., 2007), mirrored into the study's template space and read "
        f"from an ambasync cube with ambasync {facts.get('ambasync_version', '?')} (cube {facts.get('cube', '?')}, version {facts.get('cube_version') or 'not recorded'}; "
        f"SHA-256 of the slice of the cube used, over the experiment ids, the mask and the masked values: "
        f"{facts.get('cube_hash', '?')}). The `{r.variable}` volume of {facts.get('n_experiments', '?')} "
        f"{_plane_text(r, facts)} was used"
        + (f", restricted to the genes {', '.join(r.genes)}" if r.genes else "")
        + (f", restricted to the experiments {', '.join(map(str, r.ids))}" if r.ids else "") + "."
    )
    if r.mirror_hemisphere:
        s.append("Voxels without data in sagittal (one-hemisphere) experiments were filled with the value of the "
                 "voxel mirrored across the midline (mirror_hemisphere = true).")
    mask = {"coronal": "the voxels with coronal coverage of at least 0.8 (the fraction of the cube's coronal "
                       "experiments with data)",
            "sagittal": "the voxels with sagittal coverage of at least 0.8",
            "brain": "the voxels with data in any experiment of the cube"}.get(r.mask, f"the nonzero voxels of "
                                                                                   f"the image {r.mask}")
    s.append(f"Expression was sampled in {mask} (mask = {r.mask}"
             + (", resampled to the cube's grid by nearest neighbour" if r.resample_images else "")
             + f"), {facts.get('n_voxels', '?')} voxels in the flattened voxel order of the MINC files.")
    s.append("Voxels without data (-1) were treated as missing"
             + (", as were voxels with a measured expression of exactly 0 (zero_is_missing = true)."
                if r.zero_is_missing else "; measured zeros were kept (zero_is_missing = false)."))
    if r.log2:
        s.append(f"Values were log2-transformed (log2 = true, log2_offset = {r.log2_offset}"
                 + ("; a value of 0 gives -inf, which was treated as missing" if r.log2_offset == 0 else "") + ").")
    else:
        s.append("Values were not log-transformed (log2 = false).")
    if r.group_by == "gene":
        s.append("Experiments were grouped by the catalogue's gene acronym and averaged voxel-wise, skipping "
                 f"missing values (group_by = gene), giving {facts.get('n_rows_grouped', '?')} genes.")
    else:
        s.append(f"Each experiment was kept as its own row (group_by = experiment), "
                 f"{facts.get('n_rows_grouped', '?')} rows.")
    s.append(f"Rows with a fraction of missing voxels of {r.max_missing} or more were discarded "
             f"(max_missing = {r.max_missing}).")
    if r.impute == "knn":
        refs.append("troyanskaya")
        s.append("Remaining missing values were imputed with scikit-learn's KNNImputer (n_neighbors = "
                 f"{r.knn_neighbors}, uniform weights, nan-Euclidean distance; knn_neighbors = {r.knn_neighbors}) "
                 "with voxels as samples and rows as features, as in Beauchamp et al. (impute = knn).")
    elif r.impute == "spatial":
        s.append("Remaining missing values were imputed with the mean of the same row's values at the nearest "
                 "voxels with data (all voxels at the smallest Euclidean distance; impute = spatial).")
    else:
        s.append("Missing values were not imputed (impute = none).")
    if r.homologs:
        s.append(f"Genes were restricted to those with a human homolog in {r.homologs} (homologs).")
    if r.normalise == "mhts":
        s.append("Each voxel was z-scored across genes and each gene then centred across voxels (normalise = mhts).")
    elif r.normalise in ("srs", "zscore"):
        refs.append("markello")
        what = ("a scaled robust sigmoid (1 / (1 + exp(-(x - median) / (IQR / 1.349))), rescaled to the unit "
                "interval)" if r.normalise == "srs" else "a z-score (standard deviation with one degree of freedom)")
        s.append(f"Each row was normalised across voxels with {what}, as defined by abagen (Markello et al., 2021; "
                 f"normalise = {r.normalise}).")
    else:
        s.append("No normalisation was applied (normalise = none).")
    if r.labels and not r.region_means:
        s.append(f"Each voxel was named after its region in the label image {r.labels} ({r.label_table}; labels, "
                 "label_table; region_means = false).")
    elif r.labels:
        s.append(f"Gene-by-region values were the mean, skipping missing values, over the masked voxels of each "
                 f"region of the label image {r.labels} named in {r.label_table} (label 0 and unnamed labels "
                 f"excluded; labels, label_table), {facts.get('n_columns', '?')} regions from "
                 f"{facts.get('n_region_voxels', '?')} voxels.")
    if r.plane == "both":
        refs.append("fulcher")
    s.append(f"The final matrix{f' ({output})' if output else ''} has {facts.get('n_rows', '?')} rows and "
             f"{facts.get('n_columns', '?')} columns.")
    params = ", ".join(f"{k} = {v!r}" for k, v in r.to_dict().items())
    text = "# Methods\n\n" + " ".join(s) + "\n\nParameters: " + params + ".\n\n## References\n\n"
    text += "\n".join(f"- {REFERENCES[k]}" for k in dict.fromkeys(refs)) + "\n"
    text += "\n## Recipe\n\n```toml\n" + dumps(r, str(facts.get("ambasync_version", ""))) + "```\n"
    return text
