"""Numbers the solution notebooks' prose quotes are backed by that notebook's committed outputs.

A markdown cell that says "dynamic batching gained 2.54×" is only true of the run whose outputs are
committed beside it. When the notebook is re-run and its outputs change, the prose must change with them;
this test is what makes that impossible to forget. Every number followed by a unit (ms, s, 秒, %, ×, x, 倍,
GiB, tok/s, req/s, ...) in a markdown cell, outside code spans, must be one of:

- a number printed in that notebook's committed outputs, at the quoted precision (an output of 2.541
  supports "2.54×" and "2.5×", not "2.6×"); ranges ("290–370 秒") need both ends;
- a literal in the notebook's code cells (a setting the prose names: "max_tokens 64", "every 0.25 s");
- a profile's notebook time budget in seconds (``profiles.py``: "cpu profile 300 秒"), which nbval enforces;
- an entry in ``tests/prose_numbers_allowed.toml`` for that notebook, with the reason it is neither
  (a time budget, arithmetic done in the sentence). Entries that no longer match a quote are reported,
  so the list cannot rot either.

The units are matched loosely on purpose (any output number of the right value counts): the test is a
tripwire for prose left behind by a re-run, not a proof that a claim is right. Reading the claims against
the outputs is still a person's job.
"""
from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from inference_course.profiles import PROFILES

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_FILE = Path(__file__).with_name("prose_numbers_allowed.toml")

UNIT = (r"(?:ms|s|秒|毫秒|%|×|x|倍|GiB|GB|MiB|MB|KiB|KB|tok/s|tokens/s|token/s|req/s|requests/s|it/s|"
        r"分鐘|min|μs|us)")
NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
# A number (or a range of two) directly followed by a unit that is not the start of a longer word:
# "12 ms", "2.54×", "1,234 tok/s", "290–370 秒"; not "5 steps", "v2", "Lab 2.3", "3x3".
QUOTE = re.compile(rf"(?<![\w.,])(?P<low>{NUMBER})(?:\s?[–~-]\s?(?P<high>{NUMBER}))?\s?(?P<unit>{UNIT})(?![A-Za-z0-9])")
ANY_NUMBER = re.compile(rf"(?<![\d.])(?:{NUMBER})")
CODE_SPAN = re.compile(r"(`+)(?:.+?)\1", re.S)
FENCED = re.compile(r"^```.*?^```", re.S | re.M)
SECONDS = {"s", "秒"}
BUDGETS = [float(p.notebook_budget_s) for p in PROFILES.values()]


@dataclass(frozen=True)
class Quote:
    cell: int
    text: str        # as written, e.g. "2.54×" or "290–370 秒"
    numbers: tuple[str, ...]
    unit: str
    context: str


