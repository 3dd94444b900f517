import pytest
import torch
import torch.nn.functional as F

from myq.layers import QuantizedLinear, QuantizedLinearLayer
from myq.quant import linear_dequantize, linear_quantize


def test_seed_layer_buffers_and_names():
    layer = QuantizedLinearLayer(16, 4, bias=True, dtype=torch.bfloat16)
    assert set(dict(layer.named_buffers())) == {"weight", "scale", "bias"}
    assert layer.weight.dtype == torch.int8
    assert layer.weight.shape == (4, 16)
    assert layer.scale.dtype == torch.bfloat16
    assert layer.scale.shape == (4,)
    assert list(layer.parameters()) == []


def test_unquantized_layer_outputs_only_its_bias():
    layer = QuantizedLinearLayer(8, 3)
    layer.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    y = layer(torch.randn(5, 8))
    assert torch.equal(y, torch.tensor([[1.0, 2.0, 3.0]]).expand(5, 3))


def test_seed_layer_matches_linear_on_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8)
    layer = QuantizedLinearLayer(32, 8).quantize(linear.weight, linear.bias)
    w_q, scale, _ = linear_quantize(linear.weight, 8, axis=0)
    assert torch.equal(layer.weight, w_q)
    x = torch.randn(2, 5, 32)
    expected = F.linear(x, linear_dequantize(w_q, scale), linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_to_dtype_keeps_int8_weight():
    layer = QuantizedLinearLayer(8, 4).quantize(torch.randn(4, 8))
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.int8
    assert layer.scale.dtype == torch.bfloat16
    assert layer.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("bits,group_size,symmetric", [
    (8, None, True), (8, 16, True), (4, None, True), (4, 16, True), (4, 16, False),
    (2, None, False), (2, 16, False), (2, 16, True)])
def test_layer_matches_reference_quantizer(bits, group_size, symmetric):
    torch.manual_seed(0)
    w = torch.randn(6, 48)
    layer = QuantizedLinear(48, 6, bias=False, bits=bits, group_size=group_size, symmetric=symmetric).quantize(w)
    granularity = dict(axis=0) if group_size is None else dict(group_size=group_size)
    w_q, scale, zero_point = linear_quantize(w, bits, symmetric, **granularity)
    assert torch.equal(layer.int_weight(), w_q)
    torch.testing.assert_close(layer.dequantized_weight(), linear_dequantize(w_q, scale, zero_point, group_size))
    x = torch.randn(3, 48)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantized_weight()))


@pytest.mark.parametrize("bits,width", [(8, 33), (4, 17), (2, 9)])
def test_packed_storage_width(bits, width):
    layer = QuantizedLinear(33, 5, bits=bits)
    assert layer.weight.shape == (5, width)


def test_grid_weight_round_trips_through_4bit_layer():
    codes = torch.randint(-7, 8, (4, 32)).float()
    codes[:, 0] = 7
    w = codes * 0.125
    layer = QuantizedLinear(32, 4, bits=4, group_size=None).quantize(w)
    assert torch.equal(layer.dequantized_weight(), w)


def test_float16_layer_keeps_tiny_scales():
    w = torch.full((2, 8), 1e-6, dtype=torch.float16)
    layer = QuantizedLinearLayer(8, 2, bias=False, dtype=torch.float16).quantize(w)
    assert layer.scale.dtype == torch.float32
    assert (layer.scale > 0).all()
    assert (layer.dequantized_weight(torch.float32) > 0).all()


def test_input_dtype_rejected_with_both_names():
    layer = QuantizedLinearLayer(8, 2)
    with pytest.raises(TypeError, match="floating-point tensor .* got torch.int64"):
        layer(torch.ones(1, 8, dtype=torch.long))


def test_input_width_rejected_with_both_shapes():
    layer = QuantizedLinear(8, 2, bits=4)
    with pytest.raises(ValueError, match=r"input has shape \(1, 9\); expected the last dimension to be in_features=8"):
        layer(torch.ones(1, 9))


def test_nan_weight_rejected():
    w = torch.randn(2, 8)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="1 NaN and 0 Inf"):
        QuantizedLinearLayer(8, 2).quantize(w)


def test_meta_weight_rejected():
    with pytest.raises(ValueError, match="meta device"):
        QuantizedLinearLayer(8, 2).quantize(torch.empty(2, 8, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grid_weight_round_trips_with_groups(dtype):
    # Each group of 16 has its own power-of-two step and uses code 7, so max|w| / 7 is that step exactly.
    torch.manual_seed(0)
    codes = torch.randint(-7, 8, (4, 64)).float()
    codes[:, ::16] = 7
    steps = torch.tensor([0.5, 0.125, 2.0, 0.03125]).repeat_interleave(16)  # (K,)
    w = (codes * steps).to(dtype)
    layer = QuantizedLinear(64, 4, bits=4, group_size=16, dtype=dtype).quantize(w)
    assert torch.equal(layer.int_weight().float(), codes)
    assert torch.equal(layer.dequantized_weight(dtype), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False), (2, True), (2, False)])
def test_groupwise_error_within_half_step(dtype, bits, symmetric):
    torch.manual_seed(0)
    w = (torch.randn(32, 256) * torch.rand(32, 1) * 3 + torch.randn(32, 1)).to(dtype)
    layer = QuantizedLinear(256, 32, bits=bits, group_size=32, symmetric=symmetric, dtype=dtype).quantize(w)
    error = (layer.dequantized_weight(torch.float32) - w.float()).abs().reshape(32, 8, 32)  # (N, K) -> (N, G, S)
    step = layer.scale.float().reshape(32, 8, 1)
    assert (error <= (0.5 + 1e-4) * step).all()  # slack for float32 rounding of weights exactly half-way


def test_bfloat16_scale_never_rounded_down():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    layer = QuantizedLinear(128, 64, bits=4, group_size=32, dtype=torch.bfloat16).quantize(w)
    exact = w.reshape(64, 4, 32).abs().amax(dim=-1) / 7  # (N, K) -> (N, G, S) -> (N, G)
    assert (layer.scale.float() >= exact).all()
    assert (layer.scale.float() < exact * (1 + 2 ** -7)).all()  # at most one bfloat16 step above


@pytest.mark.parametrize("group_size", [48, 0, -32, 512])
def test_bad_group_size_names_both_numbers(group_size):
    with pytest.raises(ValueError, match=rf"group_size={group_size} does not divide K=256; "
                                         rf"sizes that divide it: \[256, 128, 64, 32"):
        QuantizedLinear(256, 8, bits=4, group_size=group_size)
