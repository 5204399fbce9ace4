"""Notebook pipeline: in-notebook helpers, the solution -> learner generator, and ``make course``.

Solution notebooks (``<lab>/solutions/NN-Topic.ipynb``) are the single source. A region of a code cell
between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` is what the learner writes: in the learner notebook
(``<lab>/NN-Topic.ipynb``) it becomes its ``# HINT:`` lines as TODO comments and a
``raise NotImplementedError``. Outputs and run metadata are stripped; exercises and their ``# Check``
cells get nbgrader metadata (``grading.annotate``). ``check_learners`` fails when a
committed learner notebook differs from what the generator produces.

Inside a notebook::

    from inference_course.notebooks import setup, headline
    P = setup()                       # profile + hardware + versions banner, lab helper importable
    headline("vLLM output tokens/s", 1234.5, "tok/s")   # collected by the results report
"""
from __future__ import annotations

import copy
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

BEGIN = re.compile(r"^(?P<indent>\s*)# BEGIN SOLUTION\s*$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
HINT = re.compile(r"^\s*# HINT:\s?(?P<text>.*)$")
ANY_MARKER = re.compile(r"(BEGIN|END)\s*SOLUTION", re.IGNORECASE)
HEADLINE_MIME = "application/vnd.inference-course.headline+json"
REPO_MARKERS = ("pyproject.toml", "02-Labs")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# -- in-notebook helpers ----------------------------------------------------------------------------

def find_lab_dir(start: str | os.PathLike | None = None) -> Path | None:
    """The ``Lab-*`` folder that contains ``start`` (default: the working directory)."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if folder.name.startswith("Lab-"):
            return folder
    return None


def setup(seed: int = 0, quiet: bool = False):
    """First cell of every notebook: seeds, lab helper on ``sys.path``, and a banner naming the
    profile, hardware and versions this run used. Returns the active profile."""
    import random

    from .profiles import get_profile, system_info

    import warnings

    # vLLM logs engine internals at INFO and WARNING; in a notebook they bury the results. Set
    # VLLM_LOGGING_LEVEL=INFO in the environment to see them (the server logs keep everything).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
    # tqdm.auto warns once per kernel when ipywidgets is missing (the GPU machine's runner has none);
    # progress bars still print as text, and the warning would differ between machines.
    warnings.filterwarnings("ignore", message="IProgress not found")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # the engine's own processes
    # Progress bars of engine internals (checkpoint shards, CUDA-graph capture, GGUF conversion) are
    # printed by the engine's own processes into the cell; they say nothing about the lesson and differ
    # on every run. tqdm reads TQDM_DISABLE from the environment (>= 4.66), so the engine's processes
    # inherit it; the course's own timings are printed as numbers. Unset it to see the bars.
    os.environ.setdefault("TQDM_DISABLE", "1")
    # PyTorch's C++ warnings, e.g. c10d's "hostname of the client socket cannot be retrieved" on hosts
    # without a resolvable hostname, when vLLM sets up its single-process group; errors still show.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # transformers 5.17 warns on every load of the embedded model's BPE tokenizer about
    # clean_up_tokenization_spaces (an advisory about its config, not about this run); errors still show.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
    # The profile's engine environment (cpu: the model runs inside the engine, no worker process; see
    # profiles.CPU.vllm_env), for the engines this kernel creates and the servers it starts.
    get_profile().apply_vllm_env()
    guard_kernel()
    lab = find_lab_dir()
    if lab and str(lab) not in sys.path:
        sys.path.insert(0, str(lab))
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass
    profile = get_profile()
    if not quiet:
        info = system_info(profile)
        gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in info["gpus"]) or "none"
        versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        print(f"profile: {profile.name} | lab: {lab.name if lab else '-'}")
        print(f"hardware: {info['cpu']} x{info['cpu_cores']}, RAM {info.get('ram_gib', '?')} GiB, GPU: {gpus}")
        if info["gpus"]:
            print(f"CUDA {info.get('cuda') or '?'} (torch's runtime) | NVIDIA driver {info.get('driver') or '?'}")
        print(f"python {info['python']} | {versions}")
    return profile


_KERNEL_GUARD = None


def guard_kernel():
    """In a Jupyter kernel, make sure nothing the kernel started outlives it.

    An engine created in the kernel (``vllm.LLM``) runs its EngineCore and workers as child processes.
    When the kernel dies hard (out-of-memory kill, a restart of an unresponsive kernel, SIGKILL), they
    were reparented to init and kept the RAM or GPU memory until killed by hand. jupyter_client starts
    every kernel as the leader of its own process group, and those children stay in that group: this
    starts (once per kernel) the package's reaper for the group, which ends the group's remaining
    members when the kernel is gone (SIGTERM, then SIGKILL). Outside a kernel, or in a process that
    does not lead its group (whose group could hold its parent), it does nothing. Returns the reaper's
    ``Popen`` or None."""
    global _KERNEL_GUARD
    if _KERNEL_GUARD is not None and _KERNEL_GUARD.poll() is None:
        return _KERNEL_GUARD
    if "ipykernel" not in sys.modules or os.getpgid(0) != os.getpid():
        return None
    from .servers import _start_reaper

    _KERNEL_GUARD = _start_reaper(os.getpid())
    return _KERNEL_GUARD


def format_value(value) -> str:
    """A measurement as people read it: 23,370 / 46.3 / 0.0123."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    magnitude = abs(value)
    if isinstance(value, int) or magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def headline(name: str, value, unit: str = "", note: str = "") -> None:
    """Show a headline measurement and tag it for the results report of ``make course``."""
    from IPython.display import display

    shown = format_value(value)
    text = f"**{name}**: {shown} {unit}".rstrip() + (f" ({note})" if note else "")
    display({"text/markdown": text, "text/plain": text.replace("**", ""),
             HEADLINE_MIME: {"name": name, "value": value, "unit": unit, "note": note}}, raw=True)


# -- measurements one notebook hands to a later one of its lab ----------------------------------------

MEASUREMENTS_DIR = ".measurements"  # inside the lab's folder; git-ignored (every run writes its own)


def _jsonable(value):
    if hasattr(value, "item") and callable(value.item):  # numpy and torch scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not a number, string, list or dict: convert it before saving")


def _lab_folder(lab, caller: str) -> Path:
    folder = Path(lab) if lab else find_lab_dir()
    if folder is None:
        raise RuntimeError(f"{caller}: no Lab-* folder above the working directory; pass lab=")
    return folder


def save_measurements(name: str, data: dict, lab: str | os.PathLike | None = None) -> Path:
    """Write this run's measurements for a later notebook of the same lab (a summary that compares them).

    ``name`` is the notebook's number (``"01"``); the file ``<lab>/.measurements/<name>.json`` records the
    profile, the device and the time it was written, so the reader can refuse numbers from another
    profile. Returns the file's path."""
    import datetime

    from .profiles import get_profile

    folder = _lab_folder(lab, "save_measurements")
    profile = get_profile()
    record = {"notebook": name, "profile": profile.name, "device": profile.device,
              "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "data": data}
    path = folder / MEASUREMENTS_DIR / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    text = json.dumps(record, indent=1, default=_jsonable, allow_nan=True)
    import tempfile

    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp.write(text + "\n")
    Path(tmp.name).replace(path)  # a reader never sees half a file, and two writers never share a temporary one
    return path


def load_measurements(names, lab: str | os.PathLike | None = None, profile: str | None = None) -> dict[str, dict]:
    """The records ``save_measurements`` wrote for ``names`` in this lab, all from ``profile`` (default:
    the active one). A missing file or one from another profile raises with the notebook to run."""
    from .profiles import get_profile

    folder = _lab_folder(lab, "load_measurements")
    profile = profile or get_profile().name

    def notebook(name):
        found = sorted(p.name for p in (folder / "solutions").glob(f"{name}-*.ipynb"))
        return found[0] if found else f"{name}-*.ipynb"

    missing = [name for name in names if not (folder / MEASUREMENTS_DIR / f"{name}.json").exists()]
    if missing:
        raise FileNotFoundError(
            f"no measurements of {', '.join(notebook(n) for n in missing)} in {folder / MEASUREMENTS_DIR}: run "
            f"{'it' if len(missing) == 1 else 'them'} first, on the {profile} profile and to the end (each writes "
            "its file in its last cells; one that stops at an exercise never gets there)")
    records = {}
    for name in names:
        path = folder / MEASUREMENTS_DIR / f"{name}.json"
        record = json.loads(path.read_text())
        if record.get("profile") != profile:
            raise ValueError(
                f"{path} holds measurements of the {record.get('profile')!r} profile (written "
                f"{record.get('written')}), this run is {profile!r}: run notebook {notebook(name)} again on this profile")
        records[name] = record
    return records


# -- the generator ----------------------------------------------------------------------------------

class MarkerError(ValueError):
    """Unbalanced BEGIN/END SOLUTION markers."""


def strip_solution(source: str, where: str = "") -> str:
    """Replace each marked solution region of a cell's source by TODO hints and a ``raise``."""
    out: list[str] = []
    lines = source.split("\n")
    inside, indent, hints = False, "", []
    for number, line in enumerate(lines, 1):
        if ANY_MARKER.search(line) and not (BEGIN.match(line) or END.match(line)):
            raise MarkerError(f"{where}: line {number}: malformed marker {line.strip()!r}; write exactly "
                              "'# BEGIN SOLUTION' / '# END SOLUTION' on a line of their own")
        if not inside:
            match = BEGIN.match(line)
            if match:
                inside, indent, hints = True, match.group("indent"), []
            elif END.match(line):
                raise MarkerError(f"{where}: line {number}: END SOLUTION without BEGIN SOLUTION")
            else:
                out.append(line)
            continue
        if BEGIN.match(line):
            raise MarkerError(f"{where}: line {number}: nested BEGIN SOLUTION")
        if END.match(line):
            for hint in hints or ["complete this part"]:
                out.append(f"{indent}# TODO: {hint}")
            out.append(f'{indent}raise NotImplementedError("TODO: see the hints above")')
            inside = False
            continue
        hint = HINT.match(line)
        if hint:
            hints.append(hint.group("text").strip())
    if inside:
        raise MarkerError(f"{where}: BEGIN SOLUTION without END SOLUTION")
    return "\n".join(out)


def learner_path(solution: Path) -> Path:
    solution = Path(solution)
    if solution.parent.name != "solutions":
        raise ValueError(f"{solution} is not inside a solutions/ folder")
    return solution.parent.parent / solution.name


def _clean_metadata(nb) -> None:
    nb.metadata = nbformat.from_dict({
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    for cell in nb.cells:
        kept = {key: cell.get("metadata", {}).get(key) for key in ("tags", "nbgrader")}
        cell.metadata = nbformat.from_dict({key: value for key, value in kept.items() if value})


def make_learner(solution_nb, where: str = ""):
    """The learner version of a solution notebook (a new object; the input is not changed)."""
    from .grading import annotate

    nb = copy.deepcopy(solution_nb)
    annotate(nb, where)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" and ANY_MARKER.search(cell.source):
            raise MarkerError(f"{where} cell {index}: solution markers belong in code cells only")
        if cell.cell_type == "code":
            cell.source = strip_solution(cell.source, f"{where} cell {index}")
            cell.outputs = []
            cell.execution_count = None
    _clean_metadata(nb)
    return nb


def dumps(nb) -> str:
    return nbformat.writes(nb) + "\n"


def repo_root(start: str | os.PathLike | None = None) -> Path:
    here = Path(start or __file__).resolve()
    for folder in (here, *here.parents):
        if all((folder / marker).exists() for marker in REPO_MARKERS):
            return folder
    raise FileNotFoundError("Not inside the course repository (no pyproject.toml + 02-Labs found).")


def solution_notebooks(root: str | os.PathLike | None = None) -> list[Path]:
    root = Path(root) if root else repo_root()
    found = [p for p in (root / "02-Labs").glob("*/*/solutions/*.ipynb") if ".ipynb_checkpoints" not in p.parts]
    return sorted(found)


def clean_solution(path: Path) -> bool:
    """Normalize a solution notebook's metadata in place (outputs kept). True if the file changed."""
    text = Path(path).read_text()
    nb = nbformat.reads(text, as_version=4)
    _clean_metadata(nb)
    from .grading import annotate

    annotate(nb, str(path))
    new = dumps(nb)
    if new != text:
        Path(path).write_text(new)
        return True
    return False


def generate_learners(root: str | os.PathLike | None = None) -> list[Path]:
    """Write every learner notebook from its solution; returns the files that changed."""
    changed = []
    for solution in solution_notebooks(root):
        clean_solution(solution)
        target = learner_path(solution)
        text = dumps(make_learner(nbformat.read(solution, as_version=4), str(solution)))
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
            changed.append(target)
    return changed


def check_learners(root: str | os.PathLike | None = None) -> list[str]:
    """Problems with the committed learner notebooks (empty when all match the generator)."""
    problems = []
    for solution in solution_notebooks(root):
        target = learner_path(solution)
        expected = dumps(make_learner(nbformat.read(solution, as_version=4), str(solution)))
        if not target.exists():
            problems.append(f"{target} is missing")
        elif target.read_text() != expected:
            problems.append(f"{target} differs from its generated version")
    return problems


# -- make course: execute every solution and write the results report --------------------------------

@dataclass
class NotebookRun:
    solution: Path
    executed: Path
    seconds: float = 0.0
    error: str | None = None
    headlines: list[dict] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


def _collect(nb, run: NotebookRun, figure_dir: Path, stem: str) -> None:
    import base64

    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if HEADLINE_MIME in data:
                value = data[HEADLINE_MIME]
                run.headlines.append(json.loads(value) if isinstance(value, str) else dict(value))
            if "image/png" in data:
                figure = figure_dir / f"{stem}-fig{len(run.figures) + 1}.png"
                figure.write_bytes(base64.b64decode(data["image/png"]))
                run.figures.append(figure)
            if output.get("output_type") == "error" and not run.error:
                run.error = ANSI.sub("", f"{output.get('ename')}: {output.get('evalue')}")


def execute_notebook(solution: Path, out_dir: Path, root: Path, timeout: int, inplace: bool = False) -> NotebookRun:
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    relative = solution.relative_to(root / "02-Labs")
    executed = out_dir / relative.parent.parent / relative.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    run = NotebookRun(solution=solution, executed=executed)
    nb = nbformat.read(solution, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(solution.parent)}})
    started = time.monotonic()
    try:
        client.execute()
    except CellExecutionError as exc:
        run.error = ANSI.sub("", str(exc).strip().splitlines()[-1])[:300]
    except Exception as exc:  # a dead kernel or a timeout: report it, go on with the next notebook
        run.error = f"{type(exc).__name__}: {exc}"[:300]
    run.seconds = time.monotonic() - started
    _clean_metadata(nb)
    executed.write_text(dumps(nb))
    _collect(nb, run, executed.parent, executed.stem)
    if inplace and not run.error:
        solution.write_text(dumps(nb))
    return run


def write_report(runs: list[NotebookRun], out_dir: Path, profile_name: str) -> Path:
    from .profiles import get_profile, system_info

    info = system_info(get_profile(profile_name))
    lines = ["# Course results", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `make course`.", "",
             "## Hardware and versions", "",
             f"- profile: **{info['profile']}**",
             f"- CPU: {info['cpu']} ({info['cpu_cores']} cores), RAM {info.get('ram_gib', '?')} GiB",
             "- GPU: " + (", ".join(f"{g['name']} ({g['memory_gib']} GiB, sm {g['compute_capability']})"
                                    for g in info["gpus"]) or "none"),
             f"- Python {info['python']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
             "", "## Notebooks", "",
             "| notebook | status | time (s) | executed |", "|---|---|---|---|"]
    for run in runs:
        rel = os.path.relpath(run.executed, out_dir)
        status = "ok" if not run.error else f"FAILED: {run.error}".replace("|", "\\|")
        lines.append(f"| {run.solution.parent.parent.name}/{run.solution.stem} | {status} | {run.seconds:.0f} | [{rel}]({rel}) |")
    lines += ["", "## Headline measurements", ""]
    for run in runs:
        if not run.headlines and not run.figures:
            continue
        lines += [f"### {run.solution.parent.parent.parent.name} / {run.solution.parent.parent.name} / {run.solution.stem}", ""]
        if run.headlines:
            lines += ["| measurement | value | unit | note |", "|---|---|---|---|"]
            for h in run.headlines:
                lines.append(f"| {h['name']} | {format_value(h['value'])} | {h.get('unit', '')} | {h.get('note', '')} |")
            lines.append("")
        for figure in run.figures:
            rel = os.path.relpath(figure, out_dir)
            lines += [f"![{figure.stem}]({rel})", ""]
    report = out_dir / "REPORT.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def run_course(out_dir: str | os.PathLike = "course-results", only: str | None = None, inplace: bool = False,
               root: str | os.PathLike | None = None) -> tuple[Path, list[NotebookRun]]:
    """Execute every solution notebook (optionally those whose path contains ``only``) on the active
    profile, write executed copies, figures and ``REPORT.md`` under ``out_dir``."""
    from tqdm.auto import tqdm

    from .profiles import get_profile

    root = Path(root) if root else repo_root()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    profile = get_profile()
    notebooks = [p for p in solution_notebooks(root) if not only or only in str(p)]
    runs = []
    for solution in tqdm(notebooks, desc=f"course ({profile.name} profile)", unit="notebook"):
        run = execute_notebook(solution, out, root, timeout=profile.cell_timeout_s, inplace=inplace)
        tqdm.write(f"{'ok ' if not run.error else 'ERR'} {run.seconds:6.0f} s  {solution.relative_to(root)}"
                   + (f"  -> {run.error}" if run.error else ""))
        runs.append(run)
    if inplace:
        generate_learners(root)
    return write_report(runs, out, profile.name), runs
