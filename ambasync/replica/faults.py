"""Which request gets which fault: deterministic from the seed, so a failing test replays."""

from __future__ import annotations

import hashlib
from typing import Any

FAULT_KINDS = ("500", "503", "429", "drop", "truncate", "stall")  # transient, per request
BAD_KINDS = ("no_energy", "short_raw", "not_zip", "404", "bomb",  # permanent, per experiment
             "redirect_loop", "redirect_ftp")  # 302s back and forth between two URLs; a 302 to ftp://


def hash01(*parts: Any) -> float:
    """Stable uniform number in [0, 1) from the parts (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


def fault_for(seed: int, rate: float, kinds: tuple[str, ...], experiment_id: int, n: int) -> str | None:
    """The fault given to the ``n``-th request of an experiment's grid, or None."""
    if rate <= 0 or not kinds or hash01(seed, experiment_id, n, "fault") >= rate:
        return None
    return kinds[int(hash01(seed, experiment_id, n, "kind") * len(kinds))]
