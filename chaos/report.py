"""The chaos suite's summary: one row per scenario run, printed at the end of the session and
written to chaos/results/summary.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = (
    "scenario",
    "faults injected",
    "published",
    "confirmed",
    "consumed",
    "lost",
    "client errors",
    "detection s",
    "longest stall s",
    "recovery s",
    "duration s",
    "verdict",
)


@dataclass
class ScenarioResult:
    scenario: str
    faults: list[str]
    published: int = 0  # publish attempts, republishes included
    confirmed: int = 0  # distinct message ids confirmed
    consumed: int = 0  # distinct confirmed ids consumed afterwards
    lost: int = 0  # confirmed ids never consumed
    client_errors: int = 0
    longest_stall: float = 0.0
    detection: float | None = None  # fault to the proxy's ending of the silent upstream (blackholes)
    recovery: float | None = None
    duration: float = 0.0
    violations: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "PASS" if not self.violations else "FAIL"

    def row(self) -> list[str]:
        return [
            self.scenario,
            "; ".join(self.faults),
            str(self.published),
            str(self.confirmed),
            str(self.consumed),
            str(self.lost),
            str(self.client_errors),
            "-" if self.detection is None else f"{self.detection:.1f}",
            f"{self.longest_stall:.1f}",
            "-" if self.recovery is None else f"{self.recovery:.1f}",
            f"{self.duration:.0f}",
            self.verdict,
        ]


def render(results: list[ScenarioResult]) -> str:
    """A Markdown table, then each failed scenario's violations."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r.row()) + " |" for r in results]
    lines += soak_totals(results)
    for r in results:
        for violation in r.violations:
            lines.append(f"- {r.scenario}: {violation}")
    return "\n".join(lines) + "\n"


def soak_totals(results: list[ScenarioResult]) -> list[str]:
    """With --repeat: per scenario, the runs, how many passed, and the message counts summed."""
    by_scenario: dict[str, list[ScenarioResult]] = {}
    for r in results:
        by_scenario.setdefault(r.scenario, []).append(r)
    if all(len(runs) == 1 for runs in by_scenario.values()):
        return []
    lines = [
        "",
        "| scenario (soak) | runs | passed | confirmed | consumed | lost | longest stall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario, runs in by_scenario.items():
        lines.append(
            f"| {scenario} | {len(runs)} | {sum(r.verdict == 'PASS' for r in runs)} | "
            f"{sum(r.confirmed for r in runs)} | {sum(r.consumed for r in runs)} | {sum(r.lost for r in runs)} | "
            f"{max(r.longest_stall for r in runs):.1f} |"
        )
    return lines


def write(results: list[ScenarioResult]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / "summary.md"
    path.write_text("# chaos suite summary\n\n" + render(results))
    return path
