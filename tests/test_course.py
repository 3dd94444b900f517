"""Tests of myq.course: setup cells and README tables in step with REPO_URL, links, sync, runtime_dtype.

tests/test_notebooks.py already checks the kernelspec and that a setup cell comes first; these tests
check that the setup cell is exactly the template and that both READMEs show the same notebooks and commands.
"""

import re
import shutil
import tomllib
from pathlib import Path

import nbformat
import pytest
import torch

import myq
from myq import course

FORK = "https://github.com/alice/myq-fork"
NOTEBOOK_FILES = sorted(path.name for path in course.NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
IMPORT_LINE = re.compile(r"^(import [\w., ]+|from [\w.]+ import [\w., ]+)( as \w+)?$")
# The commands both READMEs must show, in this order.
COMMANDS = ("pip install -r requirements.txt", "python -m myq quantize", "jupyter lab notebooks/", "pytest",
            "python -m myq.bench")
# An access token (hf_ and 30 or more letters and digits), a login call or the token's environment variable.
SECRETS = re.compile(r"hf_[A-Za-z0-9]{30,}|login\(|HF_TOKEN")


def read_notebook(file):
    return nbformat.read(course.NOTEBOOK_DIR / file, as_version=4)


def readme_commands(lang):
    """Return the lines of the README's ```bash blocks, comments left out, in order."""
    text = course.READMES[lang].read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("file", NOTEBOOK_FILES)
def test_setup_cell_matches_template(file):
    setup, _ = course.split_setup_cell(course.first_code_cell(read_notebook(file)).source)
    assert setup == course.setup_cell(course.REPO_URL), "run: python -m myq.course sync"


@pytest.mark.parametrize("file", NOTEBOOK_FILES)
def test_setup_extras_are_imports(file):
    _, extras = course.split_setup_cell(course.first_code_cell(read_notebook(file)).source)
    assert [line for line in extras.splitlines() if line.strip() and not IMPORT_LINE.match(line)] == []


@pytest.mark.parametrize("file", NOTEBOOK_FILES)
def test_notebook_has_no_token(file):
    text = (course.NOTEBOOK_DIR / file).read_text(encoding="utf-8")
    assert SECRETS.findall(text) == []


def test_setup_installs_pyproject_requirements():
    pyproject = tomllib.loads((course.ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    not_torch = {dep for dep in pyproject["project"]["dependencies"] if not dep.startswith("torch")}
    installed = re.findall(r'"([\w-]+[<>=][^"]*)"', course.setup_cell())
    assert sorted(installed) == sorted(not_torch)


def test_notebook_list_matches_files():
    assert [notebook.file for notebook in course.NOTEBOOKS] == NOTEBOOK_FILES


@pytest.mark.parametrize("notebook", course.NOTEBOOKS, ids=lambda notebook: notebook.file)
def test_title_matches_heading(notebook):
    first_line = read_notebook(notebook.file).cells[0].source.splitlines()[0]
    assert first_line == f"# {notebook.file[:2]} · {notebook.title}"


@pytest.mark.parametrize("lang", sorted(course.READMES))
def test_readme_table_is_current(lang):
    text = course.READMES[lang].read_text(encoding="utf-8")
    assert course.replace_table(text, course.notebooks_table(lang)) == text, "run: python -m myq.course sync"


def test_readmes_list_same_notebooks():
    linked = {lang: re.findall(r"\]\(notebooks/(\d\d_\w+\.ipynb)\)", path.read_text(encoding="utf-8"))
              for lang, path in course.READMES.items()}
    assert linked["en"] == linked["ko"] == NOTEBOOK_FILES


def test_readmes_show_same_commands():
    assert readme_commands("en") == readme_commands("ko")


@pytest.mark.parametrize("lang", sorted(course.READMES))
def test_readme_commands_in_order(lang):
    commands = readme_commands(lang)
    first = [next(i for i, line in enumerate(commands) if line.startswith(command)) for command in COMMANDS]
    assert first == sorted(first)


def test_readmes_link_each_other():
    assert "](README.ko.md)" in course.READMES["en"].read_text(encoding="utf-8")
    assert "](README.md)" in course.READMES["ko"].read_text(encoding="utf-8")


def test_colab_url_opens_github_blob():
    assert course.colab_url("01_x.ipynb", FORK + ".git/", "dev") == (
        "https://colab.research.google.com/github/alice/myq-fork/blob/dev/notebooks/01_x.ipynb")


def test_kaggle_url_imports_github_blob():
    assert course.kaggle_url("01_x.ipynb", FORK) == (
        "https://kaggle.com/kernels/welcome?src=https://github.com/alice/myq-fork/blob/main/notebooks/01_x.ipynb")


@pytest.mark.parametrize("url", ["https://gitlab.com/alice/myq", "http://github.com/alice/myq",
                                 "https://github.com/alice", "git@github.com:alice/myq.git"])
def test_non_github_url_rejected(url):
    with pytest.raises(ValueError, match="repo_url must look like"):
        course.setup_cell(url)


@pytest.fixture
def course_copy(tmp_path, monkeypatch):
    """Point myq.course at copies of the notebooks, READMEs and its own source in tmp_path."""
    shutil.copytree(course.NOTEBOOK_DIR, tmp_path / "notebooks")
    readmes = {lang: Path(shutil.copy(path, tmp_path)) for lang, path in course.READMES.items()}
    monkeypatch.setattr(course, "NOTEBOOK_DIR", tmp_path / "notebooks")
    monkeypatch.setattr(course, "READMES", readmes)
    monkeypatch.setattr(course, "SOURCE", Path(shutil.copy(course.SOURCE, tmp_path / "course.py")))
    return tmp_path


def test_sync_keeps_outputs_and_counts(course_copy):
    file = course.NOTEBOOKS[0].file
    before = nbformat.read(course_copy / "notebooks" / file, as_version=4)
    assert course.sync_notebook(course_copy / "notebooks" / file, FORK) is True
    after = nbformat.read(course_copy / "notebooks" / file, as_version=4)
    cell_before, cell_after = course.first_code_cell(before), course.first_code_cell(after)
    assert f'REPO_URL = "{FORK}"' in cell_after.source
    assert course.split_setup_cell(cell_after.source)[1] == course.split_setup_cell(cell_before.source)[1]
    assert (cell_after.outputs, cell_after.execution_count) == (cell_before.outputs, cell_before.execution_count)
    index = before.cells.index(cell_before)
    assert after.cells[:index] + after.cells[index + 1:] == before.cells[:index] + before.cells[index + 1:]


def test_sync_twice_changes_nothing(course_copy):
    course.sync(FORK)
    assert course.sync(FORK) == []


def test_main_sync_saves_fork_url(course_copy, capsys):
    assert course.main(["sync", "--repo-url", FORK]) == 0
    assert f'\nREPO_URL = "{FORK}"\n' in (course_copy / "course.py").read_text(encoding="utf-8")
    readme = (course_copy / "README.md").read_text(encoding="utf-8")
    assert course.colab_url(course.NOTEBOOKS[-1].file, FORK) in readme
    assert f"{len(course.NOTEBOOKS) + 2} file(s) updated" in capsys.readouterr().out


def test_sync_refuses_other_first_cell(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('hello')")])
    nbformat.write(notebook, tmp_path / "01_x.ipynb")
    with pytest.raises(ValueError, match="01_x.ipynb: the first code cell is not the setup cell"):
        course.sync_notebook(tmp_path / "01_x.ipynb")


def test_table_needs_markers():
    with pytest.raises(ValueError, match="notebooks:start"):
        course.replace_table("# README without markers\n", course.notebooks_table())


def test_unknown_lang_rejected():
    with pytest.raises(ValueError, match="lang must be one of \\['en', 'ko'\\], got 'fr'"):
        course.notebooks_table("fr")


def fake_gpu(monkeypatch, name, native_bf16):
    """Make torch.cuda report one GPU called `name`, with or without native bfloat16."""
    def is_bf16_supported(including_emulation=True):
        # Like torch: emulated bfloat16 counts as supported unless the caller asks for native only.
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


def test_cpu_runtime_uses_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert myq.runtime_dtype() == ("cpu", torch.bfloat16, "no GPU: bfloat16 on the CPU")


def test_ampere_gpu_uses_bfloat16(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", native_bf16=True)
    assert myq.runtime_dtype() == ("cuda", torch.bfloat16,
                                   "GPU NVIDIA A100-SXM4-40GB: bfloat16, which it supports natively")


def test_t4_gpu_uses_float16(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", native_bf16=False)
    assert myq.runtime_dtype() == ("cuda", torch.float16, "GPU Tesla T4: float16, because it has no native bfloat16")
