"""Checks of the theory documents in 01-Theory/ (fast, no network).

- Every relative Markdown link resolves: the file exists and, if the link has an anchor (#heading),
  the target file has a heading whose GitHub-style slug is that anchor (CJK headings included).
- Every lab the documents name exists in 02-Labs: paths like ``02-Labs/...`` and lab folder names like
  ``Lab-2.2-Inference_Optimization`` in plain text or code spans, unless the mention is followed by
  the marker 「（尚未建置）」 ("not built yet"). A marked lab that does exist is reported too, so the
  marker is removed once the lab is built.
- Every footnote reference has a definition.
- Mermaid blocks are non-empty and start with a known diagram type; code fences are closed.
- Both documents exist, and each has exercises in every numbered section, a glossary and an appendix.
- Computed numbers (parameter counts, KV bytes, speculative decoding tables, burn rates) are recomputed,
  and the numbers quoted from Lab 2.1 notebook 01 are compared with that notebook's committed outputs.

Each failure message names the file, the line and the exact link or mention that is broken.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THEORY = ROOT / "01-Theory"
LABS = ROOT / "02-Labs"
DOCUMENTS = ("2.1-Inference_Engines.md", "2.2-Serving_and_Optimization.md")
NOT_BUILT = "（尚未建置）"

MERMAID_TYPES = (
    "flowchart", "graph", "sequenceDiagram", "classDiagram", "stateDiagram-v2", "stateDiagram",
    "erDiagram", "journey", "gantt", "pie", "quadrantChart", "requirementDiagram", "gitGraph",
    "mindmap", "timeline", "xychart-beta", "sankey-beta", "block-beta", "C4Context",
)

FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w-]*)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) or [text](target "title"); images too. Footnote references [^x] never match.
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LAB_PATH = re.compile(r"02-Labs/[A-Za-z0-9_.\-/]*[A-Za-z0-9_\-/]")
LAB_NAME = re.compile(r"\bLab-2\.\d-[A-Za-z][A-Za-z_]*")
FOOTNOTE_REF = re.compile(r"\[\^([^\]\s]+)\](?!:)")
FOOTNOTE_DEF = re.compile(r"^\[\^([^\]\s]+)\]:", re.M)


# --------------------------------------------------------------------------------------------------
# Markdown helpers
# --------------------------------------------------------------------------------------------------

def split_fences(text: str):
    """Yield (line_number, line, fence_language_or_None) for every line; fence lines get language ''.

    Lines inside a fenced code block carry the block's language (``"mermaid"``, ``"text"``, ``""``);
    ordinary lines carry None. Raises ValueError on an unclosed fence.
    """
    out, in_fence, marker, lang, opened_at = [], False, "", None, 0
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if not in_fence and match:
            in_fence, marker, lang, opened_at = True, match.group(1), match.group(2), number
            out.append((number, line, ""))
            continue
        if in_fence and line.strip().startswith(marker) and line.strip().strip(marker[0]) == "":
            in_fence = False
            out.append((number, line, ""))
            continue
        out.append((number, line, lang if in_fence else None))
    if in_fence:
        raise ValueError(f"code fence opened on line {opened_at} is never closed")
    return out


def strip_inline_markup(text: str) -> str:
    """The visible text of a heading: links become their text, code spans their content."""
    text = LINK.sub(lambda m: m.group(1), text)
    text = INLINE_CODE.sub(lambda m: m.group(2), text)
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    return re.sub(r"(\*\*|__|\*|~~)", "", text)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading (the github-slugger rules).

    Lower-case; drop every character that is not a letter, mark, number, space, '-' or '_'
    (so ASCII punctuation, CJK punctuation such as ：（）「」、，and symbols such as ÷ disappear,
    while CJK characters stay); each space becomes '-'. Spaces are not collapsed.
    """
    text = strip_inline_markup(heading).strip().lower()
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch in "-_" or ch == " " or category[0] in "LMN":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


@lru_cache(maxsize=None)
def anchors_of(path: Path) -> frozenset:
    """All heading anchors GitHub generates for a Markdown file (duplicates get -1, -2, ...)."""
    seen: dict[str, int] = {}
    anchors = set()
    for _, line, lang in split_fences(path.read_text(encoding="utf-8")):
        if lang is not None:
            continue
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        if slug in seen:
            seen[slug] += 1
            anchors.add(f"{slug}-{seen[slug]}")
        else:
            seen[slug] = 0
            anchors.add(slug)
    return frozenset(anchors)


