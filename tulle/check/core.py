"""Results, checks, categories, and the three ways of printing a report (Linkerd's shape).

    tulle-control-plane
    -------------------
    √ NATS is running
    × the identity service is ready
        identity (pid 4242) is not running
        hint: the supervisor restarts it; `tulle logs --component identity` shows why it stopped

    Status check results are ×
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Generic, Iterable, Optional, TypeVar

F = TypeVar("F")


class Result(str, Enum):
    SUCCESS = "success"
    WARNING = "warning"
    ERROR = "error"


# Linkerd's marks (√ U+221A, ‼ U+203C, × U+00D7): scripts written for `linkerd check` read ours.
SYMBOLS = {Result.SUCCESS: "\u221a", Result.WARNING: "\u203c", Result.ERROR: "\u00d7"}
COLOURS = {Result.SUCCESS: "green", Result.WARNING: "yellow", Result.ERROR: "red"}


@dataclass(frozen=True)
class Outcome:
    result: Result
    error: str = ""
    hint: str = ""


OK = Outcome(Result.SUCCESS)


def ok() -> Outcome:
    return OK


def warning(error: str, hint: str) -> Outcome:
    """‼: works, but will not for long, or not as intended. Does not fail the check."""
    if not hint:
        raise ValueError("every warning carries a hint")
    return Outcome(Result.WARNING, error, hint)


def error(error: str, hint: str) -> Outcome:
    """×: broken. `tulle check` exits non-zero."""
    if not hint:
        raise ValueError("every error carries a hint")
    return Outcome(Result.ERROR, error, hint)


@dataclass(frozen=True)
class Check(Generic[F]):
    description: str
    run: Callable[[F], Optional[Outcome]]  # None: the check does not apply, and is not shown
    # Later checks need this one (an API to talk to): when it fails, nothing after it runs.
    fatal: bool = False
    # Waiting may heal it (a process restarting, a pod becoming ready): `--wait` retries.
    transient: bool = False


@dataclass(frozen=True)
class Category(Generic[F]):
    name: str
    checks: tuple[Check[F], ...]


@dataclass(frozen=True)
class CheckResult:
    category: str
    description: str
    result: Result
    error: str = ""
    hint: str = ""
    transient: bool = False


@dataclass
class Report:
    results: list[CheckResult] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return all(r.result is not Result.ERROR for r in self.results)

    @property
    def warnings(self) -> int:
        return sum(1 for r in self.results if r.result is Result.WARNING)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.result is Result.ERROR]

    @property
    def worth_waiting(self) -> bool:
        """Some check failed that waiting may heal (and `--wait` should retry)."""
        return any(r.transient for r in self.failures)

    def categories(self) -> list[tuple[str, list[CheckResult]]]:
        out: list[tuple[str, list[CheckResult]]] = []
        for r in self.results:
            if not out or out[-1][0] != r.category:
                out.append((r.category, []))
            out[-1][1].append(r)
        return out


def evaluate(categories: Iterable[Category[F]], facts: F) -> Report:
    """Run every check over the facts, in order. A check that raises is a × naming the bug,
    never a traceback; a failed fatal check ends the run."""
    report = Report()
    for category in categories:
        for check in category.checks:
            try:
                outcome = check.run(facts)
            except Exception as e:  # a bug in a check must not hide the other checks
                outcome = error(f"the check itself failed: {type(e).__name__}: {e}",
                                "this is a bug in tulle check; please report it with this line")
            if outcome is None:
                continue
            report.results.append(CheckResult(category.name, check.description, outcome.result, outcome.error,
                                              outcome.hint, check.transient))
            if check.fatal and outcome.result is Result.ERROR:
                return report
    return report


# --- output ------------------------------------------------------------------------------------


def _mark(result: Result, colour: bool) -> str:
    if not colour:
        return SYMBOLS[result]
    import click

    return click.style(SYMBOLS[result], fg=COLOURS[result], bold=True)


def _lines(r: CheckResult, colour: bool) -> list[str]:
    lines = [f"{_mark(r.result, colour)} {r.description}"]
    if r.result is not Result.SUCCESS:
        lines += [f"    {line}" for line in r.error.splitlines() or [""]]
        lines.append(f"    hint: {r.hint}")
    return lines


def summary(report: Report, colour: bool = False) -> str:
    return f"Status check results are {_mark(Result.SUCCESS if report.success else Result.ERROR, colour)}"


def render_table(report: Report, colour: bool = False) -> str:
    """Every category with every check, then the summary line."""
    blocks = []
    for name, results in report.categories():
        block = [name, "-" * len(name)]
        for r in results:
            block += _lines(r, colour)
        blocks.append("\n".join(block))
    return "\n\n".join(blocks + [summary(report, colour)]) + "\n"


def render_short(report: Report, colour: bool = False) -> str:
    """Only what is not √, under its category's header; then the summary line."""
    blocks = []
    for name, results in report.categories():
        bad = [r for r in results if r.result is not Result.SUCCESS]
        if bad:
            blocks.append("\n".join([name, "-" * len(name)] + [ln for r in bad for ln in _lines(r, colour)]))
    return "\n\n".join(blocks + [summary(report, colour)]) + "\n"


def to_json(report: Report) -> dict[str, Any]:
    """Linkerd's `check -o json`: hint and error only where there is one."""
    categories = []
    for name, results in report.categories():
        checks = []
        for r in results:
            item: dict[str, Any] = {"description": r.description}
            if r.result is not Result.SUCCESS:
                item["hint"] = r.hint
                item["error"] = r.error
            item["result"] = r.result.value
            checks.append(item)
        categories.append({"categoryName": name, "checks": checks})
    return {"success": report.success, "categories": categories}


def render_json(report: Report) -> str:
    return json.dumps(to_json(report), indent=2, ensure_ascii=False) + "\n"
