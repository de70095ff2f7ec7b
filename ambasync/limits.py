"""Size caps: how much one download, or one decoded grid, may hold whatever upstream claims.

A real grid zip is ~390 KB and a catalogue page of 1,000 rows ~250 KB; 64 MiB leaves two
orders of magnitude of room while a hostile or broken answer can never fill memory.
"""

MAX_BODY_BYTES = 64 * 1024 * 1024
