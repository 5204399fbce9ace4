"""pytest plugin of the course (loaded with ``-p course_plugin``, see pyproject.toml): which notebooks
nbval collects, their cell timeout, and each notebook's time budget from the profile. A plugin rather
than a conftest.py so that its collection hook also applies to 02-Labs/."""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_NOTEBOOK_SECONDS: dict[str, float] = defaultdict(float)
_STARTED: dict[str, float] = {}


def pytest_ignore_collect(collection_path: Path, config):
    """nbval runs the solution notebooks only: learner notebooks stop at `raise NotImplementedError`."""
    if collection_path.suffix == ".ipynb" and (collection_path.parent.name != "solutions"
                                                or ".ipynb_checkpoints" in collection_path.parts):
        return True
    return None  # let pytest's own --ignore/--ignore-glob decide for everything else


def pytest_configure(config):
    from inference_course.profiles import get_profile

    if hasattr(config.option, "nbval_cell_timeout") and config.option.nbval_cell_timeout in (None, 2000):
        config.option.nbval_cell_timeout = get_profile().cell_timeout_s


def _notebook_of(item) -> str | None:
    path = Path(str(item.fspath))
    if path.suffix != ".ipynb":
        return None
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    started = time.monotonic()
    yield
    notebook = _notebook_of(item)
    if notebook:
        _NOTEBOOK_SECONDS[notebook] += time.monotonic() - started


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _NOTEBOOK_SECONDS:
        return
    from inference_course.profiles import get_profile

    profile = get_profile()
    terminalreporter.section(f"notebook time ({profile.name} profile, budget {profile.notebook_budget_s} s each)")
    over = []
    for notebook, seconds in sorted(_NOTEBOOK_SECONDS.items()):
        flag = "" if seconds <= profile.notebook_budget_s else "  OVER BUDGET"
        terminalreporter.write_line(f"{seconds:7.1f} s  {notebook}{flag}")
        if flag:
            over.append(notebook)
    if over:
        terminalreporter.write_line(f"{len(over)} notebook(s) over the {profile.name} budget", red=True)
        config._notebooks_over_budget = over


def pytest_sessionfinish(session, exitstatus):
    # The summary runs after this hook, so the budget is checked here too.
    from inference_course.profiles import get_profile

    budget = get_profile().notebook_budget_s
    if any(seconds > budget for seconds in _NOTEBOOK_SECONDS.values()) and session.exitstatus == 0:
        session.exitstatus = 1
