"""The idle-time arithmetic of ``benchmarks/timing.py`` (``profile_layer.py --gaps``, ``gpt_train.py
--profile``), on synthetic timelines."""

from benchmarks.timing import Gap, gaps_by_pair, idle_gaps


def test_idle_gaps_are_the_stretches_no_activity_covers() -> None:
    # Given out of order; b overlaps a, c nests inside b, d starts as b ends.
    timeline = [("e", 40.0, 45.0), ("a", 0.0, 10.0), ("c", 12.0, 14.0), ("b", 8.0, 20.0), ("d", 20.0, 30.0)]
    assert idle_gaps(timeline) == [Gap(10.0, "d", "e")]


def test_a_gap_follows_the_activity_that_ran_latest_into_it() -> None:
    # b nests inside a and ends first: the idle time after them is a's.
    timeline = [("a", 0.0, 100.0), ("b", 10.0, 20.0), ("c", 105.0, 110.0), ("d", 111.5, 112.0)]
    assert idle_gaps(timeline) == [Gap(5.0, "a", "c"), Gap(1.5, "c", "d")]


def test_no_gaps_without_idle_time() -> None:
    assert idle_gaps([]) == []
    assert idle_gaps([("a", 0.0, 5.0)]) == []
    assert idle_gaps([("a", 0.0, 5.0), ("b", 5.0, 6.0)]) == []


def test_gaps_by_pair_sums_per_step_and_orders_by_idle_time() -> None:
    gaps = [Gap(2.0, "x", "y"), Gap(7.0, "y", "x"), Gap(4.0, "x", "y"), Gap(1.0, "y", "z")]
    assert gaps_by_pair(gaps, steps=2) == [("y", "x", 3.5, 0.5), ("x", "y", 3.0, 1.0), ("y", "z", 0.5, 0.5)]
