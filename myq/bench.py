"""Benchmark decoding and prefill speed of bf16 and quantized opt-350m on the CPU: `python -m myq.bench`.

Builds facebook/opt-350m's architecture with random weights, which needs no download, and speed does
not depend on the values. It quantizes copies of it and prints one table: footprint, time to quantize,
greedy decode tokens per second and prefill time, each with its ratio to bf16 measured in the same run.
Rows: bf16, W8 and W4 g128 through the plain path and the fast path, plus optimum-quanto (qint8, qint4)
and torchao (int8 weight-only) when they are importable. Every measurement is repeated, interleaved
across the rows so that a busy moment hits them all alike, and the best run is kept.

Shapes: B/T = batch/tokens; the benchmark uses B = 1. Left out: GPUs, batched decoding, accuracy
(see `myq.perplexity`).
"""

import argparse
import contextlib
import copy
import inspect
import platform
import time
from dataclasses import dataclass, field

import torch

from .footprint import footprint_bytes
from .layers import plain_path, prepare_fast
from .models import build_opt_350m
from .swap import quantize_model

PROMPT_TOKENS = 8
MAX_POSITIONS = 2048  # opt-350m's max_position_embeddings


@dataclass
class Variant:
    """One row of the table: a model, how to run it, and what was measured."""
    name: str
    model: torch.nn.Module
    plain: bool = False
    quantize_seconds: float | None = None  # None for the unquantized model
    footprint_bytes: int = 0
    decode_seconds: list = field(default_factory=list)
    prefill_seconds: list = field(default_factory=list)

    def running(self):
        """Return a context manager that selects this row's forward path."""
        return plain_path() if self.plain else contextlib.nullcontext()


def cpu_model():
    """Return the CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def token_ids(n_tokens, vocab_size, seed=0):
    """Return (1, T) random token ids, the same for every row: speed does not depend on the text."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (1, n_tokens), generator=generator)


@torch.no_grad()  # not inference_mode: optimum-quanto's qint4 matmul fails on inference tensors
def greedy_decode(model, prompt_ids, new_tokens):
    """Return (the `new_tokens` greedy token ids (1, new_tokens), seconds of the one-token steps).

    The prompt's own forward pass is not timed: the clock covers only one-token steps with a KV cache.
    """
    keyword = cache_keyword(model)
    output = model(input_ids=prompt_ids, use_cache=True)
    cache, token = getattr(output, keyword), output.logits[:, -1:].argmax(-1)
    tokens = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        output = model(input_ids=token, use_cache=True, **{keyword: cache})
        cache, token = getattr(output, keyword), output.logits[:, -1:].argmax(-1)
        tokens.append(token)
    return torch.cat(tokens, dim=1), time.perf_counter() - start


def decode_seconds(model, prompt_ids, new_tokens):
    """Return the seconds `model` takes for `new_tokens` one-token greedy steps after `prompt_ids`."""
    return greedy_decode(model, prompt_ids, new_tokens + 1)[1]


