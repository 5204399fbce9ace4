"""Every exercise of every lab is graded, and its checks catch a wrong answer.

- Static, for every solution notebook: each exercise (a cell with a ``# BEGIN SOLUTION`` region) has at
  least one ``# Check`` cell; every check asserts something and every ``assert`` carries a message that
  says what is wrong; no ``# HINT:`` line contains a line of the solution verbatim; every exercise has a
  plausible wrong answer in ``tests/wrong_answers/<lab>.toml``.
- Run: the learner notebook with each exercise's wrong answer filled in is graded, and every exercise
  must come out FAILED (the solution passing its checks is what nbval proves on every CI run; the stub
  coming out NOT ATTEMPTED is what test_grading proves of the generator). Triton Lab 2.1's notebooks run
  in CI; the other labs start engines or load the LLM for minutes, so they run when
  COURSE_WRONG_ANSWERS=all (each lab's were run so before it was committed).

Wrong-answer files: one table per learner notebook (its path under 02-Labs/), one key per exercise
number, the code to put in place of the TODO stub (a list when the cell has several stubs)::

    ["Triton_Track/Lab-2.1-Triton_Server_Basics/01-Setup_and_Clients.ipynb"]
    1 = "ginp = grpcclient.InferInput('INPUT0', [1, 1], 'FP32')  # the wrong shape"
"""
from __future__ import annotations

import ast
import os
import re
import tomllib
from pathlib import Path

import nbformat
import pytest

from inference_course import grading
from inference_course.notebooks import BEGIN, END, HINT, learner_path

ROOT = Path(__file__).resolve().parents[1]
LABS = ROOT / "02-Labs"
WRONG = Path(__file__).with_name("wrong_answers")
SOLUTIONS = sorted(LABS.glob("*/*/solutions/*.ipynb"))
# Run in CI: the three quickest notebooks (about 10 s each on the cpu profile: Triton Lab 2.1 notebooks 01 and
# 03, Triton Lab 2.3 notebook 01), which prove the whole path (fill in, execute, grade) on real notebooks every
# run. The others start servers or engines again, and the CI budget (60 min on 2 cores) has no room for running
# them twice: COURSE_WRONG_ANSWERS=all runs them (each lab's were run so before it was committed).
CHEAP = ("Triton_Track/Lab-2.1-Triton_Server_Basics/01-", "Triton_Track/Lab-2.1-Triton_Server_Basics/03-",
         "Triton_Track/Lab-2.3-Backend_Integration/01-")


def rel(path: Path) -> str:
    return path.relative_to(LABS).as_posix()


def annotated(solution: Path):
    nb = nbformat.read(solution, as_version=4)
    grading.annotate(nb, rel(solution))
    return nb


def wrong_answers() -> dict[str, dict[str, object]]:
    tables = {}
    for path in sorted(WRONG.glob("*.toml")):
        for notebook, answers in tomllib.loads(path.read_text(encoding="utf-8")).items():
            assert notebook not in tables, f"{path.name}: [{notebook}] is also in another file"
            tables[notebook] = answers
    return tables


def _tree(source: str) -> ast.Module:
    # IPython lines (%magic, !shell) are not Python; top-level await is allowed in notebooks.
    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.split("\n"))
    return compile(code, "<cell>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def check_problems(source: str) -> list[str]:
    asserts = [node for node in ast.walk(_tree(source)) if isinstance(node, ast.Assert)]
    if not asserts:
        return ["asserts nothing"]
    return [f"line {a.lineno}: `assert` without a message (say what is wrong and give a hint)"
            for a in asserts if a.msg is None]


def solution_lines(source: str) -> list[str]:
    inside, found = False, []
    for line in source.split("\n"):
        if BEGIN.match(line):
            inside = True
        elif END.match(line):
            inside = False
        elif inside and not line.strip().startswith("#"):
            found.append(" ".join(line.split()))
    return [line for line in found if len(line) >= 12]


def hints(source: str) -> list[str]:
    return [" ".join(m.group("text").split()) for line in source.split("\n") if (m := HINT.match(line))]


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[rel(p) for p in SOLUTIONS])
def test_every_exercise_is_checked_and_its_hints_guide(solution):
    nb = annotated(solution)
    problems = []
    for ex in grading.exercises(nb):
        where = f"exercise {ex.number} (cell {ex.cell}, '{ex.title}')"
        if not ex.checks:
            problems.append(f"{where}: no '# Check' cell after it")
        for index in ex.checks:
            problems += [f"{where}, check cell {index}: {p}" for p in check_problems(nb.cells[index].source)]
        given = hints(nb.cells[ex.cell].source)
        problems += [f"{where}: a hint gives the solution's line `{line}` verbatim"
                     for line in solution_lines(nb.cells[ex.cell].source) if any(line in h for h in given)]
    assert not problems, f"{rel(solution)}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[rel(p) for p in SOLUTIONS])
def test_every_exercise_has_a_wrong_answer_to_try(solution):
    numbers = [str(ex.number) for ex in grading.exercises(annotated(solution))]
    learner = rel(learner_path(solution))
    have = wrong_answers().get(learner, {})
    assert sorted(have) == sorted(numbers), (
        f"tests/wrong_answers/: [\"{learner}\"] has answers for exercises {sorted(have)}, the notebook has "
        f"{numbers}: write one plausible wrong answer per exercise")


@pytest.mark.engine
@pytest.mark.parametrize("solution", SOLUTIONS, ids=[rel(p) for p in SOLUTIONS])
def test_checks_fail_on_wrong_answers(solution, tmp_path):
    learner = learner_path(solution)
    if not rel(learner).startswith(CHEAP) and os.environ.get("COURSE_WRONG_ANSWERS") != "all":
        pytest.skip("starts LLM engines again for minutes on the cpu profile; set COURSE_WRONG_ANSWERS=all")
    answers = {int(n): code for n, code in wrong_answers().get(rel(learner), {}).items()}
    assert answers, "no wrong answers for this notebook"
    filled = tmp_path / learner.name
    filled.write_text(nbformat.writes(grading.fill_in(nbformat.read(learner, as_version=4), answers)))
    outcome = grading.grade(filled, cwd=learner.parent)
    wrong = {r.exercise.number: (r.status, r.detail) for r in outcome if r.status != grading.FAILED}
    assert not wrong, f"{rel(learner)}: checks that did not catch the wrong answer: {wrong}"
