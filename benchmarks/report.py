"""The results table: what was measured, how it compares, and whether pgscout meets its targets.

Owns: the Metric and Goal vocabulary the workloads declare, collecting one value per metric,
target and round, the medians and min-max across rounds, the ratios pgscout/PgBouncer,
observed/bare, forward-only/bare and observed/forward-only (each the median of the rounds' own
ratios: the targets run interleaved within a round, under the same load, while the machine's
speed drifts between rounds, so a ratio of medians taken from different rounds would measure
the drift), the Markdown table and the machine description written beside it.
Must not: run anything against a database (workloads measure, this only summarises).
"""

from __future__ import annotations

import os
import platform
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

DIRECT = "direct"
PGBOUNCER = "pgbouncer"
BARE = "bare"
PGSCOUT = "pgscout"
FORWARD_ONLY = "pgscout-forward-only"
TARGET_LABELS = {
    DIRECT: "direct",
    PGBOUNCER: "PgBouncer",
    BARE: "bare uvloop",
    PGSCOUT: "pgscout",
    FORWARD_ONLY: "pgscout forward-only",
}
# Observation may cost at most this share of forward-only throughput (workload 9 of the brief).
OBSERVED_MIN_RATIO = 0.9


@dataclass(frozen=True)
class Goal:
    """A target from the brief, judged on one metric's values by target name, one per round."""

    text: str
    met: Callable[[dict[str, list[float]]], bool | None]  # None: a needed target was not measured


def at_least_vs_pgbouncer(ratio: float) -> Goal:
    return Goal(f"pgscout ≥ {ratio:.1f}× PgBouncer",
                lambda series: _when(paired_ratio(series, PGSCOUT, PGBOUNCER),
                                     lambda ours_over_theirs: ours_over_theirs >= ratio))


def not_above_pgbouncer() -> Goal:
    return Goal("pgscout ≤ PgBouncer",
                lambda series: _when(paired_ratio(series, PGSCOUT, PGBOUNCER),
                                     lambda ours_over_theirs: ours_over_theirs <= 1.0))


def at_most(limit: float, unit: str) -> Goal:
    return Goal(f"pgscout ≤ {limit:g} {unit}",
                lambda series: statistics.median(series[PGSCOUT]) <= limit
                if series.get(PGSCOUT) else None)


def _when(ratio: float | None, compare) -> bool | None:
    return None if ratio is None else compare(ratio)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    decimals: int = 0
    goal: Goal | None = None
    # Shown as this metric's value minus direct's value in the same round (added latency), so
    # drift between rounds cancels out.
    over_direct_of: str | None = None


@dataclass(frozen=True)
class WorkloadRows:
    title: str
    metrics: tuple[Metric, ...]


@dataclass
class Results:
    # metric key -> target -> values, one per round
    values: dict[str, dict[str, list[float]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))

    def add(self, target: str, measured: dict[str, float]) -> None:
        for key, value in measured.items():
            self.values[key][target].append(value)

    def series(self, metric: Metric) -> dict[str, list[float]]:
        if metric.over_direct_of is None:
            return dict(self.values.get(metric.key, {}))
        source = self.values.get(metric.over_direct_of, {})
        direct = source.get(DIRECT, [])
        return {target: [value - base for value, base in zip(values, direct)]
                for target, values in source.items() if direct}


def render_table(workloads: list[WorkloadRows], results: Results, targets: list[str]) -> str:
    # Over bare: what pgscout costs beyond the floor any asyncio proxy pays.
    header = ["Workload", "Metric", *(TARGET_LABELS[t] for t in targets),
              "pgscout / PgBouncer", "observed / bare", "forward-only / bare", "observed / forward-only",
              "Target", "Verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    observed_ratios: list[tuple[float, str]] = []
    for workload in workloads:
        for metric in workload.metrics:
            series = results.series(metric)
            cells = [_cell(series.get(target, []), metric.decimals) for target in targets]
            vs_bouncer = paired_ratio(series, PGSCOUT, PGBOUNCER)
            observed_vs_bare = paired_ratio(series, PGSCOUT, BARE)
            forward_only_vs_bare = paired_ratio(series, FORWARD_ONLY, BARE)
            observed = paired_ratio(series, PGSCOUT, FORWARD_ONLY)
            goals: list[tuple[str, bool | None]] = []
            if metric.goal is not None:
                goals.append((metric.goal.text, metric.goal.met(series)))
            if metric.higher_is_better and observed is not None:
                observed_ratios.append((observed, f"{workload.title}: {metric.label}"))
                goals.append((f"observed ≥ {OBSERVED_MIN_RATIO}× forward-only", observed >= OBSERVED_MIN_RATIO))
            lines.append("| " + " | ".join([
                workload.title, metric.label, *cells, _times(vs_bouncer), _times(observed_vs_bare),
                _times(forward_only_vs_bare), _times(observed),
                "; ".join(text for text, _ in goals) or "—",
                " / ".join(_verdict(met) for _, met in goals) or "—",
            ]) + " |")
    if observed_ratios:
        worst, where = min(observed_ratios)
        geomean = statistics.geometric_mean([ratio for ratio, _ in observed_ratios])
        blanks = ["—"] * len(targets)
        lines.append("| " + " | ".join([
            "9. observation on vs off", "worst / geometric mean of the throughput ratios above",
            *blanks, "—", "—", "—", f"{_times(worst)} / {_times(geomean)}",
            f"observed ≥ {OBSERVED_MIN_RATIO}× forward-only (worst: {where})",
            _verdict(worst >= OBSERVED_MIN_RATIO),
        ]) + " |")
    return "\n".join(lines) + "\n"


def paired_ratio(series: dict[str, list[float]], numerator: str, denominator: str) -> float | None:
    """The median over rounds of numerator / denominator in the same round (None when either was
    not measured in every round, or a denominator is not positive: an added latency near 0)."""
    ours, theirs = series.get(numerator, []), series.get(denominator, [])
    if not ours or len(ours) != len(theirs) or min(theirs) <= 0:
        return None
    return statistics.median(value / base for value, base in zip(ours, theirs))


def _cell(values: list[float], decimals: int) -> str:
    if not values:
        return "—"
    median = _number(statistics.median(values), decimals)
    if len(values) == 1:
        return median
    return f"{median} ({_number(min(values), decimals)}–{_number(max(values), decimals)})"


def _number(value: float, decimals: int) -> str:
    return f"{value:,.{decimals}f}"


def _times(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}×"


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def machine_description(pgbouncer_version: str, server_version: str, pgbench_version: str,
                        load_at_start: tuple[float, float, float]) -> str:
    cpu_model = "unknown"
    memory = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    load = " ".join(f"{value:.2f}" for value in load_at_start)
    return "\n".join([
        f"- CPUs (nproc): {os.cpu_count()}, {cpu_model}",
        f"- memory: {memory}",
        f"- kernel: {platform.system()} {platform.release()}",
        f"- Python: {platform.python_version()}",
        f"- PgBouncer: {pgbouncer_version}",
        f"- PostgreSQL server: {server_version}; {pgbench_version}",
        f"- load average when the run started: {load}",
    ]) + "\n"