def prose_lines(path: Path):
    """(line_number, line) of the document outside fenced code blocks."""
    return [(n, line) for n, line, lang in split_fences(path.read_text(encoding="utf-8")) if lang is None]


# --------------------------------------------------------------------------------------------------
# Checkers: each returns a list of human-readable problems ("file:line: what is wrong")
# --------------------------------------------------------------------------------------------------

def check_links(path: Path) -> list[str]:
    problems = []
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for number, line in prose_lines(path):
        scan = INLINE_CODE.sub("", line)  # links inside code spans are not links
        for match in LINK.finditer(scan):
            target = match.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            target_path = (path.parent / file_part).resolve() if file_part else path
            where = f"{rel}:{number}: link [{match.group(1)[:40]}]({target})"
            if not target_path.exists():
                problems.append(f"{where} -> file {file_part} does not exist")
                continue
            if anchor:
                if target_path.is_dir() or target_path.suffix.lower() != ".md":
                    problems.append(f"{where} -> anchor #{anchor} points into a non-Markdown target")
                elif anchor not in anchors_of(target_path):
                    known = ", ".join(sorted(anchors_of(target_path))[:8])
                    problems.append(f"{where} -> no heading with anchor #{anchor} in {file_part or rel} "
                                    f"(some anchors there: {known} ...)")
    return problems


def _marked_not_built(line: str, end: int) -> bool:
    """True when the mention ending at ``end`` is followed by the not-built marker."""
    rest = line[end:].lstrip("`* ")
    return rest.startswith(NOT_BUILT)


def _lab_dirs() -> dict[str, Path]:
    return {p.name: p for p in LABS.glob("*/Lab-*") if p.is_dir()} if LABS.exists() else {}


def check_lab_mentions(path: Path) -> list[str]:
    problems = []
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    labs = _lab_dirs()
    for number, line in prose_lines(path):
        # Link targets are checked by check_links; scan the rest of the line (text and code spans).
        text = LINK.sub(lambda m: "[" + m.group(1) + "]", line)
        for match in LAB_PATH.finditer(text):
            mention = match.group(0).rstrip("/.")
            marked = _marked_not_built(text, match.end())
            exists = (ROOT / mention).exists()
            if not exists and not marked:
                problems.append(f"{rel}:{number}: lab path `{mention}` does not exist in the repository "
                                f"(build it, fix the path, or mark it {NOT_BUILT})")
            elif exists and marked:
                problems.append(f"{rel}:{number}: `{mention}` is marked {NOT_BUILT} but exists: remove the marker")
        for match in LAB_NAME.finditer(text):
            if text[max(0, match.start() - 1)] == "/" and match.start() > 0:
                continue  # part of a 02-Labs/... path, checked above
            name = match.group(0)
            marked = _marked_not_built(text, match.end())
            if name not in labs and not marked:
                problems.append(f"{rel}:{number}: lab `{name}` has no folder 02-Labs/*/{name} "
                                f"(build it, fix the name, or mark it {NOT_BUILT})")
            elif name in labs and marked:
                problems.append(f"{rel}:{number}: lab `{name}` is marked {NOT_BUILT} but "
                                f"{labs[name].relative_to(ROOT)} exists: remove the marker")
    return problems


def check_footnotes(path: Path) -> list[str]:
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    text = "\n".join(line for _, line in prose_lines(path))
    defined = set(FOOTNOTE_DEF.findall(text))
    problems = []
    for number, line in prose_lines(path):
        for ref in FOOTNOTE_REF.findall(INLINE_CODE.sub("", line)):
            if ref not in defined:
                problems.append(f"{rel}:{number}: footnote [^{ref}] has no definition")
    return problems


