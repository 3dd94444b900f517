"""The `python -m myq` command line.

`python -m myq quantize [MODEL]` loads a model (facebook/opt-350m by default, the embedded model
offline) and quantizes its linear layers with `myq.quantize_model`. It prints one before/after report:
footprint, perplexity and bits per byte on a held-out text, decode speed and a greedy sample.
`python -m myq generate DIR PROMPT` loads a folder that `quantize --save` wrote (or a Hub repo id) with
`myq.load_quantized` and prints the greedy continuation of PROMPT.

Each subcommand is a pair: `add_<name>_parser(subparsers)` declares its flags and sets `run`, the function
that receives the parsed arguments and returns the exit status. Adding one means writing such a pair and
listing the first in `SUBCOMMANDS`.
"""

import argparse
import sys
from pathlib import Path

import torch

from . import evaluate, models
from .footprint import footprint_mb
from .quant import SUPPORTED_BITS
from .serialization import load_quantized, save_quantized
from .swap import check_targets, find_linears, quantize_model

USAGE_ERROR = 2
SAMPLE_TOKENS = 30
SPEED_TOKENS = 32
EXCLUDE = ("lm_head",)


def positive_int(text):
    """Parse a positive int for argparse, with a message that names the value received."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def add_quantize_parser(subparsers):
    """Declare `quantize` and its flags."""
    parser = subparsers.add_parser(
        "quantize", help="quantize a model and report footprint, perplexity, speed and a sample",
        description="Quantize the linear layers of a causal language model and print a before/after report.")
    parser.add_argument("model", nargs="?", default=models.DEFAULT_MODEL_ID,
                        help="Hugging Face Hub id or local folder (default: %(default)s, or the embedded "
                             "model when the Hub cannot be reached)")
    parser.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=8, help="weight bits (default: 8)")
    parser.add_argument("--group-size", type=positive_int, default=None, metavar="N",
                        help="weights per scale along K. It must divide every layer's in_features "
                             "(default: one scale per output channel)")
    parser.add_argument("--offline", action="store_true", help="do not contact the Hub: use the embedded model")
    parser.add_argument("--eval-text", type=Path, default=None, metavar="FILE",
                        help="UTF-8 text for perplexity (default: data/text/python_tutorial.txt)")
    parser.add_argument("--eval-chars", type=positive_int, default=None, metavar="N",
                        help="evaluate only the first N characters of the text, for opt-350m on a CPU "
                             "(default: the whole text)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: %(default)s)")
    parser.add_argument("--save", type=Path, default=None, metavar="DIR",
                        help="save the quantized model and tokenizer to DIR (safetensors)")
    parser.set_defaults(run=run_quantize)
    return parser


def add_generate_parser(subparsers):
    """Declare `generate` and its flags."""
    parser = subparsers.add_parser(
        "generate", help="load a saved quantized model and print a greedy continuation",
        description="Load a folder written by `quantize --save` (or myq.save_quantized) and print the greedy "
                    "continuation of PROMPT.")
    parser.add_argument("directory", metavar="DIR", help="saved folder, or a Hugging Face Hub repo id")
    parser.add_argument("prompt", metavar="PROMPT", help="text to continue")
    parser.add_argument("--max-new-tokens", type=positive_int, default=SAMPLE_TOKENS, metavar="N",
                        help="maximum number of tokens to generate (default: %(default)s)")
    parser.add_argument("--offline", action="store_true", help="for a repo id, look only in the local Hub cache")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: %(default)s)")
    parser.set_defaults(run=run_generate)
    return parser


# Each entry declares one subcommand on the subparsers object it is given.
SUBCOMMANDS = (add_quantize_parser, add_generate_parser)


def build_parser():
    """Return the `python -m myq` parser with every subcommand in `SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(prog="python -m myq",
                                     description="myq: a small weight quantizer for LLMs, written to be read.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def status(message):
    """Print a progress line to stderr, so that stdout carries only the report."""
    print(message, file=sys.stderr, flush=True)


def read_eval_text(path, n_chars):
    """Return (label, text): the file at `path` (default: the held-out tutorial), cut to `n_chars`."""
    if path is None:
        label, text = str(models.HELD_OUT_TEXT.relative_to(models.DATA_DIR.parent)), models.held_out_text()
    elif not path.is_file():
        raise ValueError(f"--eval-text {path}: file not found")
    else:
        label, text = str(path), path.read_text(encoding="utf-8")
    if n_chars is not None and n_chars < len(text):
        label, text = f"{label}, first {n_chars:,} characters", text[:n_chars]
    return label, text


def check_group_size(model, group_size):
    """Raise ValueError when `group_size` does not divide some layer's K, before anything is measured."""
    targets, _ = find_linears(model, EXCLUDE)
    check_targets(model, targets, {"group_size": group_size}, quantized=False)


def measure(model, tokenizer, text, prompt):
    """Return a dict of the measurements the report compares before and after quantization."""
    nll_sum, n_tokens = evaluate.negative_log_likelihood(model, tokenizer, text)
    return {
        "footprint": footprint_mb(model),
        "perplexity": evaluate.perplexity_from_nll(nll_sum, n_tokens),
        "bits_per_byte": evaluate.bits_per_byte_from_nll(nll_sum, text),
        "speed": evaluate.decode_tokens_per_second(model, tokenizer, prompt, SPEED_TOKENS, warmup=2, repeats=5),
        "sample": evaluate.generate(model, tokenizer, prompt, SAMPLE_TOKENS),
        "n_tokens": n_tokens,
    }


def describe_model(model, requested):
    """Return the report's model line, saying when the embedded model replaced `requested`."""
    if not models.is_embedded_model(model):
        return requested
    embedded = str(models.EMBEDDED_MODEL_DIR.relative_to(models.DATA_DIR.parent))
    if Path(requested).expanduser().resolve() == models.EMBEDDED_MODEL_DIR.resolve():
        return f"{embedded} (embedded model)"
    return f"{embedded} (embedded model, in place of {requested})"


def describe_quantization(config, dtype):
    """Return the report's quantization line from a `QuantizationConfig`."""
    granularity = "per-channel" if config.group_size is None else f"group size {config.group_size}"
    kind = "symmetric" if config.symmetric else "asymmetric"
    kept = f", kept in {str(dtype).removeprefix('torch.')}: {', '.join(config.skipped)}" if config.skipped else ""
    return f"W{config.bits}A16 {granularity} {kind}, {len(config.replaced)} linear layers replaced{kept}"


ROWS = (  # (label, key, format)
    ("footprint (MB)", "footprint", "{:.2f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("bits per byte", "bits_per_byte", "{:.4f}"),
    ("decode speed (tokens/s)", "speed", "{:.1f}"),
)


def format_report(header, before, after):
    """Return the report: `header` lines, the before/after table, then both samples."""
    lines = [f"{key:<13}{value}" for key, value in header]
    lines += ["", f"{'':<25}{'before':>12}{'after':>12}{'after/before':>14}"]
    for label, key, number in ROWS:
        ratio = after[key] / before[key]
        lines.append(f"{label:<25}{number.format(before[key]):>12}{number.format(after[key]):>12}"
                     f"{ratio:>13.3f}x")
    lines += ["", f"{'sample before':<15}{before['sample']!r}", f"{'sample after':<15}{after['sample']!r}"]
    return "\n".join(lines)


def save_model(model, tokenizer, directory):
    """Save the quantized model and its tokenizer to `directory`; return the report line."""
    save_quantized(model, directory, tokenizer=tokenizer)
    return f"saved to {directory}"


def run_quantize(args):
    """Load, measure, quantize, measure again and print the report; return the exit status."""
    label, text = read_eval_text(args.eval_text, args.eval_chars)
    model, tokenizer = models.load_model(args.model, offline=True if args.offline else None)
    model.to(args.device)
    status(f"loaded {describe_model(model, str(args.model))} on {args.device}")
    if args.group_size is not None:
        check_group_size(model, args.group_size)
    prompt = evaluate.default_prompt(model)

    status("measuring the bfloat16 model")
    before = measure(model, tokenizer, text, prompt)
    status(f"quantizing to {args.bits} bits")
    quantize_model(model, bits=args.bits, group_size=args.group_size, exclude=EXCLUDE)
    status("measuring the quantized model")
    after = measure(model, tokenizer, text, prompt)

    header = [("model", describe_model(model, str(args.model))),
              ("quantization", describe_quantization(model.myq_config, model.dtype)),
              ("eval text", f"{label} ({after['n_tokens']:,} tokens scored)"),
              ("prompt", repr(prompt))]
    if args.save is not None:
        header.append(("save", save_model(model, tokenizer, args.save)))
    print(format_report(header, before, after))
    return 0


def run_generate(args):
    """Load the saved model in `args.directory`, print the continuation of `args.prompt`; return the status."""
    try:
        model, tokenizer = load_quantized(args.directory, offline=True if args.offline else None)
    except OSError as error:
        # A missing folder or file is a wrong argument of this command: exit with the usage status.
        raise ValueError(str(error)) from error
    if tokenizer is None:
        raise ValueError(f"{args.directory} has no tokenizer; save the model with "
                         f"myq.save_quantized(model, directory, tokenizer=tokenizer)")
    model.to(args.device)
    print(evaluate.generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens))
    return 0


def main(argv=None):
    """Run `python -m myq` with `argv` (default: sys.argv[1:]) and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        # Settings that prove invalid only once the model is loaded (a group size that does not divide K).
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 1
