"""Freed memory kept for reuse (worker/malloc.py): message-sized buffers stop page-faulting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gradpool.server.config import parse_args as coordinator_args
from gradpool.worker.malloc import KEEP_FREED_ENV, keep_freed_bytes_from_env, keep_freed_memory
from gradpool.worker.server import parse_args as worker_args

# Fills a new 14 MB buffer (a joined request at batch 4096) per round while the
# last two are still held (as gRPC holds a message being sent while the next is
# built), its size alternating between two (a request and a reply): under
# glibc's default about every other one is a fresh mmap, a page fault per 4 KB
# page. Prints the faults of a round after the first few.
FAULTS_PER_ROUND = """
import resource, sys
from gradpool.worker.malloc import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
piece = bytes(7 * 2**20)
held = []
def round(i):
    held.append(b"".join([piece, piece, bytes(i % 2 * 2**16)]))
    del held[:-2]
for i in range(5):
    round(i)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(5, 35):
    round(i)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 30)
"""


def faults_per_round(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_ROUND, mode], capture_output=True, text=True, check=True)
    return float(out.stdout)


def test_kept_memory_serves_big_buffers_without_page_faults() -> None:
    if not sys.platform.startswith("linux"):  # no glibc: nothing to tune, and the function says so
        assert keep_freed_memory() is False
        return
    pages = 14 * 2**20 // 4096
    assert faults_per_round("default") > pages / 4  # fresh mappings: a fault per page
    assert faults_per_round("tuned") < pages / 100  # the same warm pages again


def test_zero_leaves_malloc_alone() -> None:
    assert keep_freed_memory(0) is False


def test_env_sets_the_amount_and_zero_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEEP_FREED_ENV, raising=False)
    assert keep_freed_bytes_from_env() == 512 * 2**20
    monkeypatch.setenv(KEEP_FREED_ENV, "0")
    assert keep_freed_bytes_from_env() == 0
    monkeypatch.setenv(KEEP_FREED_ENV, "lots")
    with pytest.raises(ValueError, match="GRADPOOL_KEEP_FREED_MB='lots' is not a number"):
        keep_freed_bytes_from_env()


@pytest.mark.parametrize("parse", [coordinator_args, worker_args])
def test_servers_take_the_flag_and_refuse_a_negative_amount(parse, capsys: pytest.CaptureFixture) -> None:
    extra = [] if parse is coordinator_args else ["--coordinator", "127.0.0.1:1"]
    assert parse(["--keep-freed-mb", "64", *extra]).keep_freed_mb == 64
    with pytest.raises(SystemExit):
        parse(["--keep-freed-mb", "-1", *extra])
    assert "must be positive" in capsys.readouterr().err
