"""`python -m ambasync replica` in a subprocess: scaffolding for tests and benchmarks that must
kill or measure the mirror as a whole process. Shared by tests/ and bench/ (one copy)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from typing import Any


class ReplicaProcess:
    """The replica served by its own process; ``args`` are the `replica` command's options."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "ambasync", "replica", "--port", "0", *args],
                                     stdout=subprocess.PIPE, text=True)
        self.url = (self.proc.stdout.readline() if self.proc.stdout else "").strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.proc.kill()
            raise RuntimeError(f"the replica did not start (said {self.url!r})")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/replica/stats", timeout=30) as resp:
            return json.load(resp)

    def reset(self) -> None:
        """Counters back to zero (before measuring the next client)."""
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/replica/reset", method="POST"), timeout=30).close()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
