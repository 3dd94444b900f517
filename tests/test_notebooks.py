"""Checks on the saved JSON of every course notebook, without running any of them.

nbval (run on notebooks/ by the same pytest command) compares saved outputs with a fresh run. These checks
catch what it cannot: a notebook saved after running cells out of order or not at all, a missing setup
cell, outputs that could never match on another machine, and missing closing sections.
"""

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
IGNORE_MARKER = "# NBVAL_IGNORE_OUTPUT"
CLOSING_HEADINGS = ("Summary", "Limitations", "Exercises")

# Only text outputs are searched: base64 images can contain any of these by chance.
UNSTABLE_OUTPUT = {
    "progress bar": re.compile(r"it/s"),
    "memory address": re.compile(r"0x[0-9a-fA-F]{6,}"),
    "warning": re.compile(r"Warning"),
}


@pytest.fixture(params=NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def notebook(request):
    return nbformat.read(request.param, as_version=4)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def output_texts(cell):
    """Yield the text of every output of a code cell: streams, text/* results and error tracebacks."""
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            yield output.text
        elif output.output_type in ("execute_result", "display_data"):
            yield from (value for mime, value in output.data.items() if mime.startswith("text/"))
        elif output.output_type == "error":
            yield "\n".join(output.traceback)


def cell_label(notebook, cell):
    index = code_cells(notebook).index(cell) + 1
    return f"code cell {index} ({cell.source.splitlines()[0][:60] if cell.source else 'empty'})"


def test_notebooks_are_found():
    names = {path.name for path in NOTEBOOKS}
    assert {"01_linear_quantization.ipynb", "02_granularity.ipynb", "03_quantized_linear_layer.ipynb"} <= names


def test_kernelspec_is_python3(notebook):
    assert notebook.metadata["kernelspec"]["name"] == "python3"


def test_cells_executed_in_order(notebook):
    counts = [cell.execution_count for cell in code_cells(notebook)]
    assert counts == list(range(1, len(counts) + 1)), (
        "save the notebook after a clean top-to-bottom run "
        "(jupyter nbconvert --to notebook --execute --inplace)")


def test_first_code_cell_is_setup(notebook):
    setup = code_cells(notebook)[0].source
    for needle in ("google.colab", "KAGGLE_KERNEL_RUN_TYPE", "REPO_URL = "):
        assert needle in setup, f"the first code cell must be the setup cell; {needle!r} is missing"


@pytest.mark.parametrize("kind", sorted(UNSTABLE_OUTPUT))
def test_outputs_have_no_unstable_text(notebook, kind):
    pattern = UNSTABLE_OUTPUT[kind]
    found = [(cell_label(notebook, cell), match.group())
             for cell in code_cells(notebook)
             for text in output_texts(cell)
             for match in [pattern.search(text)] if match]
    assert found == [], f"{kind} in saved outputs: {found}"


def test_no_saved_errors(notebook):
    # A cell tagged raises-exception shows an error on purpose, and nbval expects it there.
    failed = [cell_label(notebook, cell) for cell in code_cells(notebook)
              if "raises-exception" not in cell.metadata.get("tags", [])
              and any(output.output_type == "error" for output in cell.get("outputs", []))]
    assert failed == []


def test_ignored_outputs_assert_their_range(notebook):
    unchecked = [cell_label(notebook, cell) for cell in code_cells(notebook)
                 if IGNORE_MARKER in cell.source and not re.search(r"^\s*assert\b", cell.source, re.M)]
    assert unchecked == [], f"cells marked {IGNORE_MARKER} must assert the range the prose promises"


@pytest.mark.parametrize("heading", CLOSING_HEADINGS)
def test_has_closing_heading(notebook, heading):
    headings = [line.lstrip("#").strip() for cell in notebook.cells if cell.cell_type == "markdown"
                for line in cell.source.splitlines() if line.startswith("#")]
    # "## 7. Summary" and "## Exercises (optional)" count too.
    assert any(re.search(rf"\b{heading}\b", text) for text in headings), f"no {heading!r} heading in {headings}"
