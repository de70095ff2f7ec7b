"""The analysis layer: gene × voxel (or × region) matrices (:mod:`.matrix`) and the
search for genes that match a map (:mod:`.search`), on the cube read through
:mod:`ambasync.cube.read`, with masks (:mod:`.masks`) and a dask scheduler
(:mod:`.cluster`). The public functions are :func:`ambasync.matrix` and
:func:`ambasync.search`."""