def check_mermaid(path: Path) -> list[str]:
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    try:
        lines = split_fences(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        return [f"{rel}: {exc}"]
    blocks: list[tuple[int, list[str]]] = []
    current = None
    for number, line, lang in lines:
        if lang == "mermaid":
            current[1].append(line)
        elif lang == "" and current is None and FENCE.match(line) and FENCE.match(line).group(2) == "mermaid":
            current = (number, [])
        elif lang == "" and current is not None:
            blocks.append(current)
            current = None
    problems = []
    for start, body in blocks:
        content = [ln.strip() for ln in body if ln.strip() and not ln.strip().startswith("%%")]
        if not content:
            problems.append(f"{rel}:{start}: mermaid block is empty")
            continue
        first = content[0].split()[0]
        if first not in MERMAID_TYPES:
            problems.append(f"{rel}:{start}: mermaid block starts with {first!r}, "
                            f"not a known diagram type ({', '.join(MERMAID_TYPES[:6])}, ...)")
    return problems


def mermaid_block_count(path: Path) -> int:
    return sum(1 for _, line, lang in split_fences(path.read_text(encoding="utf-8"))
               if lang == "" and FENCE.match(line) and FENCE.match(line).group(2) == "mermaid")


# --------------------------------------------------------------------------------------------------
# Tests on the real documents
# --------------------------------------------------------------------------------------------------

def theory_markdown_files() -> list[Path]:
    return sorted(THEORY.glob("*.md"))


def _report(problems: list[str]) -> str:
    return f"{len(problems)} problem(s):\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("name", DOCUMENTS)
def test_document_exists(name):
    assert (THEORY / name).is_file(), f"01-Theory/{name} is missing"


@pytest.mark.parametrize("path", theory_markdown_files(), ids=lambda p: p.name)
def test_internal_links_and_anchors_resolve(path):
    problems = check_links(path)
    assert not problems, _report(problems)


@pytest.mark.parametrize("path", theory_markdown_files(), ids=lambda p: p.name)
def test_named_labs_exist(path):
    problems = check_lab_mentions(path)
    assert not problems, _report(problems)


@pytest.mark.parametrize("path", theory_markdown_files(), ids=lambda p: p.name)
def test_footnotes_are_defined(path):
    problems = check_footnotes(path)
    assert not problems, _report(problems)


@pytest.mark.parametrize("path", theory_markdown_files(), ids=lambda p: p.name)
def test_mermaid_blocks_are_valid(path):
    problems = check_mermaid(path)
    assert not problems, _report(problems)


@pytest.mark.parametrize("name", DOCUMENTS)
def test_document_structure(name):
    """Each numbered section ends with exercises; a glossary, a Mermaid diagram and an answer appendix exist."""
    path = THEORY / name
    headings = [(n, HEADING.match(line)) for n, line in prose_lines(path)]
    headings = [(n, len(m.group(1)), m.group(2)) for n, m in headings if m]
    problems = []
    sections = [(i, h) for i, h in enumerate(headings) if h[1] == 2 and re.match(r"\d+\.", h[2])]
    assert sections, f"01-Theory/{name} has no numbered '## N.' sections"
    for index, (position, (line, _, title)) in enumerate(sections):
        end = sections[index + 1][0] if index + 1 < len(sections) else len(headings)
        inside = [h[2] for h in headings[position + 1:end] if h[1] > 2]
        if not any("練習" in t for t in inside):
            problems.append(f"01-Theory/{name}:{line}: section '{title}' has no exercises heading (練習)")
    titles = [h[2] for h in headings if h[1] == 2]
    if not any("詞彙表" in t for t in titles):
        problems.append(f"01-Theory/{name}: no '## 詞彙表' glossary section")
    if not any(t.startswith("附錄") for t in titles):
        problems.append(f"01-Theory/{name}: no '## 附錄 ...' section with worked answers")
    if mermaid_block_count(path) == 0:
        problems.append(f"01-Theory/{name}: no Mermaid diagram")
    assert not problems, _report(problems)


# --------------------------------------------------------------------------------------------------
# Numbers: computed ones are recomputed, measured ones are compared with the committed notebook
# --------------------------------------------------------------------------------------------------

FIRST_INFERENCE = LABS / "vLLM_Track/Lab-2.1-vLLM_Deployment/solutions/01-First_Inference.ipynb"


def _doc(name: str) -> str:
    return (THEORY / name).read_text(encoding="utf-8")


def _missing(text: str, snippets) -> list[str]:
    return [s for s in snippets if s not in text]


def test_computed_parameter_and_kv_numbers_match_the_package():
    """Parameter counts and KV bytes/token quoted in 2.1 and 2.2 follow from models.py's shapes."""
    import sys

    sys.path.insert(0, str(ROOT / "src"))
    from inference_course.models import SHAPES, parameter_count

    llama = SHAPES["llama-3.1-8b"]
    n = parameter_count(llama)
    kv = 2 * llama["num_hidden_layers"] * llama["num_key_value_heads"] * llama["head_dim"] * 2
    qwen = SHAPES["qwen2.5-1.5b"]
    kv_qwen = 2 * qwen["num_hidden_layers"] * qwen["num_key_value_heads"] * (
        qwen["hidden_size"] // qwen["num_attention_heads"]) * 2
    expected_21 = [f"{n:,} 個參數", f"bf16 **{n * 2 / 1e9:.2f} GB**", f"**{kv:,} bytes/token",
                   f"**{kv_qwen:,} bytes/token**"]
    expected_22 = [f"（{n:,} 個參數）", f"| BF16 | 2 | {n * 2 / 1e9:.2f} GB | {3.35e12 / (n * 2):.0f} tok/s |",
                   f"| FP8 / INT8 | 1 | {n / 1e9:.2f} GB | {3.35e12 / n:.0f} tok/s |"]
    problems = [f"2.1: {s}" for s in _missing(_doc(DOCUMENTS[0]), expected_21)]
    problems += [f"2.2: {s}" for s in _missing(_doc(DOCUMENTS[1]), expected_22)]
    assert not problems, "numbers computed from models.py not found in the documents:\n  " + "\n  ".join(problems)


def test_speculative_decoding_tables_are_recomputed():
    """Every row of the two tables in 2.2 section 3.1, from (1 - a^(k+1)) / (1 - a) and the c = 0.05 speedup."""
    text = _doc(DOCUMENTS[1])
    rows = []
    for alpha in (0.3, 0.5, 0.7, 0.9):
        tokens = [(1 - alpha ** (k + 1)) / (1 - alpha) for k in (1, 2, 4, 8)]
        speedup = [t / (k * 0.05 + 1) for t, k in zip(tokens, (1, 2, 4, 8))]
        rows.append(f"| {alpha} | " + " | ".join(f"{t:.2f}" for t in tokens) + " |")
        rows.append(f"| {alpha} | " + " | ".join(f"{s:.2f}" for s in speedup) + " |")
    missing = _missing(text, rows)
    assert not missing, "rows of the speculative decoding tables that do not match the formula:\n  " + "\n  ".join(missing)


def test_burn_rate_table_is_recomputed():
    """Burn rate = budget fraction x 720 h / long window, for the three SRE Workbook rows."""
    text = _doc(DOCUMENTS[1])
    expected = [f"= **{0.02 * 720 / 1:g}**", f"= **{0.05 * 720 / 6:g}**", f"= **{0.10 * 720 / 72:g}**",
                f"{14.4 * 0.1:.2f}%", f"**{14.4 * 0.5:.1f}%**"]
    missing = _missing(text, expected)
    assert not missing, f"burn-rate numbers not found: {missing}"


def _first_inference_outputs() -> str:
    import json

    notebook = json.loads(FIRST_INFERENCE.read_text(encoding="utf-8"))
    chunks = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            text = output.get("text") or output.get("data", {}).get("text/plain", "")
            chunks.append("".join(text) if isinstance(text, list) else text)
    return "\n".join(chunks)


def test_quoted_measurements_match_the_committed_notebook():
    """The documents quote numbers of one committed run of Lab 2.1 notebook 01 (gpu profile, on the GPU it prints).

    When that notebook is re-run and committed with new outputs, this test lists the new values: update
    the quoted numbers and everything derived from them (2.1 sections 1.4 and 2.3, answer 1.5-3;
    2.2 sections 5.1 and 5.3).
    """
    if not FIRST_INFERENCE.exists():
        pytest.skip("Lab 2.1 notebook 01 is not in this checkout")
    out = _first_inference_outputs()
    found = {
        "profile": re.search(r"profile: (\w+)", out),
        "gpu": re.search(r"GPU: NVIDIA (\S+) \(([\d.]+) GiB\)", out),
        "start_s": re.search(r"vLLM engine start: ([\d.]+) s", out),
        "batch": re.search(r"batch of (\d+): (\d+) output tokens in ([\d.]+) s -> ([\d,]+) tok/s", out),
        "seq": re.search(r"one at a time \((\d+) prompts\): (\d+) output tokens in ([\d.]+) s -> ([\d,]+) tok/s", out),
    }
    absent = [key for key, match in found.items() if match is None]
    assert not absent, f"{FIRST_INFERENCE.relative_to(ROOT)} has no outputs for {absent}: run it and commit the outputs"
    assert found["profile"].group(1) == "gpu", "the documents quote the gpu-profile run of notebook 01"
    gpu, gib = found["gpu"].group(1), found["gpu"].group(2)
    start = found["start_s"].group(1)
    batch_s, batch_tps, seq_tps = found["batch"].group(3), found["batch"].group(4), found["seq"].group(4)
    expected_21 = [f"**{seq_tps} output tok/s**", f"**{batch_tps} output tok/s**", f"{gpu} 記憶體是 {gib} GiB",
                   f"花 {batch_s} 秒"]
    expected_22 = [f"**{start} s**", f"| 一次一個 | {seq_tps} |", f"| {batch_tps} |"]
    problems = [f"2.1 lacks '{s}'" for s in _missing(_doc(DOCUMENTS[0]), expected_21)]
    problems += [f"2.2 lacks '{s}'" for s in _missing(_doc(DOCUMENTS[1]), expected_22)]
    assert not problems, ("the committed notebook 01 shows other numbers than the documents quote "
                          "(update the quotes and what is computed from them):\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------------
# Tests of the checkers themselves, on small synthetic documents
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heading, slug", [
    ("1. 為什麼 LLM 推論很難", "1-為什麼-llm-推論很難"),
    ("1.4 batch 1 decode 的上限：頻寬 ÷ 權重位元組", "14-batch-1-decode-的上限頻寬--權重位元組"),
    ("4. Continuous batching：以「一步」為單位排程", "4-continuous-batching以一步為單位排程"),
    ("附錄 A：練習解答", "附錄-a練習解答"),
    ("Hello `code_span` [link](x.md) World!", "hello-code_span-link-world"),
    ("2.3 Llama-3.1-8B", "23-llama-31-8b"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_checkers_report_exactly_what_is_broken(tmp_path, monkeypatch):
    doc = tmp_path / "doc.md"
    other = tmp_path / "other.md"
    other.write_text("# Title\n\n## 第二節：重點\n\n## 第二節：重點\n", encoding="utf-8")
    doc.write_text(
        "# Doc\n\n## Real heading\n\n"
        "[ok](other.md#第二節重點) [dup](other.md#第二節重點-1) [self](#real-heading)\n"
        "[bad file](missing.md) [bad anchor](other.md#nope) [web](https://example.com/x)\n"
        "`[in code](missing2.md)` and a footnote[^a] and a missing one[^b]\n\n"
        "`Lab-2.9-Not_Here` vs `Lab-2.8-Planned`（尚未建置） and 02-Labs/nowhere/x.ipynb\n\n"
        "[^a]: defined\n\n"
        "```mermaid\nflowchart LR\n  A --> B\n```\n\n"
        "```mermaid\nnotADiagram\n```\n\n"
        "```mermaid\n%% only a comment\n```\n",
        encoding="utf-8",
    )
    anchors_of.cache_clear()
    links = check_links(doc)
    assert len(links) == 2, links
    assert any("link [bad file](missing.md) -> file missing.md does not exist" in p for p in links)
    assert any("link [bad anchor](other.md#nope) -> no heading with anchor #nope" in p for p in links)
    assert all(":6:" in p for p in links)  # the line of the broken links

    foot = check_footnotes(doc)
    assert foot == [f"{doc}:7: footnote [^b] has no definition"]

    labs = check_lab_mentions(doc)
    assert len(labs) == 2, labs
    assert any("lab `Lab-2.9-Not_Here` has no folder" in p for p in labs)
    assert any("lab path `02-Labs/nowhere/x.ipynb` does not exist" in p for p in labs)

    mermaid = check_mermaid(doc)
    assert len(mermaid) == 2, mermaid
    assert any("starts with 'notADiagram'" in p for p in mermaid)
    assert any("mermaid block is empty" in p for p in mermaid)


def test_marker_on_an_existing_lab_is_reported(tmp_path):
    existing = next(iter(_lab_dirs()), None)
    if existing is None:
        pytest.skip("no lab folder in 02-Labs to test against")
    doc = tmp_path / "doc.md"
    doc.write_text(f"# D\n\n`{existing}`（尚未建置）\n", encoding="utf-8")
    problems = check_lab_mentions(doc)
    assert len(problems) == 1 and "remove the marker" in problems[0], problems


def test_unclosed_fence_is_reported(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# D\n\n```mermaid\nflowchart LR\n", encoding="utf-8")
    problems = check_mermaid(doc)
    assert problems and "never closed" in problems[0]
