"""Graded exercises: which cells are exercises and checks, and grading a learner's notebook.

In a solution notebook, an **exercise** is a code cell with a ``# BEGIN SOLUTION`` region (see
``notebooks.strip_solution``), and a **check** is a code cell whose first line starts with ``# Check``:
assertions, each with a message that says what is wrong and a hint, run on cases the learner did not see.
A check belongs to the exercise before it; an exercise may have several.

The generator writes this into the cells' metadata in nbgrader's schema (version 3): exercises are
nbgrader "solution" cells, checks are locked, autograded "tests" worth one point. So the learner
notebooks work with nbgrader's own ``nbgrader validate`` and its JupyterLab Validate button, and with
``python -m inference_course grade NOTEBOOK`` (``make grade NB=...``), which executes the notebook and
reports each exercise as passed, failed (with the check's message), not attempted (the TODO stub still
raises) or not checked. nbgrader decides whether a check cell passed (``nbgrader.utils.determine_grade``);
this module adds the per-exercise view nbgrader does not have: which exercise a failure belongs to, and
a stub that was never filled in reported as such rather than as a failure.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

CHECK = re.compile(r"^#\s*Check\b", re.IGNORECASE)
STUB_MESSAGE = "TODO: see the hints above"
SCHEMA_VERSION = 3
PASSED, FAILED, NOT_ATTEMPTED, NOT_CHECKED, NOT_RUN = "passed", "failed", "not attempted", "not checked", "not run"


class GradingError(ValueError):
    """A notebook whose checks cannot be attributed to an exercise."""


def is_exercise_source(source: str) -> bool:
    from .notebooks import BEGIN

    return any(BEGIN.match(line) for line in source.split("\n"))


def is_check_source(source: str) -> bool:
    first = next((line for line in source.split("\n") if line.strip()), "")
    return bool(CHECK.match(first.strip()))


def annotate(nb, where: str = "") -> None:
    """Write nbgrader metadata into a *solution* notebook's cells (in place), from markers and ``# Check``.

    Cells that are neither lose any nbgrader metadata they had, so renumbering stays consistent.
    """
    exercise, checks = 0, 0
    for index, cell in enumerate(nb.cells):
        cell.metadata.pop("nbgrader", None)
        if cell.cell_type != "code":
            continue
        is_exercise, is_check = is_exercise_source(cell.source), is_check_source(cell.source)
        if is_exercise and is_check:
            raise GradingError(f"{where} cell {index}: a cell is an exercise or a check, not both: move the "
                               "assertions after '# END SOLUTION' into a cell of their own that starts "
                               "with '# Check'")
        if is_exercise:
            exercise, checks = exercise + 1, 0
            cell.metadata["nbgrader"] = {"grade_id": f"exercise-{exercise}", "solution": True, "grade": False,
                                         "locked": False, "schema_version": SCHEMA_VERSION}
        elif is_check:
            if not exercise:
                raise GradingError(f"{where} cell {index}: a '# Check' cell before any exercise")
            checks += 1
            cell.metadata["nbgrader"] = {"grade_id": f"exercise-{exercise}-check-{checks}", "solution": False,
                                         "grade": True, "locked": True, "points": 1,
                                         "schema_version": SCHEMA_VERSION}


@dataclass
class Exercise:
    number: int
    cell: int
    title: str
    checks: list[int] = field(default_factory=list)


def exercises(nb) -> list[Exercise]:
    """The exercises of an annotated notebook (solution or learner), each with its check cells."""
    found: list[Exercise] = []
    heading = ""
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            for line in cell.source.split("\n"):
                if line.startswith("#"):
                    heading = line.lstrip("#").strip()
        meta = cell.metadata.get("nbgrader", {})
        grade_id = meta.get("grade_id", "")
        if meta.get("solution") and grade_id.startswith("exercise-"):
            found.append(Exercise(int(grade_id.split("-")[1]), index, heading))
        elif meta.get("grade") and grade_id.startswith("exercise-") and found:
            found[-1].checks.append(index)
    return found


@dataclass
class Result:
    exercise: Exercise
    status: str
    detail: str = ""


def _errors(cell) -> list[tuple[str, str]]:
    from .notebooks import ANSI

    return [(o.get("ename", ""), ANSI.sub("", o.get("evalue", ""))) for o in cell.get("outputs", [])
            if o.get("output_type") == "error"]


def _stub_raised(cell) -> bool:
    return any(name == "NotImplementedError" and STUB_MESSAGE in value for name, value in _errors(cell))


def _ran(cell) -> bool:
    return cell.get("execution_count") is not None or bool(cell.get("outputs"))


def results(executed_nb) -> list[Result]:
    """Per-exercise outcome of an executed notebook (outputs present)."""
    from nbgrader.utils import determine_grade

    out = []
    for ex in exercises(executed_nb):
        cells = [executed_nb.cells[ex.cell]] + [executed_nb.cells[i] for i in ex.checks]
        if not all(_ran(cell) for cell in cells):
            out.append(Result(ex, NOT_RUN, "the notebook stopped before this exercise ran (see above)"))
        elif any(_stub_raised(cell) for cell in cells) or STUB_MESSAGE in cells[0].source:
            out.append(Result(ex, NOT_ATTEMPTED, "the TODO stub still raises NotImplementedError"))
        elif not ex.checks:
            errors = _errors(cells[0])
            out.append(Result(ex, FAILED if errors else NOT_CHECKED,
                              f"{errors[0][0]}: {errors[0][1]}" if errors else "this exercise has no check cell"))
        else:
            failed = []
            for cell in cells[1:]:
                score, max_score = determine_grade(cell)
                if score is not None and score < max_score:
                    name, value = (_errors(cell) or [("error", "the check cell failed")])[0]
                    failed.append(f"{name}: {value}" if value else name)
            own = _errors(cells[0])
            if own:
                failed.insert(0, f"your code raised {own[0][0]}: {own[0][1]}")
            out.append(Result(ex, FAILED if failed else PASSED, "\n".join(failed)))
    return out


def execute(path: str | Path, timeout: int | None = None, cwd: str | Path | None = None):
    """Run a notebook top to bottom in its own folder (or ``cwd``), going on after errors; the executed
    notebook."""
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    from .profiles import get_profile

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    timeout = timeout or get_profile().cell_timeout_s
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(Path(cwd or path.parent).resolve())}})
    try:
        # The kernel's own stderr (jupyter_client's "running over TCP without encryption" warning) is not the
        # learner's: cell outputs, errors included, come back through the kernel's messages.
        client.execute(stderr=subprocess.DEVNULL)
    except DeadKernelError:
        pass  # exercises after the kernel's death are reported as not run
    return nb


def grade(path: str | Path, timeout: int | None = None, cwd: str | Path | None = None) -> list[Result]:
    nb = nbformat.read(Path(path), as_version=4)
    if not exercises(nb):
        raise GradingError(f"{path} has no graded exercises (no cells with nbgrader metadata): grade a "
                           "learner notebook of the course, or regenerate it with `make notebooks`")
    return results(execute(path, timeout, cwd))


def report(path: str | Path, outcome: list[Result]) -> str:
    lines = [f"{path}:"]
    for r in outcome:
        title = f" ({r.exercise.title})" if r.exercise.title else ""
        lines.append(f"  exercise {r.exercise.number}{title}: {r.status.upper()}")
        lines += [f"      {line}" for line in r.detail.splitlines() if r.status != PASSED]
    counts = {s: sum(r.status == s for r in outcome) for s in (PASSED, FAILED, NOT_ATTEMPTED, NOT_CHECKED, NOT_RUN)}
    lines.append("  " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" (of {len(outcome)})")
    return "\n".join(lines)


def fill_in(learner_nb, answers: dict[int, str | list[str]]):
    """A copy of a learner notebook with exercise ``n``'s TODO stub(s) replaced by ``answers[n]``.

    Each answer is code written as if at column 0; it is indented to where the stub was. An exercise
    cell with several stubs takes a list, one answer per stub, in order. Used to try checks against
    plausible wrong answers (tests/wrong_answers/) and by anyone who wants to script a submission.
    """
    import copy

    nb = copy.deepcopy(learner_nb)
    by_number = {ex.number: ex for ex in exercises(nb)}
    for number, answer in answers.items():
        if number not in by_number:
            raise GradingError(f"no exercise {number} (the notebook has {sorted(by_number)})")
        cell = nb.cells[by_number[number].cell]
        parts = [answer] if isinstance(answer, str) else list(answer)
        lines, out = cell.source.split("\n"), []
        for line in lines:
            if STUB_MESSAGE in line and line.strip().startswith("raise NotImplementedError"):
                if not parts:
                    raise GradingError(f"exercise {number} has more stubs than answers")
                indent = line[: len(line) - len(line.lstrip())]
                out += [indent + text if text.strip() else text for text in parts.pop(0).strip("\n").split("\n")]
            else:
                out.append(line)
        if parts:
            raise GradingError(f"exercise {number}: {len(parts)} answer(s) left over: the cell has fewer stubs")
        cell.source = "\n".join(out)
    return nb
