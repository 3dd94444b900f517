"""Quantize fresh copies of a model at several settings and measure each one.

A setting is a dict of `quantize_model` arguments, {"bits": 4, "group_size": 128, "symmetric": None},
where bits=16 stands for the unquantized model, the baseline. Each setting starts from a new model made
by `model_factory()`, because `quantize_model` works in place and rejects a model quantized already.
Each result row contains the setting, its label, the bits per weight of the quantized layers (codes plus
scales and zero points), the footprint in MB and the perplexity of a text.
Left out: activation quantization and speed; `myq.decode_tokens_per_second` measures speed.
"""

import gc

from .evaluate import perplexity
from .footprint import bits_per_weight, footprint_mb
from .layers import default_symmetric
from .quant import SUPPORTED_BITS
from .swap import quantize_model, quantized_layers

BASELINE_BITS = 16
SETTING_KEYS = ("bits", "group_size", "symmetric")


def model_bits_per_weight(model):
    """Return the storage bits per weight over all quantized layers, weighted by each layer's N x K."""
    layers = list(quantized_layers(model).values())
    if not layers:
        raise ValueError("the model has no quantized layers. Quantize it first with myq.quantize_model")
    n_weights = sum(layer.in_features * layer.out_features for layer in layers)
    stored_bits = sum(bits_per_weight(layer) * layer.in_features * layer.out_features for layer in layers)
    return stored_bits / n_weights


def setting_label(bits, group_size=None, symmetric=None):
    """Return a short label such as "W4 g128", "W4 per-channel" or "W2 g64 sym" for a setting.

    The label names the symmetry only where it differs from the default of `bits`.
    """
    if bits == BASELINE_BITS:
        return "unquantized"
    label = f"W{bits} " + ("per-channel" if group_size is None else f"g{group_size}")
    if symmetric is not None and symmetric != default_symmetric(bits):
        label += " sym" if symmetric else " asym"
    return label


def check_setting(setting):
    """Return `setting` with every key filled in, or raise ValueError naming the bad key or value."""
    unknown = sorted(set(setting) - set(SETTING_KEYS))
    if unknown:
        raise ValueError(f"setting {setting} has unknown keys {unknown}. Valid keys: {list(SETTING_KEYS)}")
    bits = setting.get("bits")
    if bits not in (*SUPPORTED_BITS, BASELINE_BITS):
        raise ValueError(f"setting {setting} has bits={bits!r}; use one of {SUPPORTED_BITS}, "
                         f"or {BASELINE_BITS} for the unquantized baseline")
    return {"bits": bits, "group_size": setting.get("group_size"), "symmetric": setting.get("symmetric")}


def measure_setting(model, tokenizer, text, setting, **perplexity_kwargs):
    """Quantize `model` in place with `setting` and return its result row."""
    setting = check_setting(setting)
    if setting["bits"] == BASELINE_BITS:
        weight = next(model.parameters())
        stored_bits = weight.element_size() * 8
    else:
        quantize_model(model, **setting)
        stored_bits = model_bits_per_weight(model)
    return {
        **setting,
        "label": setting_label(**setting),
        "bits_per_weight": stored_bits,
        "footprint_mb": footprint_mb(model),
        "perplexity": perplexity(model, tokenizer, text, **perplexity_kwargs),
    }


def perplexity_sweep(model_factory, tokenizer, text, settings, **perplexity_kwargs):
    """Return one result row per setting, each measured on a fresh model from `model_factory()`.

    Every setting is checked before the first model is built, so a typo fails at once. Extra keyword
    arguments (context_length, stride) go to `myq.perplexity`.
    """
    settings = [check_setting(setting) for setting in settings]
    rows = []
    for setting in settings:
        model = model_factory()
        rows.append(measure_setting(model, tokenizer, text, setting, **perplexity_kwargs))
        del model
        gc.collect()  # frees one model before the next is built
    return rows


def format_rows(rows):
    """Return the result rows as a fixed-width text table, one line per setting."""
    lines = [f"{'setting':<18} {'bits/weight':>11} {'size (MB)':>10} {'perplexity':>11}"]
    for row in rows:
        lines.append(f"{row['label']:<18} {row['bits_per_weight']:>11.4f} {row['footprint_mb']:>10.2f} "
                     f"{row['perplexity']:>11.3f}")
    return "\n".join(lines)
