import math

import pytest
import torch

from myq.quant import (
    check_bits,
    get_scale,
    get_scale_and_zero_point,
    integer_range,
    linear_dequantize,
    linear_quantize,
    max_abs_error,
    mean_squared_error,
    quantize_with,
    sqnr_db,
)


def test_integer_range_signed():
    assert integer_range(8) == (-128, 127)
    assert integer_range(4) == (-8, 7)
    assert integer_range(2) == (-2, 1)


def test_out_of_range_values_saturate():
    w = torch.tensor([-1.0, 0.0, 1.0, 1.01])
    w_q = quantize_with(w, torch.tensor(1 / 127))
    assert w_q.tolist() == [-127, 0, 127, 127]
    w_q = quantize_with(torch.tensor([-300.0, 300.0]), torch.tensor(1.0))
    assert w_q.tolist() == [-128, 127]  # clamped before the cast, so no wrap-around to +/-44


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_grid_weight_round_trips_exactly(bits):
    _, qmax = integer_range(bits)
    scale = torch.tensor([[0.5], [0.25], [2.0]])
    codes = torch.randint(-qmax, qmax + 1, (3, 16)).float()
    codes[:, 0] = qmax  # each row reaches qmax, so max|w| / qmax recovers the scale exactly
    w = codes * scale
    w_q, s, _ = linear_quantize(w, bits, axis=0)
    assert torch.equal(s, scale)
    assert torch.equal(linear_dequantize(w_q, s), w)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", [dict(), dict(axis=0), dict(group_size=8)])
def test_error_at_most_half_a_step(bits, symmetric, granularity):
    torch.manual_seed(0)
    w = torch.randn(6, 32)
    w_q, scale, zero_point = linear_quantize(w, bits, symmetric, **granularity)
    w_dq = linear_dequantize(w_q, scale, zero_point, granularity.get("group_size"))
    error = (w - w_dq).abs()
    if "group_size" in granularity:
        error = error.view(6, 4, 8)
    assert (error <= scale / 2 + 1e-6).all()


def test_scale_shapes_broadcast():
    w = torch.randn(4, 16)
    assert get_scale(w).shape == ()
    assert get_scale(w, axis=0).shape == (4, 1)
    assert get_scale(w, axis=1).shape == (1, 16)
    assert get_scale(w, group_size=4).shape == (4, 4, 1)


def test_asymmetric_zero_point_is_a_code():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-4.0, -2.0, 0.0, 1.0]])
    scale, zero_point = get_scale_and_zero_point(w, bits=8, axis=0)
    assert zero_point.dtype == torch.int8
    assert scale[0].item() == pytest.approx(3 / 255)
    assert zero_point[0].item() == -128  # the row's minimum, 0.0, sits at qmin
    assert zero_point[1].item() == round(-128 + 4 / (5 / 255))
    w_q = quantize_with(w, scale, zero_point)
    zero_codes = w_q[w == 0]
    assert zero_codes.tolist() == [-128, zero_point[1].item()]  # 0.0 maps to exactly its zero point


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_row_stays_exactly_zero(symmetric):
    w = torch.randn(3, 8)
    w[1] = 0
    w_q, scale, zero_point = linear_quantize(w, 8, symmetric, axis=0)
    assert torch.isfinite(scale).all()
    assert (scale > 0).all()
    w_dq = linear_dequantize(w_q, scale, zero_point)
    assert torch.equal(w_dq[1], torch.zeros(8))
    assert not torch.isnan(w_dq).any()


def test_bf16_extreme_magnitudes_get_finite_positive_scales():
    w = torch.tensor([[70000.0, -1.0], [1e-6, -2e-6]], dtype=torch.bfloat16)
    scale = get_scale(w, axis=0)
    assert scale.dtype == torch.float32
    assert torch.isfinite(scale).all()
    assert (scale > 0).all()
    w_q, s, _ = linear_quantize(w, 8, axis=0)
    assert w_q[1].tolist() == [64, -127]  # the 1e-6 row keeps its codes instead of flushing to zero


def test_error_measures():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w_dq = torch.tensor([1.0, 2.0, 3.0, 5.0])
    assert mean_squared_error(w, w_dq) == 0.25
    assert max_abs_error(w, w_dq) == 1.0
    assert sqnr_db(w, w_dq) == pytest.approx(10 * math.log10(30 / 1))
    assert sqnr_db(w, w) == float("inf")


@pytest.mark.parametrize("bits", [0, 3, 16, "8", 8.0, True])
def test_unsupported_bits_rejected(bits):
    with pytest.raises(ValueError, match=r"bits=.* is not supported; use one of 2, 4, 8"):
        check_bits(bits)


def test_group_size_must_divide_k():
    with pytest.raises(ValueError, match=r"group_size=48 does not divide K=64.*\[64, 32, 16, 8, 4, 2\]"):
        linear_quantize(torch.randn(2, 64), 4, group_size=48)
