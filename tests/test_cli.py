import bz2
import re
import subprocess
import sys

import pytest

import myq
from myq import cli

ROW = re.compile(r"^(?P<label>[A-Za-z /()]+?)\s+(?P<before>[\d.]+)\s+(?P<after>[\d.]+)\s+(?P<ratio>[\d.]+)x$")


def parse_report(text):
    """Return ({header key: value}, {row label: (before, after, ratio)}, [sample lines]) of a report."""
    header, rows, samples = {}, {}, []
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            rows[match["label"]] = tuple(float(match[k]) for k in ("before", "after", "ratio"))
        elif line.startswith("sample"):
            samples.append(line)
        elif line[:13].strip() in {"model", "quantization", "eval text", "prompt", "save"}:
            header[line[:13].strip()] = line[13:]
    return header, rows, samples


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "myq", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def offline_report():
    return run_cli("quantize", "--offline")


def test_offline_report_end_to_end(offline_report):
    assert offline_report.returncode == 0, offline_report.stderr
    lines = offline_report.stdout.splitlines()
    assert lines[0].startswith("offline mode: using the embedded model data/opt-tiny-docs")
    header, rows, samples = parse_report(offline_report.stdout)
    assert header["model"] == "data/opt-tiny-docs (embedded model, in place of facebook/opt-350m)"
    assert header["quantization"].startswith("W8A16 per-channel symmetric, 26 linear layers replaced")
    assert header["eval text"].startswith("data/text/python_tutorial.txt (")
    assert set(rows) == {"footprint (MB)", "perplexity", "bits per byte", "decode speed (tokens/s)"}
    assert len(samples) == 2


def test_offline_report_numbers(offline_report):
    _, rows, _ = parse_report(offline_report.stdout)
    before_mb, after_mb, mb_ratio = rows["footprint (MB)"]
    assert after_mb < before_mb
    assert mb_ratio == pytest.approx(after_mb / before_mb, abs=2e-3)
    before_ppl, after_ppl, _ = rows["perplexity"]
    assert after_ppl == pytest.approx(before_ppl, rel=0.01)


def test_embedded_model_beats_bzip2(offline_report):
    # The quality target of the embedded model: it compresses the held-out text better than bzip2 -9.
    _, rows, _ = parse_report(offline_report.stdout)
    data = myq.held_out_text().encode("utf-8")
    bzip2_bits_per_byte = 8 * len(bz2.compress(data, compresslevel=9)) / len(data)
    assert rows["bits per byte"][0] < bzip2_bits_per_byte


@pytest.mark.parametrize("flag", [["--bits", "3"], ["--group-size", "0"], ["--group-size", "x"]])
def test_bad_flag_exits_2(flag, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["quantize", "--offline", *flag])
    assert stopped.value.code == 2
    assert flag[0] in capsys.readouterr().err


def test_group_size_not_dividing_k(capsys):
    status = cli.main(["quantize", "--offline", "--bits", "4", "--group-size", "48"])
    message = capsys.readouterr().err
    assert status == 2
    assert "group_size=48 does not divide" in message
    assert "Traceback" not in message


def test_bad_bits_subprocess_no_traceback():
    result = run_cli("quantize", "--offline", "--bits", "3")
    assert result.returncode == 2
    assert "invalid choice: 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_eval_text(tmp_path, capsys):
    status = cli.main(["quantize", "--offline", "--eval-text", str(tmp_path / "none.txt")])
    assert status == 2
    assert "none.txt: file not found" in capsys.readouterr().err


def test_w4_report_in_process(capsys, tmp_path):
    status = cli.main(["quantize", "--offline", "--bits", "4", "--group-size", "128", "--eval-chars", "4000"])
    header, rows, samples = parse_report(capsys.readouterr().out)
    assert status == 0
    assert header["quantization"].startswith("W4A16 group size 128 symmetric")
    assert "first 4,000 characters" in header["eval text"]
    assert rows["footprint (MB)"][2] < 0.5


def test_save_writes_safetensors(capsys, tmp_path):
    status = cli.main(["quantize", "--offline", "--eval-chars", "2000", "--save", str(tmp_path / "w8")])
    header, _, _ = parse_report(capsys.readouterr().out)
    assert status == 0
    assert header["save"] == f"saved to {tmp_path / 'w8'}"
    assert (tmp_path / "w8" / "model.safetensors").is_file()


def test_parser_defaults():
    args = cli.build_parser().parse_args(["quantize"])
    assert (args.model, args.bits, args.group_size, args.offline) == ("facebook/opt-350m", 8, None, False)
    assert args.run is cli.run_quantize
