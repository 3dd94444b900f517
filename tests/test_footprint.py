"""Footprints of opt-350m's architecture (random bf16 weights) at 16, 8, 4 and 2 bits, and bits per weight.

The expected sizes are worked out from the layer shapes alone. A quantized layer stores its codes
(bits x weights, packed into bytes), one bf16 scale per row or group and, when asymmetric, one int8 zero
point per row or group. Embeddings, layer norms and biases stay in bf16. The tied lm_head is excluded
and counted once.
"""

import copy
import gc
import math

import pytest
import torch
from torch import nn

import myq
from myq.footprint import bits_per_weight, footprint_bytes, footprint_mb

BF16_BYTES = 2
# (bits, group_size) -> footprint in MB (10^6 bytes), rounded to 0.1 MB.
FOOTPRINTS_MB = {(16, None): 662.4, (8, None): 359.8, (4, 128): 212.6, (2, 128): 139.2}


@pytest.fixture(scope="module")
def opt_350m():
    model = myq.build_opt_350m(dtype=torch.bfloat16)
    yield model
    del model
    gc.collect()


@pytest.fixture(scope="module", params=[(8, None), (4, 128), (2, 128)], ids=["W8", "W4-g128", "W2-g128"])
def quantized_350m(request, opt_350m):
    bits, group_size = request.param
    model = myq.quantize_model(copy.deepcopy(opt_350m), bits=bits, group_size=group_size)
    yield bits, group_size, model
    del model
    gc.collect()


def expected_bytes(float_model, bits, group_size, symmetric):
    """Return the bytes a quantized copy of `float_model` should take, from its layer shapes alone."""
    linears = [m for name, m in float_model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
    n_params = sum(p.numel() for p in float_model.parameters())  # a tied tensor is listed once
    n_quantized = sum(m.weight.numel() for m in linears)
    total = (n_params - n_quantized) * BF16_BYTES  # embeddings, layer norms, biases
    for m in linears:
        n, k = m.out_features, m.in_features
        groups = 1 if group_size is None else k // group_size
        total += n * math.ceil(k * bits / 8)  # codes
        total += n * groups * BF16_BYTES  # scales
        total += 0 if symmetric else n * groups  # int8 zero points
    return total


def test_float_footprint_matches_figure(opt_350m):
    assert round(footprint_mb(opt_350m), 1) == FOOTPRINTS_MB[(16, None)]
    n_params = sum(p.numel() for p in opt_350m.parameters())
    assert footprint_bytes(opt_350m) == n_params * BF16_BYTES


def test_quantized_footprint_matches_figure(quantized_350m):
    bits, group_size, model = quantized_350m
    assert round(footprint_mb(model), 1) == FOOTPRINTS_MB[(bits, group_size)]


def test_packed_footprints_within_budget(opt_350m):
    # The budgets the course promises for packed weights, a little above the exact sizes.
    budgets_mb = {(4, 128): 214.0, (2, 128): 140.5}
    for (bits, group_size), budget in budgets_mb.items():
        expected = expected_bytes(opt_350m, bits, group_size, symmetric=bits != 2)
        assert expected / 1e6 <= budget


def test_formula_equals_measured_bytes(quantized_350m, opt_350m):
    bits, group_size, model = quantized_350m
    symmetric = model.myq_config.symmetric
    assert symmetric == (bits != 2)
    assert footprint_bytes(model) == expected_bytes(opt_350m, bits, group_size, symmetric)


def test_tied_lm_head_counted_once(quantized_350m):
    _, _, model = quantized_350m
    embedding = model.model.decoder.embed_tokens.weight
    assert model.lm_head.weight is embedding
    assert "lm_head" in model.myq_config.skipped
    with_duplicates = sum(p.numel() * p.element_size() for _, p in model.named_parameters(remove_duplicate=False))
    with_duplicates += sum(b.numel() * b.element_size() for b in model.buffers())
    assert footprint_bytes(model) == with_duplicates - embedding.numel() * embedding.element_size()


def test_every_linear_but_lm_head_quantized(quantized_350m):
    _, _, model = quantized_350m
    assert len(myq.quantized_layers(model)) == 24 * 6 + 2  # q, k, v, out, fc1, fc2; project_in/out
    assert not [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]


@pytest.mark.parametrize("bits,group_size,symmetric,expected", [
    (8, None, True, 8 + 16 / 1024),
    (4, None, True, 4 + 16 / 1024),
    (4, 128, True, 4 + 16 / 128),  # 4.125
    (4, 32, True, 4 + 16 / 32),
    (4, 128, False, 4 + (16 + 8) / 128),
    (2, 128, False, 2 + (16 + 8) / 128),  # 2.1875
    (2, 64, False, 2 + (16 + 8) / 64),
    (2, 32, True, 2 + 16 / 32),
])
def test_bits_per_weight_exact(bits, group_size, symmetric, expected):
    layer = myq.QuantizedLinear(1024, 64, bias=True, dtype=torch.bfloat16, bits=bits, group_size=group_size,
                                symmetric=symmetric)
    assert bits_per_weight(layer) == expected


def test_bits_per_weight_of_float16_layer():
    # float16 layers keep float32 scales, so each scale costs 32 bits.
    layer = myq.QuantizedLinear(1024, 64, dtype=torch.float16, bits=4, group_size=128)
    assert bits_per_weight(layer) == 4 + 32 / 128


def test_bits_per_weight_rejects_nn_linear():
    with pytest.raises(TypeError, match="expected a QuantizedLinear, got Linear"):
        bits_per_weight(nn.Linear(8, 8))
