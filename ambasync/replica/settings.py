"""What a replica serves and how it misbehaves (its settings), and what it counts (its stats)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from ambasync.replica.faults import FAULT_KINDS


@dataclass
class ReplicaConfig:
    n_coronal: int = 60
    n_sagittal: int = 20
    seed: int = 0
    latency_ms: float = 0.0
    bandwidth_kbps: float = 0.0  # per connection, KB/s; 0 = unthrottled
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = FAULT_KINDS
    retry_after: float = 1.0
    stall_seconds: float = 30.0
    max_connections: int = 0
    bad: dict[int, str] = field(default_factory=dict)
    extra_rows: list[dict] = field(default_factory=list)
    duplicate_ids: tuple[int, ...] = ()
    duplicate_genes: dict[int, tuple[str, ...]] = field(default_factory=dict)  # id -> genes of its extra rows
    grow_after_requests: int = 0
    catalog_fail: bool = False
    real_dir: str | None = None
    zip_cache: int = 256
    prebuild: bool = False
    variants: int = 0  # >0: experiment i serves the grid (and zip) of variant i % variants; for atlas-scale benchmarks


@dataclass
class ReplicaStats:
    grid_requests: collections.Counter = field(default_factory=collections.Counter)
    completed: collections.Counter = field(default_factory=collections.Counter)
    faults: collections.Counter = field(default_factory=collections.Counter)
    catalog_requests: int = 0
    served_429: int = 0
    over_limit_429: int = 0
    redirects: int = 0  # 302s answered (bad kinds redirect_loop, redirect_ftp)
    in_flight: int = 0
    max_in_flight: int = 0
    events: list[tuple[str, int]] = field(default_factory=list)  # ("catalog", start_row) / ("grid", id), in order
    first_grid_request: float | None = None  # epoch seconds: benchmarks time a client's start from it

    def as_json(self) -> dict[str, Any]:
        doc = {k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in vars(self).items()}
        doc["events"] = self.events[-10000:]
        return doc
