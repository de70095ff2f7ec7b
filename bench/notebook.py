"""The reference notebook's approach, reimplemented faithfully as the benchmark's baseline.

One experiment at a time, as `download_data` does: the metadata CSV
(num_rows=all), then per row a `requests.get`, the zip written to disk,
energy.raw extracted, `rawtominc` through the shell, the notebook's
`transform_space` (RAS, MICe) with pyminc, then a rename. Usage:

    python -m bench.notebook BASE_URL OUTDIR [LIMIT]
"""

import os
import sys
from zipfile import ZipFile

import numpy as np
import pandas as pd
import requests
from pyminc.volumes.factory import volumeFromDescription, volumeFromFile

QUERY = ("/api/v2/data/SectionDataSet/query.csv?criteria=[failed$eqfalse],plane_of_section[name$eqcoronal],"
         "products[abbreviation$eqMouse],treatments[name$eqISH],genes&tabular=data_sets.id+as+experiment_id,"
         "data_sets.section_thickness,data_sets.specimen_id,plane_of_sections.name+as+plane,genes.acronym+as+gene,"
         "genes.name+as+gene_name,genes.chromosome_id,genes.entrez_id,genes.genomic_reference_update_id,"
         "genes.homologene_id,genes.organism_id&start_row=0&num_rows=all")


def fetch_expression(base, experiment_id, outdir):
    resp = requests.get(f"{base}/grid_data/download/{experiment_id}")
    tmpfile = f"{outdir}{experiment_id}.zip"
    with open(tmpfile, "wb") as fh:
        fh.write(resp.content)
    with ZipFile(tmpfile, "r") as zf:
        try:
            zf.extract("energy.raw", path=outdir)
            os.rename(outdir + "energy.raw", f"{outdir}{experiment_id}.raw")
            success = 1
        except KeyError:
            success = 0
    os.remove(tmpfile)
    return success


def transform_space(infile, outfile):
    """The notebook's transform_space with voxel_orientation='RAS', world_space='MICe', expansion 1."""
    vol = volumeFromFile(infile)
    dat = np.rot90(vol.data, k=1, axes=(0, 2))
    dat = np.rot90(dat, k=1, axes=(0, 1))
    centers = [c / 1000 for c in (5700, 7900, 2700)]
    outvol = volumeFromDescription(outputFilename=outfile, dimnames=["zspace", "yspace", "xspace"],
                                   sizes=dat.shape, starts=[-c for c in reversed(centers)], steps=[0.2] * 3,
                                   x_dir_cosines=[1, 0, 0], y_dir_cosines=[0, 1, 0], z_dir_cosines=[0, 0, 1],
                                   volumeType=vol.volumeType, dtype=vol.dtype, labels=vol.labels)
    outvol.data = dat
    outvol.writeFile()
    outvol.closeVolume()
    vol.closeVolume()


def main(base, outdir, limit=None):
    outdir = outdir.rstrip("/") + "/"
    os.makedirs(outdir, exist_ok=True)
    metadata = pd.read_csv(base + QUERY)
    metadata = metadata.sort_values("experiment_id")
    if limit:
        metadata = metadata.head(int(limit))
    for _, row in metadata.iterrows():
        eid = row["experiment_id"]
        if fetch_expression(base, eid, outdir):
            raw, tmp = f"{outdir}{eid}.raw", f"{outdir}{eid}_tmp.mnc"
            os.system(f"cat {raw} | rawtominc {tmp} -signed -float -ounsigned -oshort "
                      "-xstep 0.2 -ystep 0.2 -zstep 0.2 -clobber 58 41 67")
            os.remove(raw)
            tmp2 = f"{outdir}{eid}_tmp2.mnc"
            transform_space(tmp, tmp2)
            os.remove(tmp)
            os.rename(tmp2, f"{outdir}{row['gene']}_{eid}.mnc")


if __name__ == "__main__":
    main(*sys.argv[1:])