def solution_notebooks() -> list[Path]:
    return sorted((ROOT / "02-Labs").glob("*/*/solutions/*.ipynb"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT / "02-Labs").as_posix()


def _text(output: dict) -> str:
    join = lambda text: "".join(text) if isinstance(text, list) else text  # noqa: E731
    if "text" in output:
        return join(output["text"])
    data = output.get("data", {})
    return join(data.get("text/plain", "")) + "\n" + join(data.get("text/markdown", ""))


def numbers_in(text: str) -> list[float]:
    return [float(m.group().replace(",", "")) for m in ANY_NUMBER.finditer(text)]


def quotes_in(markdown: str, cell: int) -> list[Quote]:
    prose = CODE_SPAN.sub(" ", FENCED.sub(" ", markdown))
    found = []
    for m in QUOTE.finditer(prose):
        numbers = tuple(n for n in (m.group("low"), m.group("high")) if n)
        context = prose[max(0, m.start() - 50):m.end() + 20].replace("\n", " ")
        found.append(Quote(cell, " ".join(m.group().split()), numbers, m.group("unit"), context))
    return found


def decimals(number: str) -> int:
    return len(number.split(".")[1]) if "." in number else 0


def backed(number: str, candidates: list[float]) -> bool:
    value, places = float(number.replace(",", "")), decimals(number)
    return any(abs(round(x, places) - value) < 1e-9 for x in candidates)


def load_allowed() -> dict[str, dict[str, str]]:
    return tomllib.loads(ALLOWED_FILE.read_text(encoding="utf-8")) if ALLOWED_FILE.exists() else {}


def audit(path: Path, allowed: dict[str, str]) -> tuple[list[Quote], list[str]]:
    """(unsupported quotes, allow-list entries that match no quote) for one notebook."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    cells = notebook["cells"]
    printed = [x for c in cells for o in c.get("outputs", []) for x in numbers_in(_text(o))]
    literals = [x for c in cells if c["cell_type"] == "code" for x in numbers_in("".join(c["source"]))]
    quotes = [q for i, c in enumerate(cells) if c["cell_type"] == "markdown"
              for q in quotes_in("".join(c["source"]), i)]
    budgets = lambda q: BUDGETS if q.unit in SECONDS else []  # noqa: E731
    bad = [q for q in quotes if q.text not in allowed
           and not all(backed(n, printed) or backed(n, literals) or backed(n, budgets(q)) for n in q.numbers)]
    stale = [text for text in allowed if text not in {q.text for q in quotes}]
    return bad, stale


NOTEBOOKS = solution_notebooks()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[rel(p) for p in NOTEBOOKS])
def test_numbers_in_prose_are_in_the_outputs(path):
    allowed = load_allowed().get(rel(path), {})
    bad, stale = audit(path, allowed)
    problems = [f"cell {q.cell}: '{q.text}' is in no committed output and no code cell of this notebook: "
                f"…{q.context}…" for q in bad]
    problems += [f"'{text}' is allowed in {ALLOWED_FILE.name} but the prose no longer says it: remove the entry"
                 for text in stale]
    assert not problems, (
        f"{rel(path)}: the prose quotes numbers its outputs do not show. If the notebook was re-run, update "
        "the prose to the printed values (or point at the printed line instead of copying it); if a number "
        f"is a setting or arithmetic, say so in {ALLOWED_FILE.name}.\n  " + "\n  ".join(problems))


def test_every_allowed_entry_names_a_notebook_and_a_reason():
    names = {rel(p) for p in NOTEBOOKS}
    for notebook, entries in load_allowed().items():
        assert notebook in names, f"{ALLOWED_FILE.name}: [{notebook}] is not a solution notebook"
        for text, reason in entries.items():
            assert isinstance(reason, str) and len(reason.split()) >= 3, \
                f"{ALLOWED_FILE.name}: [{notebook}] '{text}' needs a reason (a few words), not {reason!r}"


# ------------------------------------------------------------------------------------------------------
# The checker itself, on a small synthetic notebook
# ------------------------------------------------------------------------------------------------------

def _notebook(tmp_path: Path, markdown: list[str], code: str, printed: str) -> Path:
    cells = [{"cell_type": "markdown", "metadata": {}, "source": m} for m in markdown]
    cells.append({"cell_type": "code", "metadata": {}, "source": code, "execution_count": 1,
                  "outputs": [{"output_type": "stream", "name": "stdout", "text": printed}]})
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_the_checker_finds_what_the_outputs_do_not_back(tmp_path):
    path = _notebook(
        tmp_path,
        ["Batching gained **2.54×** and reached 4,550 req/s; p50 was 12.3 ms (about 12 ms).",
         "It took 290–370 秒 in the 5 steps of Lab 2.3 with `max_tokens=999 ms` in code.",
         "We send a request every 0.25 s; the budget is 120 秒; it was 2.6× faster; 3x3 grid; 64 tokens.",
         f"Each notebook has {BUDGETS[0]:g} 秒 on one profile, not {BUDGETS[0]:g}%."],
        "INTERVAL_S = 0.25\n",
        "gain: 2.541x\nbest: 4,550.2 req/s\nttft p50 12.34 ms\nelapsed 290.4 s\n")
    bad, stale = audit(path, {"120 秒": "the notebook's time budget", "7 ms": "gone from the prose"})
    assert [q.text for q in bad] == ["290–370 秒", "2.6×", f"{BUDGETS[0]:g}%"]
    assert stale == ["7 ms"]
    assert quotes_in("v2 and Lab 2.3 with 5 steps, 3x3 and 10 GiB", 0)[0].text == "10 GiB"
    assert len(quotes_in("v2 and Lab 2.3 with 5 steps, 3x3 and 10 GiB", 0)) == 1
