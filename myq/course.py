"""The course's one place for what every notebook and both READMEs repeat: the repository URL.

Learners open a notebook in Colab or Kaggle straight from GitHub, where the notebook file is all they
have, so each notebook's first code cell carries the clone URL itself. This module contains that URL, the
text of the setup cell, the list of notebooks and the Colab/Kaggle links built from them.
`python -m myq.course sync [--repo-url URL]` writes them into the notebooks and READMEs.

A notebook's setup cell is the template below, optionally followed by import lines of its own; sync
rewrites the template part only and keeps the cell's saved output and execution count, which nbval
compares. The READMEs hold a generated table between NOTEBOOKS_START and NOTEBOOKS_END.
Left out: links for hosts other than GitHub (Colab and Kaggle open notebooks from GitHub only).
"""

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import nbformat

REPO_URL = "https://github.com/myq-course/myq"
BRANCH = "main"

SOURCE = Path(__file__).resolve()
ROOT = SOURCE.parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
READMES = {"en": ROOT / "README.md", "ko": ROOT / "README.ko.md"}
NOTEBOOKS_START = "<!-- notebooks:start -->"
NOTEBOOKS_END = "<!-- notebooks:end -->"

# The placeholder is filled by `setup_cell`; the cell's own f-string braces stay as they are.
_URL_PLACEHOLDER = "@REPO_URL@"
SETUP_TEMPLATE = '''\
# Setup: on Colab or Kaggle, fetch the course and install myq; on a local install there is nothing to do.
import os, subprocess, sys

REPO_URL = "@REPO_URL@"
if "google.colab" in sys.modules or "KAGGLE_KERNEL_RUN_TYPE" in os.environ:
    if not os.path.isdir("myq-course"):
        subprocess.run(["git", "clone", "-q", "--depth", "1", REPO_URL, "myq-course"], check=True)
    # --no-deps keeps the runtime's own torch build; the other requirements are installed by name.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", "myq-course"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "transformers>=4.56", "safetensors>=0.4",
                    "huggingface_hub>=0.24", "matplotlib>=3.7"], check=True)
    sys.path.insert(0, os.path.abspath("myq-course"))
    print(f"Installed myq from {REPO_URL} into ./myq-course")
else:
    print("Local install: myq is importable, nothing to set up.")

import torch
import myq

torch.manual_seed(0)
torch.set_printoptions(precision=4, sci_mode=False)'''

# Runtime keys of `Notebook.runtime`, as each README words them.
RUNTIMES = {
    "cpu": {"en": "CPU", "ko": "CPU"},
    "gpu": {"en": "GPU recommended (opt-350m); CPU works", "ko": "GPU 권장 (opt-350m), CPU로도 가능"},
    "cpu+gpu": {"en": "CPU; a GPU speeds up the opt-350m part", "ko": "CPU (opt-350m 부분은 GPU에서 더 빠름)"},
}


@dataclass(frozen=True)
class Notebook:
    """One notebook of the course: its file in notebooks/, title, one-line summary per language, runtime key."""

    file: str
    title: str
    summary: str
    summary_ko: str
    runtime: str


NOTEBOOKS = (
    Notebook("01_linear_quantization.ipynb", "Linear quantization by hand",
             "scale, zero point, rounding and clamping, and the error they cost",
             "scale과 zero point, 반올림과 clamp, 그리고 그 대가로 생기는 오차", "cpu"),
    Notebook("02_granularity.ipynb", "Granularity: per-tensor, per-channel, per-group",
             "how many weights share one scale, and why W8 uses one per output channel",
             "scale 하나를 몇 개의 weight가 나눠 쓰는지, W8이 출력 채널마다 scale을 두는 이유", "cpu"),
    Notebook("03_quantized_linear_layer.ipynb", "A quantized linear layer, and swapping it into a model",
             "the W8A16 layer written out, then swapped for every nn.Linear of a small OPT",
             "W8A16 layer를 직접 작성하고, 작은 OPT의 nn.Linear를 모두 교체하기", "cpu"),
    Notebook("04_quantize_opt_350m.ipynb", "Quantize OPT-350m",
             "load opt-350m (offline: the embedded model), swap every linear layer for W8A16, compare memory, "
             "perplexity and generated text",
             "opt-350m(오프라인에서는 내장 모델)을 불러와 linear layer를 모두 W8A16으로 바꾸고, 메모리, perplexity, "
             "생성 텍스트 비교", "gpu"),
    Notebook("05_4bit_packing.ipynb", "4-bit and 2-bit weights: packing codes into bytes",
             "pack 4- and 2-bit codes into bytes; footprint and perplexity at 16, 8, 4 and 2 bits, per channel "
             "and per group",
             "4비트, 2비트 코드를 바이트에 packing하고, 16/8/4/2비트와 per-channel, per-group의 메모리와 "
             "perplexity 비교", "cpu+gpu"),
    Notebook("06_speed.ipynb", "Fast quantized inference on the CPU",
             "why the bytes read per token set decoding speed, and CPU kernels that read the integer codes directly",
             "디코딩 속도가 토큰마다 읽는 바이트 수로 정해지는 이유와, 정수 코드를 바로 읽는 CPU kernel", "cpu"),
    Notebook("07_save_load_share.ipynb", "Save, load and share a quantized model",
             "a safetensors folder for the Hugging Face Hub, loaded back with bit-identical logits",
             "Hugging Face Hub에 올릴 safetensors 폴더로 저장하고, logits가 비트 단위로 같게 다시 불러오기", "cpu"),
)


