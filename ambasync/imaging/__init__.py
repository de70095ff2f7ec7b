"""Image files and grids: Allen grid zips decoded (:mod:`.allen_grid`), MINC and NIfTI
written (:mod:`.minc`, :mod:`.nifti`), and any image read and brought onto another grid
by world coordinates (:mod:`.regrid`). Shared by the mirror and the analysis layer."""
