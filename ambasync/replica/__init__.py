"""A faithful offline replica of the Allen Brain Atlas API (127.0.0.1 only).

It serves what ambasync uses of the real service, as its public documentation and real
downloads describe it: the RMA catalogue (JSON envelope and CSV, paging, ``total_rows``,
nulls, repeated rows) and grid zips laid out like real downloads. Grids are synthetic and
deterministic and shaped like real ISH energy (region-structured, smooth, measured zeros; coronal ones cover the brain and its rim, sagittal ones one hemisphere; ``-1`` outside), plus the real Nrp1 and Pdyn zips under
their real ids when the reference data is found. Transient faults, permanently bad
experiments, a connection limit, latency and bandwidth are injected deterministically
from a seed, for tests and benchmarks.

Parts: :mod:`.catalogue` (rows and pages), :mod:`.grids` (zips), :mod:`.faults` (who gets
which fault), :mod:`.server` (HTTP), :mod:`.settings` (ReplicaConfig, ReplicaStats).
"""

from ambasync.replica.faults import BAD_KINDS, FAULT_KINDS
from ambasync.replica.grids import GRID_SHAPE, REAL_FILES, REAL_IDS, synthetic_grid
from ambasync.replica.server import Replica, main_serve, serve
from ambasync.replica.settings import ReplicaConfig, ReplicaStats

__all__ = ["BAD_KINDS", "FAULT_KINDS", "GRID_SHAPE", "REAL_FILES", "REAL_IDS", "Replica", "ReplicaConfig",
           "ReplicaStats", "main_serve", "serve", "synthetic_grid"]
