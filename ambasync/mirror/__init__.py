"""The mirror: ``ambasync run`` and its companions (``status``, ``verify``).

The catalogue is read (:mod:`.source`, :mod:`.catalog`), filtered (:mod:`.selection`),
decided row by row (:mod:`.decide`), fetched and converted (:mod:`.experiment`,
:mod:`.pool`, :mod:`.convert`) into each output format (:mod:`.formats`), and recorded
(:mod:`.recorder`, :mod:`.state`); :mod:`.run` owns the lifecycle. The analysis layer
never imports this package.
"""
