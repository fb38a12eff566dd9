"""pytest plugin (entry point `pytest11`): `pytest --harness-results reports/<exp>/results.json`
or `pytest --harness-experiment experiments/<exp>.toml` turns every limit of the `[gates]` table
into its own test, one per configuration. Without either option it does nothing. An experiment
shipped with harness is named `harness:experiments/<exp>.toml` (`harness demo`'s is
`harness:experiments/demo.toml`).

The tests need no test file: the results file is added to pytest's arguments before they are
parsed, and `pytest_collect_file` collects exactly that file into gate items. So with no other
paths only the gates run; with test paths they run alongside. See docs/gates.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytest

from harness.errors import UserError
from harness.gates.limits import GateCheck, GatePlan, plan_gates

PLAN = pytest.StashKey[GatePlan]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "harness regression gates (docs/gates.md)")
    group.addoption("--harness-results", metavar="RESULTS", default=None,
                    help="results.json (or its report folder) whose numbers the gates check; "
                         "the gates come from its experiment.gates unless "
                         "--harness-experiment is given")
    group.addoption("--harness-experiment", metavar="TOML", default=None,
                    help="experiment file whose [gates] table to check "
                         "(harness:experiments/NAME.toml: one shipped with harness); the "
                         "results default to reports/<name>/results.json")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser,
                                  args: list[str]) -> None:
    # The only hook that may still add a path to the arguments (pytest's documented use of
    # `args`); pytest_configure is too late, the paths to collect are already decided.
    ns = early_config.known_args_namespace
    results, experiment = ns.harness_results, ns.harness_experiment
    asked_for_help = getattr(ns, "help", False) or getattr(ns, "version", False)
    if (results is None and experiment is None) or asked_for_help:
        return
    try:
        plan = plan_gates(results, experiment, early_config.invocation_params.dir)
    except UserError as exc:
        raise pytest.UsageError(f"harness gates: {exc}") from None
    early_config.stash[PLAN] = plan
    args.append(str(plan.results_path))


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> Optional[pytest.Collector]:
    plan = parent.config.stash.get(PLAN, None)
    if plan is None or file_path.name != plan.results_path.name:
        return None
    if file_path != plan.results_path and not file_path.samefile(plan.results_path):
        return None
    return GatesFile.from_parent(parent, path=file_path)


def pytest_report_header(config: pytest.Config) -> Optional[str]:
    plan = config.stash.get(PLAN, None)
    if plan is None:
        return None
    return (f"harness gates: {len(plan.checks)} checks of {plan.results_spelled}, "
            f"gates from {plan.gates_source}")


class GatesFile(pytest.File):
    """The results file, collected as one gate item per check."""

    def collect(self):
        for check in self.config.stash[PLAN].checks:
            yield GateItem.from_parent(self, name=check.test_name, check=check)


class GateFailed(AssertionError):
    """A gate's value past its limit; the message is the whole report."""


class GateItem(pytest.Item):
    def __init__(self, *, check: GateCheck, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check
        if check.skipped is not None:
            self.add_marker(pytest.mark.skip(reason=check.skipped))

    def runtest(self) -> None:
        if not self.check:
            raise GateFailed(self.check.failure_message())

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None):
        if isinstance(excinfo.value, GateFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, 0, self.name