def _check_repo_url(repo_url):
    """Return (owner, repo) of a GitHub URL, or raise ValueError saying what form is expected."""
    parsed = urlparse(str(repo_url))
    parts = parsed.path.strip("/").removesuffix(".git").split("/")
    if parsed.scheme != "https" or parsed.netloc != "github.com" or len(parts) != 2 or not all(parts):
        raise ValueError(f"repo_url must look like https://github.com/<owner>/<repo>, got {repo_url!r}: "
                         f"Colab and Kaggle open notebooks from GitHub only")
    return parts[0], parts[1]


def _notebook_path(file, repo_url, branch):
    owner, repo = _check_repo_url(repo_url)
    return f"github/{owner}/{repo}/blob/{branch}/notebooks/{file}"


def colab_url(file, repo_url=REPO_URL, branch=BRANCH):
    """Return the link that opens notebooks/`file` of the repository in Google Colab."""
    return f"https://colab.research.google.com/{_notebook_path(file, repo_url, branch)}"


def kaggle_url(file, repo_url=REPO_URL, branch=BRANCH):
    """Return the link that imports notebooks/`file` of the repository into a new Kaggle notebook."""
    github_blob = _notebook_path(file, repo_url, branch).removeprefix("github/")
    return f"https://kaggle.com/kernels/welcome?src=https://github.com/{github_blob}"


def setup_cell(repo_url=REPO_URL):
    """Return the setup cell's text with `repo_url` as the clone URL."""
    _check_repo_url(repo_url)
    return SETUP_TEMPLATE.replace(_URL_PLACEHOLDER, repo_url)


def split_setup_cell(source):
    """Return (setup part, extra lines) of a first code cell: the extras follow the template's last line.

    Raises ValueError when the cell does not end its setup part with that line, so that sync never
    overwrites a cell that is not a setup cell.
    """
    last_line = SETUP_TEMPLATE.splitlines()[-1]
    lines = source.splitlines()
    if last_line not in lines:
        raise ValueError(f"the first code cell is not the setup cell: the line {last_line!r} is missing")
    end = len(lines) - lines[::-1].index(last_line)
    return "\n".join(lines[:end]), "\n".join(lines[end:])


def first_code_cell(notebook):
    """Return the first code cell of a notebook read with nbformat, or raise ValueError if it has none."""
    for cell in notebook.cells:
        if cell.cell_type == "code":
            return cell
    raise ValueError("the notebook has no code cell, so it has no setup cell")


def synced_setup_source(source, repo_url=REPO_URL):
    """Return `source` with its setup part replaced by the template for `repo_url`, extras kept."""
    _, extras = split_setup_cell(source)
    return setup_cell(repo_url) + ("\n" + extras if extras else "")


def sync_notebook(path, repo_url=REPO_URL):
    """Rewrite the setup part of the notebook at `path`; return whether the file changed.

    Only the cell's source changes: its outputs and execution count stay, so nbval still passes.
    """
    notebook = nbformat.read(path, as_version=4)
    cell = first_code_cell(notebook)
    try:
        new_source = synced_setup_source(cell.source, repo_url)
    except ValueError as error:
        raise ValueError(f"{Path(path).name}: {error}") from error
    if new_source == cell.source:
        return False
    cell.source = new_source
    nbformat.write(notebook, path)
    return True


