"""MouseHumanTranscriptomicSimilarity's ``AMBA/build_voxel_matrix.py``, reimplemented faithfully
as the matrix benchmark's baseline (its steps and libraries, written anew; no code copied).

What the script does: a multiprocessing pool (one process per CPU) reads each MINC file with
pyminc, flattens it, keeps the voxels where the mask equals 1, and sets -1 and 0 to NaN; the
rows go into a pandas DataFrame indexed by file name, log2 is applied to the whole frame, the
index is cut at the first ``_`` (``str.replace('_.*', '')``, a regex in the pandas it was
written for), experiments are grouped by that name with pandas ``groupby(...).mean``, rows
whose NaN fraction is not strictly below the threshold are dropped, and KNNImputer (defaults,
voxels as samples) fills the rest. Usage:

    python -m bench.mhts_baseline --datadir DIR --dataset coronal --mask MASK.mnc --out OUT.csv
           [--log2 true] [--groupexp true] [--threshold 0.2] [--impute true] [--nproc N]

``DIR/{dataset}/*.mnc`` are the experiment files (``{gene}_{id}.mnc``, as the mirror writes).
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing as mp
import os
from functools import partial

import numpy as np
import pandas as pd
from pyminc.volumes.factory import volumeFromFile


def read_masked(image: str, mask: str) -> np.ndarray:
    """One experiment's masked voxels, -1 and 0 as NaN (the script reads the mask each time too)."""
    vol = volumeFromFile(mask)
    keep = np.array(vol.data.flatten())
    vol.closeVolume()
    vol = volumeFromFile(image)
    values = np.array(vol.data.flatten())
    vol.closeVolume()
    values = values[keep == 1]
    values[values == -1] = np.nan
    values[values == 0] = np.nan  # never fires on ushort files: their zeros are ±1 quantisation step
    return values


def build_expression_matrix(files: list[str], mask: str, log2: bool = True, group: bool = True,
                            threshold: float = 0.2, nproc: int | None = None) -> pd.DataFrame:
    reader = partial(read_masked, mask=mask)
    if nproc == 1:
        arrays = [reader(f) for f in files]
    else:
        with mp.Pool(nproc or mp.cpu_count()) as pool:
            arrays = list(pool.imap(reader, files))
    frame = pd.DataFrame(np.asarray(arrays), index=[os.path.basename(f) for f in files])
    if log2:
        with np.errstate(divide="ignore", invalid="ignore"):
            frame = np.log2(frame)
    frame.index = frame.index.str.replace(".mnc", "", regex=True).str.replace("_.*", "", regex=True)
    frame.index.name = "Gene"
    if group:
        frame = frame.groupby(frame.index).mean()
    missing = frame.isna().sum(axis=1) / len(frame.columns)
    return frame[missing < threshold]


def impute_knn(frame: pd.DataFrame) -> pd.DataFrame:
    from sklearn.impute import KNNImputer

    genes = frame.index
    return pd.DataFrame(KNNImputer(missing_values=np.nan).fit_transform(frame.to_numpy().T).T, index=genes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datadir", required=True)
    p.add_argument("--dataset", default="coronal", choices=["coronal", "sagittal"])
    p.add_argument("--mask", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--log2", default="true", choices=["true", "false"])
    p.add_argument("--groupexp", default="true", choices=["true", "false"])
    p.add_argument("--threshold", type=float, default=0.2)
    p.add_argument("--impute", default="true", choices=["true", "false"])
    p.add_argument("--nproc", type=int, default=mp.cpu_count())
    args = p.parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.datadir, args.dataset, "*.mnc")))
    frame = build_expression_matrix(files, args.mask, args.log2 == "true", args.groupexp == "true",
                                    args.threshold, args.nproc)
    if args.impute == "true":
        frame = impute_knn(frame)
    frame.to_csv(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
