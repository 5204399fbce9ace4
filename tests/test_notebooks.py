import nbformat
import pytest

from inference_course import notebooks
from inference_course.notebooks import MarkerError, strip_solution

SOLUTION = '''import math

def area(r):
    # BEGIN SOLUTION
    # HINT: the area of a circle is pi r^2
    # HINT: math.pi is pi
    return math.pi * r ** 2
    # END SOLUTION

print(area(2))'''


def test_solution_region_becomes_hints_and_raise():
    out = strip_solution(SOLUTION)
    assert "return math.pi" not in out
    assert "    # TODO: the area of a circle is pi r^2\n    # TODO: math.pi is pi\n" in out
    assert '    raise NotImplementedError("TODO: see the hints above")' in out
    assert out.startswith("import math\n") and out.endswith("print(area(2))")
    ns = {}
    exec(out.replace("print(area(2))", ""), ns)
    with pytest.raises(NotImplementedError):
        ns["area"](1)


def test_region_without_hints_gets_a_default_todo():
    out = strip_solution("# BEGIN SOLUTION\nx = 1\n# END SOLUTION")
    assert out == '# TODO: complete this part\nraise NotImplementedError("TODO: see the hints above")'


@pytest.mark.parametrize("source, message", [
    ("# BEGIN SOLUTION\nx = 1", "without END"),
    ("x = 1\n# END SOLUTION", "without BEGIN"),
    ("# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION", "nested"),
])
def test_unbalanced_markers_are_errors(source, message):
    with pytest.raises(MarkerError, match=message):
        strip_solution(source, "nb.ipynb")


@pytest.mark.parametrize("line", ["#BEGIN SOLUTION", "# BEGIN SOLUTION (part a)", "    # end solution"])
def test_malformed_markers_are_errors_not_leaks(line):
    with pytest.raises(MarkerError, match="malformed marker"):
        strip_solution(f"x = 1\n{line}\nsecret = 42\n# END SOLUTION")


def test_markers_in_markdown_cells_are_refused():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# BEGIN SOLUTION\nthe answer\n# END SOLUTION")]
    with pytest.raises(MarkerError, match="code cells only"):
        notebooks.make_learner(nb, "nb.ipynb")


def test_learner_notebook_has_no_outputs_and_clean_metadata():
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"state": {}}
    cell = nbformat.v4.new_code_cell(SOLUTION, execution_count=3, metadata={"tags": ["keep"], "execution": {"iopub.status.busy": "2026-01-01T00:00:00Z"}})
    cell.outputs = [nbformat.v4.new_output("stream", text="12.566\n")]
    nb.cells = [nbformat.v4.new_markdown_cell("# 標題"), cell]
    learner = notebooks.make_learner(nb)
    code = learner.cells[1]
    assert code.outputs == [] and code.execution_count is None
    assert code.metadata == {"tags": ["keep"], "nbgrader": {
        "grade_id": "exercise-1", "solution": True, "grade": False, "locked": False, "schema_version": 3}}
    assert "widgets" not in learner.metadata and learner.metadata.kernelspec.name == "python3"
    assert nb.cells[1].outputs, "the solution notebook object must not be changed"


def test_learner_path_mirrors_the_solution(tmp_path):
    assert notebooks.learner_path(tmp_path / "Lab-x" / "solutions" / "01-A.ipynb") == tmp_path / "Lab-x" / "01-A.ipynb"
    with pytest.raises(ValueError):
        notebooks.learner_path(tmp_path / "01-A.ipynb")


def test_committed_learner_notebooks_match_the_generator():
    assert notebooks.solution_notebooks(), "no solution notebooks found"
    problems = notebooks.check_learners()
    assert not problems, "\n".join(problems) + "\nRegenerate them: make notebooks"