def notebooks_table(lang="en", repo_url=REPO_URL, branch=BRANCH):
    """Return the Markdown table of notebooks with their Colab and Kaggle links, in `lang` ("en" or "ko")."""
    if lang not in READMES:
        raise ValueError(f"lang must be one of {sorted(READMES)}, got {lang!r}")
    header = {"en": "| # | Notebook | What you learn | Runtime | Open |",
              "ko": "| # | 노트북 | 배우는 내용 | 런타임 | 열기 |"}[lang]
    rows = [header, "|---|---|---|---|---|"]
    for notebook in NOTEBOOKS:
        summary = notebook.summary if lang == "en" else notebook.summary_ko
        links = (f"[Open in Colab]({colab_url(notebook.file, repo_url, branch)}) · "
                 f"[Open in Kaggle]({kaggle_url(notebook.file, repo_url, branch)})")
        rows.append(f"| {notebook.file[:2]} | [{notebook.title}](notebooks/{notebook.file}) | {summary} "
                    f"| {RUNTIMES[notebook.runtime][lang]} | {links} |")
    return "\n".join(rows)


def replace_table(text, table):
    """Return README `text` with the lines between the notebook markers replaced by `table`."""
    pattern = re.compile(re.escape(NOTEBOOKS_START) + r"\n.*?" + re.escape(NOTEBOOKS_END), re.S)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"the README must contain {NOTEBOOKS_START} and {NOTEBOOKS_END} once each, on "
                         f"lines of their own, in that order")
    return pattern.sub(lambda _: f"{NOTEBOOKS_START}\n{table}\n{NOTEBOOKS_END}", text)


def sync_readme(path, lang, repo_url=REPO_URL, branch=BRANCH):
    """Regenerate the notebooks table of the README at `path`; return whether the file changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    new_text = replace_table(text, notebooks_table(lang, repo_url, branch))
    if new_text == text:
        return False
    path.write_text(new_text, encoding="utf-8")
    return True


def set_repo_url_in_source(repo_url, path=None):
    """Rewrite the REPO_URL line of this module's source file (or `path`); return whether it changed.

    The tests and every later sync read REPO_URL, so a fork's URL must land here, not only in the notebooks.
    """
    _check_repo_url(repo_url)
    path = SOURCE if path is None else Path(path)
    text = path.read_text(encoding="utf-8")
    new_text, count = re.subn(r'^REPO_URL = ".*"$', f'REPO_URL = "{repo_url}"', text, count=1, flags=re.M)
    if count != 1:
        raise ValueError(f"{path}: no line of the form REPO_URL = \"...\" to rewrite")
    path.write_text(new_text, encoding="utf-8")
    return new_text != text


def sync(repo_url=REPO_URL, branch=BRANCH):
    """Write the setup cell into every notebook and the table into both READMEs; return the changed paths."""
    changed = [NOTEBOOK_DIR / notebook.file for notebook in NOTEBOOKS
               if sync_notebook(NOTEBOOK_DIR / notebook.file, repo_url)]
    changed += [path for lang, path in READMES.items() if sync_readme(path, lang, repo_url, branch)]
    return changed


def main(argv=None):
    """Run `python -m myq.course sync [--repo-url URL]`; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m myq.course",
                                     description="Keep the notebooks' setup cells and the READMEs' links in step.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sync_parser = subparsers.add_parser("sync", help="rewrite setup cells and README tables from myq/course.py")
    sync_parser.add_argument("--repo-url", default=None, metavar="URL",
                             help=f"clone URL of your fork; also saved as REPO_URL in myq/course.py "
                                  f"(default: {REPO_URL})")
    args = parser.parse_args(argv)
    try:
        if args.repo_url is not None and set_repo_url_in_source(args.repo_url):
            print(f"REPO_URL set to {args.repo_url} in myq/course.py")
        changed = sync(args.repo_url or REPO_URL)
    except (ValueError, OSError) as error:
        # A missing README or notebook, or one without the expected markers or setup cell, gets one line.
        print(f"{parser.prog} sync: error: {error}", file=sys.stderr)
        return 2
    for path in changed:
        print(f"updated {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    print(f"{len(changed)} file(s) updated, {len(NOTEBOOKS)} notebooks and {len(READMES)} READMEs checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