def cache_keyword(model):
    """Return the name of the KV-cache argument and output: "cache" in newer transformers, else "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def prefill_seconds(model, input_ids):
    """Return the seconds of one forward pass over `input_ids` (1, T), without a KV cache."""
    start = time.perf_counter()
    model(input_ids=input_ids, use_cache=False)
    return time.perf_counter() - start


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def myq_variants(base, include_plain=True):
    """Return the myq rows: W8 and W4 g128, through the plain path (if asked) and the fast path.

    The fast W4 model is prepared for its kernel right after quantizing, and that time is included in
    its quantize time. W8 plain and W8 fast share one model, since only the switch differs.
    """
    variants = []
    for bits, group_size, label in ((8, None, "W8"), (4, 128, "W4 g128")):
        model, seconds = _timed(quantize_model, copy.deepcopy(base), bits=bits, group_size=group_size)
        if include_plain:
            variants.append(Variant(f"{label} plain", model, plain=True, quantize_seconds=seconds))
            if bits == 4:  # the fast path changes a 4-bit model's layout, so it gets its own copy
                model, seconds = _timed(quantize_model, copy.deepcopy(base), bits=bits, group_size=group_size)
        _, prepare = _timed(prepare_fast, model)
        variants.append(Variant(f"{label} fast", model, quantize_seconds=seconds + prepare))
    for variant in variants:
        variant.footprint_bytes = footprint_bytes(variant.model)
    return variants


def not_lm_head(module, name):
    """Return whether `module` is a linear layer other than the tied lm_head (kept in bf16 in every row)."""
    return isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")


def third_party_variants(base):
    """Return rows for optimum-quanto (qint8, qint4 g128) and torchao (int8 weight-only), where importable."""
    variants = []
    try:
        from optimum import quanto
    except ImportError:
        quanto = None
    if quanto is not None:
        for qtype in ("qint8", "qint4"):
            model = copy.deepcopy(base)
            _, seconds = _timed(quanto.quantize, model, weights=getattr(quanto, qtype), exclude="lm_head")
            _, freeze = _timed(quanto.freeze, model)
            variants.append(Variant(f"quanto {qtype}", model, quantize_seconds=seconds + freeze))
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        quantize_ = None
    if quantize_ is not None:
        model = copy.deepcopy(base)
        _, seconds = _timed(quantize_, model, Int8WeightOnlyConfig(), filter_fn=not_lm_head)
        variants.append(Variant("torchao int8wo", model, quantize_seconds=seconds))
    for variant in variants:
        variant.footprint_bytes = stored_bytes(variant.model)
    return variants


def stored_bytes(model):
    """Return the bytes `model`'s parameters and buffers really hold, a shared tensor counted once.

    Quantized tensor subclasses (optimum-quanto, torchao) report the float shape to `numel()`, so
    `get_memory_footprint()` counts them at full width. Here each one is taken apart into the plain
    tensors it contains (`__tensor_flatten__`), and those are counted.
    """
    seen, total = set(), 0
    pending = list(model.parameters()) + list(model.buffers())
    while pending:
        tensor = pending.pop()
        if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = tensor.__tensor_flatten__()
            pending.extend(getattr(tensor, name) for name in names)
            continue
        key = (tensor.device, tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def measure(variants, new_tokens=32, prefill_tokens=256, repeats=3, prompt_tokens=PROMPT_TOKENS):
    """Time decoding and prefill of every variant `repeats` times, interleaved; store the times in them.

    One untimed warm-up of each comes first, so one-time work (allocations, lazy preparation) is
    not timed. Returns `variants`.
    """
    vocab_size = variants[0].model.config.vocab_size
    prompt = token_ids(prompt_tokens, vocab_size)
    long_prompt = token_ids(prefill_tokens, vocab_size, seed=1)
    for variant in variants:
        with variant.running():
            decode_seconds(variant.model, prompt, 1)
            prefill_seconds(variant.model, long_prompt[:, :8])
    for _ in range(repeats):
        for variant in variants:
            with variant.running():
                variant.decode_seconds.append(decode_seconds(variant.model, prompt, new_tokens))
                variant.prefill_seconds.append(prefill_seconds(variant.model, long_prompt))
    return variants


def table_rows(variants, new_tokens):
    """Return one dict per variant: footprint MB, quantize s, decode tokens/s, prefill s and ratios to the first."""
    rows = []
    for variant in variants:
        rows.append({"name": variant.name, "footprint_mb": variant.footprint_bytes / 1e6,
                     "quantize_s": variant.quantize_seconds,
                     "decode_tokens_per_s": new_tokens / min(variant.decode_seconds),
                     "prefill_s": min(variant.prefill_seconds)})
    reference = rows[0]
    for row in rows:
        row["decode_ratio"] = row["decode_tokens_per_s"] / reference["decode_tokens_per_s"]
        row["prefill_ratio"] = reference["prefill_s"] / row["prefill_s"]  # > 1 means faster than bf16
    return rows


def format_table(rows, new_tokens, prefill_tokens):
    """Return the rows as a fixed-width text table with units."""
    header = (f"{'model':<16} {'footprint MB':>12} {'quantize s':>10} {'decode tok/s':>12} {'x bf16':>7} "
              f"{f'prefill {prefill_tokens} s':>13} {'x bf16':>7}")
    lines = [header, "-" * len(header)]
    for row in rows:
        quantize = "-" if row["quantize_s"] is None else f"{row['quantize_s']:.2f}"
        lines.append(f"{row['name']:<16} {row['footprint_mb']:>12.1f} {quantize:>10} "
                     f"{row['decode_tokens_per_s']:>12.2f} {row['decode_ratio']:>6.2f}x "
                     f"{row['prefill_s']:>13.3f} {row['prefill_ratio']:>6.2f}x")
    lines.append(f"decode: {new_tokens} greedy tokens after a {PROMPT_TOKENS}-token prompt, with a KV cache. "
                 f"Prefill x bf16 > 1 means faster. Best of the repeats.")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m myq.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default: 2)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per timed run (default: 32)")
    parser.add_argument("--prefill-tokens", type=int, default=256, help="prompt length of the prefill timing "
                        "(default: 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row, best kept (default: 3)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 new tokens, a 64-token prefill, "
                        "1 repeat, no optimum-quanto or torchao rows")
    args = parser.parse_args(argv)
    for name in ("threads", "new_tokens", "prefill_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.prefill_tokens > MAX_POSITIONS or PROMPT_TOKENS + args.new_tokens + 1 > MAX_POSITIONS:
        parser.error(f"--prefill-tokens={args.prefill_tokens} and {PROMPT_TOKENS} prompt tokens + "
                     f"--new-tokens={args.new_tokens} must each fit opt-350m's {MAX_POSITIONS} positions")
    if args.quick:
        args.new_tokens, args.prefill_tokens, args.repeats = 8, 64, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu_model()}")
    base, seconds = _timed(build_opt_350m, torch.bfloat16)
    print(f"built opt-350m's architecture (random weights, bfloat16) in {seconds:.1f} s")

    variants = [Variant("bf16", base, footprint_bytes=footprint_bytes(base))]
    variants += myq_variants(base)
    if not args.quick:
        variants += third_party_variants(base)
    measure(variants, args.new_tokens, args.prefill_tokens, args.repeats)
    print(format_table(table_rows(variants, args.new_tokens), args.new_tokens, args.prefill_tokens))


if __name__ == "__main__":
    main()
