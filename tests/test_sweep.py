import copy
import math

import pytest
import torch

import myq
from myq.sweep import format_rows, model_bits_per_weight, perplexity_sweep, setting_label

TEXT = "The quick brown fox jumps over the lazy dog. " * 4


class ByteTokenizer:
    """A tokenizer stand-in: one token per UTF-8 byte (ids 3..258) after BOS id 2, enough for perplexity."""

    bos_token_id = 2

    def __call__(self, text, return_tensors="pt", verbose=False):
        ids = [self.bos_token_id] + [byte + 3 for byte in text.encode("utf-8")]
        return {"input_ids": torch.tensor([ids])}


@pytest.fixture
def factory(tiny_opt):
    return lambda: copy.deepcopy(tiny_opt)


def test_sweep_rows_follow_settings(factory):
    settings = [{"bits": 16}, {"bits": 8}, {"bits": 4, "group_size": 32}, {"bits": 2, "group_size": 32},
                {"bits": 2, "group_size": 32, "symmetric": True}]
    rows = perplexity_sweep(factory, ByteTokenizer(), TEXT, settings)
    assert [row["label"] for row in rows] == ["unquantized", "W8 per-channel", "W4 g32", "W2 g32", "W2 g32 sym"]
    # float32 layers: 32-bit scales, 8-bit zero points; per-channel costs 32 bits per row of K weights.
    linears = [m for name, m in factory().named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    per_channel = sum(8 * m.weight.numel() + 32 * m.out_features for m in linears) / sum(
        m.weight.numel() for m in linears)
    expected = [32, per_channel, 4 + 32 / 32, 2 + 40 / 32, 2 + 32 / 32]
    assert [row["bits_per_weight"] for row in rows] == pytest.approx(expected, rel=1e-12)
    assert rows[0]["footprint_mb"] == myq.footprint_mb(factory())
    assert all(math.isfinite(row["perplexity"]) for row in rows)


def test_baseline_row_matches_perplexity(factory):
    (row,) = perplexity_sweep(factory, ByteTokenizer(), TEXT, [{"bits": 16}])
    assert row["perplexity"] == myq.perplexity(factory(), ByteTokenizer(), TEXT)


def test_sweep_leaves_factory_model_float(tiny_opt):
    perplexity_sweep(lambda: copy.deepcopy(tiny_opt), ByteTokenizer(), TEXT, [{"bits": 4, "group_size": 32}])
    assert myq.quantized_layers(tiny_opt) == {}


def test_model_bits_per_weight_weights_layer_sizes(tiny_opt):
    myq.quantize_model(tiny_opt, bits=4, group_size=64)
    # Every layer stores 4-bit codes and one float32 scale per 64 weights, whatever its shape.
    assert model_bits_per_weight(tiny_opt) == 4 + 32 / 64


def test_model_bits_per_weight_needs_quantized_layers(tiny_opt):
    with pytest.raises(ValueError, match="no quantized layers"):
        model_bits_per_weight(tiny_opt)


@pytest.mark.parametrize("setting,message", [
    ({"bits": 3}, r"bits=3; use one of \(2, 4, 8\), or 16"),
    ({"bits": 4, "groupsize": 32}, r"unknown keys \['groupsize'\]"),
])
def test_bad_setting_rejected_before_building(setting, message):
    built = []
    with pytest.raises(ValueError, match=message):
        perplexity_sweep(lambda: built.append(1), ByteTokenizer(), TEXT, [{"bits": 8}, setting])
    assert built == []


@pytest.mark.parametrize("args,label", [
    ((4, None, None), "W4 per-channel"), ((4, 128, True), "W4 g128"), ((4, 128, False), "W4 g128 asym"),
    ((2, 64, None), "W2 g64"), ((2, 64, False), "W2 g64"), ((2, 64, True), "W2 g64 sym"),
])
def test_setting_label_names_non_default_symmetry(args, label):
    assert setting_label(*args) == label


def test_format_rows_fixed_width():
    rows = [{"label": "W4 g128", "bits_per_weight": 4.125, "footprint_mb": 212.57, "perplexity": 21.4567}]
    assert format_rows(rows).splitlines() == [
        "setting            bits/weight  size (MB)  perplexity",
        "W4 g128                 4.1250     212.57      21.457",
    ]
