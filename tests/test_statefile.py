"""Keeping state records in memfds: the latest whole record is read, whatever instant a
write is cut short at; a sealed record cannot change."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloond.schema import RecordError
from balloond.statefile import StateFile


@pytest.fixture
def state_file() -> Iterator[StateFile]:
    keeper = StateFile.create()
    yield keeper
    os.close(keeper.fd)


def test_a_state_file_gives_the_latest_record(state_file: StateFile) -> None:
    with pytest.raises(RecordError, match="no whole record"):
        state_file.read()
    for size in (10, 100, 70_000, 5, 300_000, 300_001, 12):  # growing past slots, and back
        record = bytes([size % 251]) * size
        state_file.commit(record)
        assert state_file.read() == record
        assert StateFile(state_file.fd).read() == record  # as a successor finds it


def test_a_successor_commits_after_what_it_found(state_file: StateFile) -> None:
    state_file.commit(b"first")
    state_file.commit(b"second")
    successor = StateFile(state_file.fd)
    assert successor.read() == b"second"
    successor.commit(b"third")
    assert StateFile(state_file.fd).read() == b"third"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 200_000), min_size=2, max_size=12))
def test_a_commit_never_touches_the_latest_record(sizes: list[int]) -> None:
    """So a write cut short at any byte leaves the latest whole record readable."""
    keeper = StateFile.create()
    try:
        for n, size in enumerate(sizes):
            before = keeper.latest
            kept = os.pread(keeper.fd, before[1], before[0]) if before else b""
            keeper.commit(bytes([n % 256]) * size)
            if before:
                assert os.pread(keeper.fd, before[1], before[0]) == kept
    finally:
        os.close(keeper.fd)


def copy_of(fd: int) -> int:
    copy = os.memfd_create("copy")
    os.write(copy, os.pread(fd, os.fstat(fd).st_size, 0))
    return copy


@pytest.mark.parametrize("cut", [0.0, 0.01, 0.5, 0.99])
def test_a_write_cut_short_leaves_the_previous_record(state_file: StateFile, cut: float) -> None:
    """A SIGKILL inside pwrite: only a prefix of the new slot reaches the file."""
    state_file.commit(b"A" * 1000)
    state_file.commit(b"B" * 2000)
    # Learn what the next commit writes, and where, on a copy; write only a prefix of it.
    copy = copy_of(state_file.fd)
    try:
        twin = StateFile(copy)
        twin.commit(b"C" * 3000)
        assert twin.latest is not None
        offset, length = twin.latest
        written = os.pread(copy, length, offset)
    finally:
        os.close(copy)
    os.pwrite(state_file.fd, written[: int(length * cut)], offset)
    assert StateFile(state_file.fd).read() == b"B" * 2000
    os.pwrite(state_file.fd, written, offset)
    assert StateFile(state_file.fd).read() == b"C" * 3000  # the whole write is the new one


def test_a_corrupt_slot_is_not_read(state_file: StateFile) -> None:
    state_file.commit(b"old")
    state_file.commit(b"new")
    assert state_file.latest is not None
    offset, length = state_file.latest
    os.pwrite(state_file.fd, b"X", offset + length - 1)
    assert StateFile(state_file.fd).read() == b"old"
