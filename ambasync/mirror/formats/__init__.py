"""The mirror's output formats (MINC, NIfTI, the cube), each in two halves: the writer
run in a worker process (:mod:`.writers`) and its main-process hooks (:mod:`.outputs`)."""