def test_check_learners_detects_a_hand_edit(tmp_path):
    lab = tmp_path / "02-Labs" / "Track" / "Lab-9.9-Test"
    (lab / "solutions").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text("")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(SOLUTION)]
    nbformat.write(nb, lab / "solutions" / "01-T.ipynb")
    assert notebooks.generate_learners(tmp_path) == [lab / "01-T.ipynb"]
    assert notebooks.check_learners(tmp_path) == []
    text = (lab / "01-T.ipynb").read_text().replace("TODO: math.pi is pi", "TODO: edited by hand")
    (lab / "01-T.ipynb").write_text(text)
    assert notebooks.check_learners(tmp_path) == [f"{lab / '01-T.ipynb'} differs from its generated version"]


def test_every_solution_notebook_starts_with_the_setup_banner():
    for path in notebooks.solution_notebooks():
        nb = nbformat.read(path, as_version=4)
        first = next(c for c in nb.cells if c.cell_type == "code")
        assert "setup(" in first.source, f"{path}: first code cell must call notebooks.setup()"
        text = "".join(o.get("text", "") for o in first.outputs if o.get("output_type") == "stream")
        assert text.startswith("profile: "), f"{path}: committed without the banner output of a real run"


def test_report_collects_headlines_and_figures(tmp_path):
    import base64

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [
        nbformat.v4.new_output("display_data", data={notebooks.HEADLINE_MIME: {"name": "tok/s", "value": 12.5, "unit": "tok/s", "note": ""}}),
        nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(b"\x89PNG fake").decode()}),
    ]
    nb.cells = [cell]
    run = notebooks.NotebookRun(solution=tmp_path / "Lab-1" / "solutions" / "01-A.ipynb", executed=tmp_path / "01-A.ipynb")
    notebooks._collect(nb, run, tmp_path, "01-A")
    assert run.headlines == [{"name": "tok/s", "value": 12.5, "unit": "tok/s", "note": ""}]
    assert run.figures[0].read_bytes() == b"\x89PNG fake"
    report = notebooks.write_report([run], tmp_path, "cpu").read_text()
    assert "| tok/s | 12.50 | tok/s |" in report and "01-A-fig1.png" in report and "profile: **cpu**" in report


def test_values_are_formatted_for_reading():
    assert notebooks.format_value(23370.4) == "23,370"
    assert notebooks.format_value(46.26) == "46.26"
    assert notebooks.format_value(0.012345) == "0.0123"
    assert notebooks.format_value(3) == "3" and notebooks.format_value("n/a") == "n/a"


def test_measurements_round_trip_and_refuse_another_profile(tmp_path, monkeypatch):
    import numpy as np

    lab = tmp_path / "Lab-9.9-Example"
    (lab / "solutions").mkdir(parents=True)
    (lab / "solutions" / "01-First.ipynb").write_text("{}")
    monkeypatch.setenv("COURSE_PROFILE", "cpu")
    path = notebooks.save_measurements("01", {"rate": np.float64(2.5), "rows": {"a": [np.int64(3), 1.0]}}, lab=lab)
    assert path == lab / ".measurements" / "01.json"
    record = notebooks.load_measurements(["01"], lab=lab)["01"]
    assert record["profile"] == "cpu" and record["data"] == {"rate": 2.5, "rows": {"a": [3, 1.0]}}
    with pytest.raises(ValueError, match="'cpu' profile.*run notebook 01-First.ipynb again"):
        notebooks.load_measurements(["01"], lab=lab, profile="gpu")
    with pytest.raises(FileNotFoundError, match="no measurements of 02-\\*.ipynb, 03-\\*.ipynb in .*run them first"):
        notebooks.load_measurements(["01", "02", "03"], lab=lab)
    with pytest.raises(TypeError, match="convert it before saving"):
        notebooks.save_measurements("03", {"frame": object()}, lab=lab)
    assert not (lab / ".measurements" / "03.json").exists()
    assert [p.name for p in (lab / ".measurements").iterdir()] == ["01.json"]  # no temporary file left behind
