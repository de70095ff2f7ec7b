"""``search``: correlation and fold change of a map against every experiment
(:mod:`.correlate`), the dask tasks over blocks of experiments (:mod:`.tasks`),
statistics (:mod:`.stats`), spatial null maps (:mod:`.nulls`) and the picture
(:mod:`.plot`)."""
