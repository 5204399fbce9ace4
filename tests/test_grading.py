"""Graded exercises (``inference_course.grading``) on small synthetic notebooks, run in real kernels.

The grader must say passed on the solution, not attempted on the generated stub, failed (with the check's
message) on a wrong answer, and not run after a dead kernel; nbgrader's own validator must read the same
metadata the same way. The course's notebooks themselves are checked in test_notebooks.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from inference_course import grading
from inference_course.grading import FAILED, NOT_ATTEMPTED, NOT_CHECKED, NOT_RUN, PASSED
from inference_course.notebooks import clean_solution, dumps, make_learner

DOUBLE = "def double(x):\n    # BEGIN SOLUTION\n    # HINT: what is x plus x?\n    return 2 * x\n    # END SOLUTION"
CELLS = [
    ("markdown", "# A lab\n\n## 1. Double it"),
    ("code", "import math"),
    ("code", DOUBLE),
    ("code", "# Check: exercise 1, on inputs the exercise did not show\n"
             "assert double(3) == 6, f'double(3) returned {double(3)!r}, not 6: the hint says what to compute'\n"
             "assert double(-1.5) == -3.0, 'double(-1.5) should be -3.0: negative and fractional inputs too'"),
    ("markdown", "## 2. A mean"),
    ("code", "values = [1, 2, 3, 6]\n# BEGIN SOLUTION\n# HINT: sum over count\nmean = sum(values) / len(values)\n"
             "# END SOLUTION"),
    ("code", "# Check: exercise 2\nassert math.isclose(mean, 3.0), f'mean is {mean}, expected 3.0'"),
    ("code", "# check: a second check of exercise 2\nassert isinstance(mean, float), 'mean should be a float'"),
    ("markdown", "## 3. Free text"),
    ("code", "def note():\n    # BEGIN SOLUTION\n    return 'anything'\n    # END SOLUTION"),
]


def write(path: Path, cells) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(s) if kind == "markdown" else nbformat.v4.new_code_cell(s)
                for kind, s in cells]
    path.write_text(dumps(nb))
    return path


@pytest.fixture
def solution(tmp_path) -> Path:
    (tmp_path / "solutions").mkdir()
    path = write(tmp_path / "solutions" / "01-Test.ipynb", CELLS)
    clean_solution(path)  # what `make notebooks` does to a solution: annotates it
    return path


STUB = 'raise NotImplementedError("TODO: see the hints above")'


def learner_of(solution: Path, answer: tuple[str, str] | None = None) -> Path:
    """The generated learner notebook; ``answer`` = (text of the exercise cell, code put in place of its stub)."""
    nb = make_learner(nbformat.read(solution, as_version=4), str(solution))
    if answer:
        cell = next(c for c in nb.cells if answer[0] in c.source and STUB in c.source)
        cell.source = cell.source.replace(STUB, answer[1])
    path = solution.parent.parent / solution.name
    path.write_text(dumps(nb))
    return path


def statuses(outcome):
    return [r.status for r in outcome]


def test_annotate_writes_nbgrader_metadata(solution):
    nb = nbformat.read(solution, as_version=4)
    meta = [c.metadata.get("nbgrader") for c in nb.cells]
    ids = [m["grade_id"] if m else None for m in meta]
    assert ids == [None, None, "exercise-1", "exercise-1-check-1", None, "exercise-2", "exercise-2-check-1",
                   "exercise-2-check-2", None, "exercise-3"]
    assert meta[2]["solution"] and not meta[2]["grade"]
    assert meta[3]["grade"] and meta[3]["locked"] and meta[3]["points"] == 1 and not meta[3]["solution"]
    learner = nbformat.read(learner_of(solution), as_version=4)
    assert [c.metadata.get("nbgrader") for c in learner.cells] == meta
    assert [(e.number, e.cell, e.checks, e.title) for e in grading.exercises(learner)] == [
        (1, 2, [3], "1. Double it"), (2, 5, [6, 7], "2. A mean"), (3, 9, [], "3. Free text")]


@pytest.mark.parametrize("cells, message", [
    ([("code", "# Check: too early\nassert True")], "before any exercise"),
    ([("code", "# Check: both\n" + DOUBLE)], "an exercise or a check, not both"),
])
def test_annotate_refuses_checks_it_cannot_attribute(tmp_path, cells, message):
    path = write(tmp_path / "bad.ipynb", cells)
    with pytest.raises(grading.GradingError, match=message):
        grading.annotate(nbformat.read(path, as_version=4), str(path))


def test_the_solution_passes_and_an_unchecked_exercise_is_said_to_be_unchecked(solution):
    outcome = grading.grade(solution)
    assert statuses(outcome) == [PASSED, PASSED, NOT_CHECKED]


def test_the_generated_stub_is_not_attempted(solution):
    outcome = grading.grade(learner_of(solution))
    assert statuses(outcome) == [NOT_ATTEMPTED, NOT_ATTEMPTED, NOT_ATTEMPTED]


def test_a_wrong_answer_fails_with_the_checks_message(solution):
    learner = learner_of(solution, ("def double", "return x + 2"))
    outcome = grading.grade(learner)
    assert statuses(outcome)[0] == FAILED
    assert "AssertionError: double(3) returned 5, not 6" in outcome[0].detail
    assert statuses(outcome)[1:] == [NOT_ATTEMPTED, NOT_ATTEMPTED]


def test_an_error_in_the_learners_code_is_named(solution):
    learner = learner_of(solution, ("values =", "mean = sum(values) / len(valuez)"))
    outcome = grading.grade(learner)
    assert statuses(outcome)[1] == FAILED
    assert outcome[1].detail.startswith("your code raised NameError: name 'valuez' is not defined")


def test_exercises_after_a_dead_kernel_are_not_run(solution):
    learner = learner_of(solution, ("values =", "import os\nos._exit(1)"))
    outcome = grading.grade(learner, timeout=60)
    assert statuses(outcome) == [NOT_ATTEMPTED, NOT_RUN, NOT_RUN]


def test_nbgrader_validate_reads_the_same_metadata(solution):
    from nbgrader.validator import Validator

    assert Validator().validate(str(solution)) == {}
    failed = Validator().validate(str(learner_of(solution)))["failed"]
    assert [f["source"].splitlines()[0] for f in failed] == [
        "# Check: exercise 1, on inputs the exercise did not show", "# Check: exercise 2",
        "# check: a second check of exercise 2"]


def test_the_command_line_reports_each_exercise_and_fails(solution):
    learner = learner_of(solution, ("def double", "return x + 2"))
    run = subprocess.run([sys.executable, "-m", "inference_course", "grade", str(learner)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "exercise 1 (1. Double it): FAILED" in run.stdout
    assert "double(3) returned 5, not 6" in run.stdout
    assert "exercise 2 (2. A mean): NOT ATTEMPTED" in run.stdout
    assert "1 failed, 2 not attempted (of 3)" in run.stdout
    run = subprocess.run([sys.executable, "-m", "inference_course", "grade", str(solution)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed, 1 not checked (of 3)" in run.stdout
