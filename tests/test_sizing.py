"""Connection sizing arithmetic and its report (the server's limits given, no database)."""

import argparse

import pytest

from pgscout.control.sizing import add_budget_command, check


def test_steady_and_peak_demand_against_the_available_connections():
    verdict = check(pool_size=5, max_overflow=10, workers=4, replicas=6, max_connections=500,
                    superuser_reserved=3, reserved=2)
    assert verdict.processes == 24
    assert verdict.steady_demand == 120
    assert verdict.peak_demand == 360
    assert verdict.available == 495
    assert verdict.steady_headroom == 375
    assert verdict.peak_headroom == 135
    assert verdict.peak_headroom_percent == pytest.approx(100 * 135 / 495)
    assert verdict.verdict == "ok"


def test_other_clients_take_their_share():
    verdict = check(5, 0, 2, 2, max_connections=100, superuser_reserved=3, reserved=0, other_clients=10)
    assert verdict.available == 87
    assert verdict.peak_headroom == 67


def test_over_when_only_the_peak_does_not_fit():
    verdict = check(5, 10, 4, 6, max_connections=200, superuser_reserved=3, reserved=0)
    assert verdict.steady_headroom == 77
    assert verdict.peak_headroom == -163
    assert verdict.verdict == "over"
    assert verdict.max_per_process == 8  # 197 // 24


def test_over_when_even_the_steady_pools_do_not_fit():
    verdict = check(5, 10, 4, 6, max_connections=100, superuser_reserved=3, reserved=0)
    assert verdict.verdict == "over"
    assert "do not fit even at pool_size" in verdict.text()
    assert "at most 4 per process" in verdict.text()


def test_tight_under_ten_percent_headroom():
    # 20 of 22 available: 2 left, 9.1%.
    assert check(5, 0, 4, 1, max_connections=25, superuser_reserved=3, reserved=0).verdict == "tight"
    # 20 of 23 available: 3 left, 13%.
    assert check(5, 0, 4, 1, max_connections=26, superuser_reserved=3, reserved=0).verdict == "ok"
    # Exactly full: fits, no headroom at all.
    assert check(5, 0, 4, 1, max_connections=23, superuser_reserved=3, reserved=0).verdict == "tight"
    assert check(5, 0, 4, 1, max_connections=22, superuser_reserved=3, reserved=0).verdict == "over"


def test_reserved_connections_count_against_the_limit():
    assert check(10, 0, 1, 1, max_connections=15, superuser_reserved=3, reserved=0).verdict == "ok"
    assert check(10, 0, 1, 1, max_connections=15, superuser_reserved=3, reserved=3).verdict == "over"


def test_unlimited_overflow_is_over():
    verdict = check(5, -1, 1, 1, max_connections=100, superuser_reserved=3, reserved=0)
    assert verdict.peak_demand is None
    assert verdict.verdict == "over"
    assert "max_overflow -1 puts no bound on the pools" in verdict.text()


def test_nonsense_sizes_are_refused():
    with pytest.raises(ValueError):
        check(5, 10, 0, 1, max_connections=100, superuser_reserved=3, reserved=0)
    with pytest.raises(ValueError):
        check(5, -2, 1, 1, max_connections=100, superuser_reserved=3, reserved=0)


def test_report_text():
    text = check(5, 10, 4, 6, max_connections=200, superuser_reserved=3, reserved=0).text()
    assert text.splitlines() == [
        "Pools: 4 worker(s) x 6 replica(s) = 24 process(es), each pool_size 5 + max_overflow 10",
        "  steady demand: 5 x 24 = 120 connections",
        "  peak demand:   15 x 24 = 360 connections",
        "Server: max_connections 200 - superuser_reserved_connections 3 - reserved_connections 0 "
        "= 197 available",
        "Headroom: steady +77 connections, peak -163 connections (-82.7%)",
        "Verdict: OVER: the pools fit while idle but a burst that fills every overflow makes the "
        "server refuse connections (\"too many clients already\"); keep pool_size + max_overflow "
        "at most 8 per process",
    ]


def test_report_text_ok_and_tight():
    ok = check(5, 10, 1, 2, max_connections=100, superuser_reserved=3, reserved=0).text()
    assert ok.endswith("Verdict: OK: the pools fit even when every one of them is full\n")
    tight = check(5, 0, 4, 1, max_connections=25, superuser_reserved=3, reserved=0).text()
    assert "Verdict: TIGHT: the pools fit, but at peak only 2 connection(s) would be left" in tight
    assert "(+9.1%)" in tight


def test_budget_command_arguments():
    parser = argparse.ArgumentParser(prog="pgscout")
    add_budget_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["budget", "--pool-size", "5", "--max-overflow", "10", "--workers", "4",
                              "--replicas", "6", "--upstream", "postgresql://db:5432/app"])
    assert (args.pool_size, args.max_overflow, args.workers, args.replicas) == (5, 10, 4, 6)
    assert args.upstream == "postgresql://db:5432/app"
    assert callable(args.handler)
    defaults = parser.parse_args(["budget"])
    assert (defaults.pool_size, defaults.max_overflow, defaults.workers, defaults.replicas) == (5, 10, 1, 1)
    with pytest.raises(SystemExit):
        parser.parse_args(["budget", "--workers", "0"])
