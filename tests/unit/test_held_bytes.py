"""Unit: the bound on bytes a parser holds without progress (proxy.codec.held)."""

from __future__ import annotations

from proxy.codec.held import HeldBytes


def test_reads_in_a_row_add_up_until_they_pass_the_limit() -> None:
    held = HeldBytes()
    assert not held.over(60, 100)
    assert not held.over(40, 100)  # exactly at the limit is still within it
    assert held.over(1, 100)
    assert held.count == 101


def test_progress_starts_the_count_again() -> None:
    held = HeldBytes()
    held.over(90, 100)
    held.count = 0  # what the parsers do at a message's start or a body byte
    assert not held.over(90, 100)
    assert repr(held) == "HeldBytes(90)"
