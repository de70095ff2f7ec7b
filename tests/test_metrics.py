"""The Prometheus textfile of the last run: what a user would notice if this broke is
node_exporter refusing the file (so no alert ever fires for a failed nightly run), a
scrape reading half a file, or numbers that are not the run's."""

import os
import re
from pathlib import Path

import pytest

from ambasync.mirror.metrics import render, textfile_path, write_textfile
from ambasync.replica import ReplicaConfig, serve
from ambasync.mirror.report import Summary
from helpers import mirror

# The text exposition format, line by line (prometheus docs, "Exposition formats", 0.0.4).
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
VALUE = r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|NaN|Inf)"
HELP = re.compile(rf"^# HELP ({NAME}) (.*)$")
TYPE = re.compile(rf"^# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)$")
SAMPLE = re.compile(rf"^({NAME})(?:\{{((?:{LABEL})(?:,{LABEL})*)?\}})? ({VALUE})$")


def parse(text: str) -> tuple[dict[tuple[str, frozenset], float], dict[str, str]]:
    """Samples by (name, labels) and types by family; fails on anything node_exporter would refuse:
    a line outside the grammar, a sample before its TYPE, a family declared twice, a repeated
    series, a timestamp, a missing final newline."""
    assert text.endswith("\n"), "the last line must end with a newline"
    samples: dict[tuple[str, frozenset], float] = {}
    types: dict[str, str] = {}
    helps: set[str] = set()
    for line in text[:-1].split("\n"):
        if m := HELP.match(line):
            assert m.group(1) not in helps, f"HELP twice for {m.group(1)}"
            helps.add(m.group(1))
        elif m := TYPE.match(line):
            assert m.group(1) not in types and not any(n == m.group(1) for n, _ in samples), line
            types[m.group(1)] = m.group(2)
        elif m := SAMPLE.match(line):
            name = m.group(1)
            assert name in types and name in helps, f"sample before its HELP/TYPE: {line}"
            labels = frozenset(re.findall(LABEL, m.group(2) or ""))
            assert len({k for k, _ in labels}) == len(labels), f"repeated label: {line}"
            assert (name, labels) not in samples, f"series twice: {line}"
            samples[name, labels] = float(m.group(m.lastindex))
        else:
            pytest.fail(f"not in the exposition grammar: {line!r}")
    return samples, types


def summary(**values) -> Summary:
    s = Summary(started=1_795_000_000.25)
    s.finished = s.started + 3661.5
    for k, v in values.items():
        setattr(s, k, v)
    return s


def test_the_text_is_valid_exposition_format_and_holds_the_runs_numbers():
    s = summary(done=120, failed=3, skipped=25_000, quarantined=2, invalid=1, bytes_downloaded=46_800_000,
                bytes_written=39_000_123, exit_code=1)
    samples, types = parse(render(s, shard=(2, 5)))
    assert set(types.values()) == {"gauge"} and all(n.startswith("ambasync_") for n in types)
    shard = ("shard", "2/5")

    def value(name, *labels):
        return samples[f"ambasync_{name}", frozenset({shard, *labels})]

    assert value("last_run_start_timestamp_seconds") == 1_795_000_000.25
    assert value("last_run_duration_seconds") == 3661.5
    assert value("last_run_exit_code") == 1
    for outcome, n in (("done", 120), ("failed", 3), ("skipped", 25_000), ("quarantined", 2), ("invalid", 1)):
        assert value("last_run_experiments", ("outcome", outcome)) == n
    assert value("last_run_downloaded_bytes") == 46_800_000
    assert value("last_run_written_bytes") == 39_000_123
    assert len(samples) == 10  # nothing unlabelled or left over


def test_an_unsharded_run_is_labelled_as_such_so_shards_and_whole_runs_never_collide():
    unsharded, _ = parse(render(summary()))
    sharded, _ = parse(render(summary(), shard=(0, 3)))
    assert {dict(labels)["shard"] for _, labels in unsharded} == {"unsharded"}
    assert {dict(labels)["shard"] for _, labels in sharded} == {"0/3"}


def test_the_textfile_is_replaced_atomically_and_readable_by_another_user(tmp_path):
    path = textfile_path(tmp_path / "reports", "-shard0of3")
    assert path.name == "ambasync-shard0of3.prom"
    first = render(summary(done=1))
    assert write_textfile(path, first) == path and path.read_text() == first
    assert path.stat().st_mode & 0o777 == 0o644
    old_umask = os.umask(0o077)  # a restrictive service umask must not hide the file from node_exporter
    try:
        write_textfile(path, render(summary(done=2)))
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o644 and "outcome=\"done\"} 2\n" in path.read_text()
    assert sorted(p.name for p in path.parent.iterdir()) == ["ambasync-shard0of3.prom"]  # no temporary left


def test_a_failed_write_leaves_the_previous_textfile_whole(tmp_path):
    path = tmp_path / "ambasync.prom"
    write_textfile(path, render(summary(done=5)))
    before = path.read_text()

    with pytest.raises(UnicodeEncodeError):  # the write fails after the temporary file was opened
        write_textfile(path, render(summary(done=6)) + "\udc80")
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ambasync.prom"]


@pytest.mark.e2e
async def test_a_real_runs_textfile_counts_the_files_it_wrote(tmp_path):
    """A nightly job's alert reads this file: without it, a failing mirror goes unnoticed."""
    config = ReplicaConfig(n_coronal=5, n_sagittal=0, real_dir="/nonexistent", bad={100013: "404"})
    async with serve(config) as (_, url):
        await mirror(url, tmp_path)
    path = textfile_path(tmp_path / "reports")  # the run wrote it
    samples, _ = parse(path.read_text())
    files = sorted((tmp_path / "coronal").glob("*.mnc"))
    unsharded = ("shard", "unsharded")
    assert samples["ambasync_last_run_experiments", frozenset({unsharded, ("outcome", "done")})] == len(files) == 4
    assert samples["ambasync_last_run_experiments", frozenset({unsharded, ("outcome", "failed")})] == 1
    assert samples["ambasync_last_run_exit_code", frozenset({unsharded})] == 1
    assert samples["ambasync_last_run_written_bytes", frozenset({unsharded})] == sum(f.stat().st_size for f in files)
    assert samples["ambasync_last_run_downloaded_bytes", frozenset({unsharded})] > 0
    assert Path(path).parent == tmp_path / "reports"
