"""A SqliteStore writer killed with SIGKILL loses no acknowledged write and leaves a healthy file.

A child process writes in a loop and prints the name of each object as soon as
write() has returned (the write is acknowledged); the test kills it at a random
point of the burst, reopens the store and checks that every acknowledged object
is there, that the store passes SQLite's integrity check, and that it takes
new writes. (SIGKILL exercises crash recovery of the WAL; surviving power loss
additionally rests on synchronous=FULL, checked in test_store_sqlite.py.)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from policyagent.model.objects import Kind
from policyagent.model.writes import Put
from policyagent.store.sqlite import SqliteStore

TESTS_DIR = Path(__file__).resolve().parent

# Each write creates a filter list of 20 filters and updates one shared filter
# action, so the kill can land in the middle of a multi-row transaction.
WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[3])
    from builders import big_filter_list, filter_action
    from policyagent.model.objects import Kind
    from policyagent.model.writes import Put
    from policyagent.store.sqlite import SqliteStore

    store = SqliteStore(sys.argv[1])
    prefix = sys.argv[2]
    counter = store.find(Kind.FILTER_ACTION, "counter")
    if counter is None:
        counter = store.write([Put(filter_action("counter"))], principal="crash").written[0]
    i = 0
    while True:
        name = f"{prefix}-{i}"
        counter.description = name
        result = store.write([Put(big_filter_list(name, 20)), Put(counter)], principal="crash", context=name)
        counter = result.written[1]
        sys.stdout.write(name + "\\n")
        sys.stdout.flush()
        i += 1
    """
)


def run_and_kill(path: Path, prefix: str, kill_after: int) -> list[str]:
    """Start the writer, SIGKILL it once `kill_after` writes are acknowledged; the acknowledged names."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), prefix, str(TESTS_DIR)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    acked: list[str] = []
    try:
        while len(acked) < kill_after:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"writer exited early ({proc.wait()}): {proc.stderr.read()}")
            acked.append(line.rstrip("\n"))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        # Lines the writer printed before it died were acknowledged too; a line
        # cut short (no newline) was not.
        rest = proc.stdout.read()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    acked.extend(line for line in rest.splitlines(keepends=True) if line.endswith("\n"))
    return [name.rstrip("\n") for name in acked]


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_write(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    rng = random.Random(1234)
    acked: list[str] = []
    for round_ in range(6):
        acked += run_and_kill(path, f"r{round_}", kill_after=rng.randint(20, 120))
        with SqliteStore(path) as store:
            assert store.integrity_problems() == []
            contents, revision = store.snapshot()
            names = {fl.name for fl in contents.filter_lists}
            missing = [name for name in acked if name not in names]
            assert missing == [], f"round {round_}: acknowledged but lost: {missing}"
            # Nothing half-written: each stored list is whole, and the counter
            # (updated in the same transactions) names the last list stored.
            assert all(len(fl.filters) == 20 for fl in contents.filter_lists)
            counter = store.find(Kind.FILTER_ACTION, "counter")
            assert counter is not None
            last_list = max(contents.filter_lists, key=lambda fl: fl.revision)
            assert counter.description == last_list.name and counter.revision == last_list.revision
            # The change log agrees with the objects: 2 entries per write, plus
            # the counter's creation and the updates made after earlier crashes.
            log = store.changes(limit=100_000)
            assert len(log) == 2 * len(contents.filter_lists) + 1 + round_
            assert log[-1].revision == revision
            # And the store takes writes again.
            counter.description = f"after crash {round_}"
            assert store.write([Put(counter)], principal="test").store_revision == revision + 1
