"""The methods paragraph written beside a search's results (``{to}.methods.md``, as ``matrix``
writes its own): what was compared with what, which contrast, which p-values, so a table read
later, or pasted into a paper, says how it was made."""

from __future__ import annotations

from typing import Any

REFERENCES = {
    "lein": "Lein ES et al. (2007) Genome-wide atlas of gene expression in the adult mouse brain. Nature 445:168-176.",
    "theiler": "Theiler J, Eubank S, Longtin A, Galdrikian B, Farmer JD (1992) Testing for nonlinearity in time "
               "series: the method of surrogate data. Physica D 58:77-94.",
    "bh": "Benjamini Y, Hochberg Y (1995) Controlling the false discovery rate. J R Stat Soc B 57:289-300.",
    "winkler": "Winkler AM, Ridgway GR, Douaud G, Nichols TE, Smith SM (2016) Faster permutation inference in "
               "brain imaging. NeuroImage 141:502-516.",
    "zhang": "Zhang J, Stephens MA (2009) A new and efficient estimation method for the generalized Pareto "
             "distribution. Technometrics 51:316-325.",
    "choulakian": "Choulakian V, Stephens MA (2001) Goodness-of-fit tests for the generalized Pareto distribution. "
                  "Technometrics 43:478-484.",
}


def _align(align: str | None) -> str:
    if align == "voxel":
        return "taken index for index onto the cube's grid (--align voxel)"
    return "resampled onto the cube's grid by world coordinates" + (" (--align world)" if align == "world" else "")


def correlation_methods(facts: dict[str, Any]) -> str:
    """Markdown for correlation mode; ``facts``: map, mask, method, nulls, seed, tail, align,
    n_experiments, n_gpd, by_gene, version."""
    refs = ["lein", "theiler", "bh"]
    s = [f"Gene expression energy of {facts['n_experiments']} Allen Mouse Brain Atlas in situ hybridisation "
         f"experiments at 200 µm (Lein et al., 2007) was read from an ambasync cube (ambasync "
         f"{facts.get('version', '?')}; cube version {facts.get('cube_version') or 'not recorded'}). The map {facts['map']} was {_align(facts.get('align'))} "
         f"({'trilinear' if facts.get('align') != 'voxel' else 'no interpolation'}), and each experiment's "
         f"{'Spearman' if facts['method'] == 'spearman' else 'Pearson'} correlation with it was computed over the "
         f"voxels of the mask {facts['mask']} where both have data."]
    if facts["nulls"]:
        s.append(f"Two-sided p-values came from {facts['nulls']} spatial null maps with the map's autocorrelation "
                 f"and value distribution (Fourier phase randomisation within the mask with amplitude adjustment, "
                 f"after Theiler et al., 1992; seed {facts['seed']}), every experiment scored against the same nulls.")
        if facts.get("tail") == "gpd":
            refs += ["winkler", "zhang", "choulakian"]
            s.append(f"Where an experiment's permutation p-value was below 0.1, a generalised Pareto distribution "
                     f"was fitted to the upper tail of its null correlations (Winkler et al., 2016; Zhang & "
                     f"Stephens, 2009; fit accepted by an Anderson-Darling test at 5 %, Choulakian & Stephens, "
                     f"2001) and gave the p-value where the fit held ({facts.get('n_gpd', 0)} experiments; "
                     f"column p_method); elsewhere the permutation p-value (1 + exceedances) / (1 + nulls) was used.")
        else:
            s.append("p-values are the permutation estimate (1 + exceedances) / (1 + nulls) (--tail empirical).")
        s.append("q-values are Benjamini-Hochberg over experiments (Benjamini & Hochberg, 1995).")
    else:
        s.append("No spatial nulls were made (--nulls 0): no p- or q-values.")
    if facts.get("by_gene"):
        s.append("Genes were scored by tanh of the mean Fisher z of their experiments, their nulls combined the "
                 "same way; reproducibility is the mean pairwise Spearman correlation of a gene's experiments over "
                 "their shared voxels, replicated when above 0.5.")
    return _finish(s, refs)


def fold_methods(facts: dict[str, Any]) -> str:
    """Markdown for differential mode; ``facts``: target, contrast (their descriptions), mask,
    align, n_experiments, version."""
    s = [f"Gene expression energy of {facts['n_experiments']} Allen Mouse Brain Atlas in situ hybridisation "
         f"experiments at 200 µm (Lein et al., 2007) was read from an ambasync cube (ambasync "
         f"{facts.get('version', '?')}; cube version {facts.get('cube_version') or 'not recorded'}). Region images were {_align(facts.get('align'))} (nearest voxel). "
         f"For each experiment, the fold change is its mean expression energy over the target region "
         f"({facts['target']}) divided by its mean over the contrast region ({facts['contrast']}), each mean over "
         f"the region's voxels within the mask {facts['mask']} where the experiment has data, as ABIgeneRMINC's "
         f"geneFoldChange computes it."]
    if "rest of the mask" not in facts["contrast"]:
        s.append("The contrast region was used as given, including any voxels it shares with the target.")
    return _finish(s, ["lein"])


def _finish(paragraph: list[str], refs: list[str]) -> str:
    return "## Methods\n\n" + " ".join(paragraph) + "\n\n## References\n\n" + "\n".join(
        f"- {REFERENCES[r]}" for r in refs) + "\n"


__all__ = ["correlation_methods", "fold_methods"]
