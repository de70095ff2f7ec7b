"""What the operator asked of one run, beyond the configuration (the `run` command's flags)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunOptions:
    force: bool = False  # redo everything
    verify: bool = False  # check sha256 of done files before skipping them
    prune: bool = False  # delete files of experiments the catalogue no longer lists
    dry_run: bool = False  # say what would be fetched; write nothing
    retry_failed: bool = False  # retry permanent failures and quarantined experiments too
    quiet: bool = False
