"""Where dask computes: the local threads, or an existing ``distributed`` cluster
named by ``--scheduler`` / ``DASK_SCHEDULER_ADDRESS``; never a home-made one.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Iterator

from ambasync.errors import AnalysisError

if TYPE_CHECKING:
    pass


@contextlib.contextmanager
def compute_on(address: str | None = None, connect_timeout: float = 10.0) -> Iterator[object | None]:
    """Where dask computes inside the block: an existing ``dask.distributed`` scheduler at
    ``address`` (or ``$DASK_SCHEDULER_ADDRESS``), else the local threaded scheduler.
    Yields the distributed Client, or None when computing locally. ``connect_timeout``
    (seconds) bounds the wait for a scheduler that is not there."""
    address = address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    if address is None:
        import dask

        with dask.config.set(scheduler="threads"):
            yield None
        return
    from distributed import Client

    try:
        client = Client(address, timeout=f"{connect_timeout}s", set_as_default=True)
    except (OSError, TimeoutError, ValueError) as exc:
        raise AnalysisError(f"cannot reach the dask scheduler at {address} ({exc}); start it, "
                            "or leave out --scheduler to compute on this machine") from None
    try:
        yield client
    finally:
        client.close()

