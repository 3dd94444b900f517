import pytest
import torch

import myq
from myq import bench, kernels, layers
from myq.layers import QuantizedLinear, QuantizedLinearLayer, plain_path, prepare_fast

GROUP_SIZES = {8: (None, 32), 4: (None, 32, 64, 128), 2: (None, 32)}
CONFIGS = [(bits, group_size, symmetric)  # every bit width and group size, symmetric and asymmetric
           for bits, sizes in GROUP_SIZES.items() for group_size in sizes for symmetric in (True, False)]
NEEDS_INT4 = pytest.mark.skipif(not kernels.HAS_INT4_KERNEL or kernels.int4_layout_block() is None,
                                reason="this torch build has no CPU int4 kernel")
NEEDS_INT8 = pytest.mark.skipif(not kernels.HAS_INT8_KERNEL, reason="this torch build has no CPU int8 kernel")


def make_layer(bits, group_size, symmetric, n=128, k=256, bias=True, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias, dtype=dtype)
    if bits == 8 and group_size is None and symmetric:
        layer = QuantizedLinearLayer(k, n, bias=bias, dtype=dtype)
    else:
        layer = QuantizedLinear(k, n, bias=bias, dtype=dtype, bits=bits, group_size=group_size, symmetric=symmetric)
    return layer.quantize(linear.weight, linear.bias)


def expected_kernel(bits, group_size, symmetric, n, k, rows, dtype=torch.bfloat16):
    """Return the kernel the fast path should take, from the rules documented in myq.kernels."""
    if dtype not in kernels.KERNEL_DTYPES:
        return None
    if bits == 8 and group_size is None and symmetric and kernels.HAS_INT8_KERNEL and k % 16 == 0:
        return "int8" if rows <= kernels.MAX_KERNEL_ROWS["int8"] else None
    if bits == 4 and kernels.int4_kernel_fits(n, k, group_size, "cpu"):
        return "int4" if rows <= kernels.MAX_KERNEL_ROWS["int4"] else None
    return None


def assert_agree(fast, plain):
    """Fast and plain outputs differ only by rounding: within 1% of the largest output."""
    assert fast.shape == plain.shape
    assert fast.dtype == plain.dtype
    scale = plain.float().abs().max().item()
    torch.testing.assert_close(fast.float(), plain.float(), rtol=0.02, atol=0.01 * scale)


def plain_output(layer, x):
    with plain_path():
        return layer(x)


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS)
@pytest.mark.parametrize("shape", [(1, 256), (3, 256), (40, 256), (2, 37, 256)])
def test_fast_matches_plain(bits, group_size, symmetric, shape):
    layer = make_layer(bits, group_size, symmetric)
    x = torch.randn(shape, dtype=torch.bfloat16)
    plain = plain_output(layer, x)
    rows = x.numel() // 256
    assert layer.kernel_for(x) == expected_kernel(bits, group_size, symmetric, 128, 256, rows)
    assert_agree(layer(x), plain)
    layer.prepare_fast()
    assert_agree(layer(x), plain)  # again, from the prepared layout
    assert_agree(plain_output(layer, x), plain)


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS)
@pytest.mark.parametrize("n,k", [(40, 96), (96, 128), (64, 100)])
def test_odd_shapes_agree(bits, group_size, symmetric, n, k):
    if group_size is not None and k % group_size:
        group_size = 16 if k % 16 == 0 else 4
    layer = make_layer(bits, group_size, symmetric, n=n, k=k, bias=False)
    x = torch.randn(2, 1, k, dtype=torch.bfloat16)
    assert layer.kernel_for(x) == expected_kernel(bits, group_size, symmetric, n, k, 1)
    assert_agree(layer(x), plain_output(layer, x))


@pytest.mark.parametrize("symmetric", [True, False])
def test_large_groups_split_for_kernel(symmetric):
    layer = make_layer(4, 512, symmetric, n=64, k=1024)  # the kernel's largest group is 256
    x = torch.randn(1, 1024, dtype=torch.bfloat16)
    assert layer.kernel_for(x) == expected_kernel(4, 512, symmetric, 64, 1024, 1)
    assert_agree(layer(x), plain_output(layer, x))


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes_agree(bits, group_size, symmetric, dtype):
    layer = make_layer(bits, group_size, symmetric, dtype=dtype)
    for rows in (1, 20):
        x = torch.randn(2, rows, 256, dtype=dtype)
        assert_agree(layer(x), plain_output(layer, x))


def test_float16_w8_sums_stay_finite():
    layer = QuantizedLinearLayer(1024, 4, bias=False, dtype=torch.float16)
    layer.quantize(torch.full((4, 1024), 0.01))
    x = torch.ones(3, 1024, dtype=torch.float16)  # unscaled, each sum would be 127 * 1024 > 65504
    y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), torch.full((3, 4), 10.24), rtol=0.01, atol=0.0)
    assert torch.equal(y, plain_output(layer, x))


@pytest.mark.parametrize("bits,group_size,symmetric", CONFIGS)
def test_fast_dequantize_is_exact(bits, group_size, symmetric):
    layer = make_layer(bits, group_size, symmetric)
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(layer.fast_dequantized_weight(dtype), layer.dequantized_weight(dtype))
    layer.prepare_fast()
    assert torch.equal(layer.fast_dequantized_weight(torch.bfloat16), layer.dequantized_weight(torch.bfloat16))


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 32, False), (4, None, True)])
def test_missing_kernel_falls_back(monkeypatch, bits, group_size, symmetric):
    monkeypatch.setattr(kernels, "HAS_INT8_KERNEL", False)
    monkeypatch.setattr(kernels, "HAS_INT4_KERNEL", False)
    layer = make_layer(bits, group_size, symmetric)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    assert layer.kernel_for(x) is None
    assert torch.equal(layer(x), plain_output(layer, x))
    assert layer.layout == "plain"


def test_plain_path_restores_switch():
    assert layers.FAST_PATH is True
    with pytest.raises(RuntimeError):
        with plain_path():
            assert layers.FAST_PATH is False
            raise RuntimeError("leave the block early")
    assert layers.FAST_PATH is True


@NEEDS_INT4
@pytest.mark.parametrize("group_size,symmetric", [(32, True), (128, False), (None, True)])
def test_prepared_layout_round_trips(group_size, symmetric):
    layer = make_layer(4, group_size, symmetric)
    codes = layer.int_weight().clone()
    state = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    footprint = myq.footprint_bytes(layer)

    assert layer.prepare_fast() is True
    assert layer.layout == "int4pack_cpu"
    assert not torch.equal(layer.weight, state["weight"])  # the buffer now contains the kernel layout
    assert torch.equal(layer.int_weight(), codes)
    prepared_state = layer.state_dict()
    assert list(prepared_state) == list(state)
    for name, tensor in state.items():
        assert torch.equal(prepared_state[name], tensor), name
        assert prepared_state[name].is_contiguous(), name  # safetensors saves contiguous tensors only
    assert myq.footprint_bytes(layer) == footprint


@NEEDS_INT4
def test_plain_state_loads_into_prepared_layer():
    source = make_layer(4, 32, False, seed=1)
    layer = make_layer(4, 32, False, seed=2)
    layer.prepare_fast()
    layer.load_state_dict(source.state_dict())
    assert layer.layout == "plain"
    assert torch.equal(layer.weight, source.weight)
    assert torch.equal(layer.int_weight(), source.int_weight())


@NEEDS_INT4
def test_plain_layout_restores_bytes():
    layer = make_layer(4, 64, True)
    plain_bytes = layer.weight.clone()
    layer.prepare_fast()
    layer.use_plain_layout()
    assert layer.layout == "plain"
    assert torch.equal(layer.weight, plain_bytes)


@NEEDS_INT4
def test_requantize_resets_layout():
    layer = make_layer(4, 32, True)
    layer.prepare_fast()
    w = torch.randn(128, 256)
    layer.quantize(w)
    assert layer.layout == "plain"
    assert torch.equal(layer.int_weight(), make_layer(4, 32, True).quantize(w).int_weight())


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (2, 32)])
def test_float32_keeps_codes_integer(bits, group_size):
    layer = make_layer(bits, group_size, bits != 2)
    layer.prepare_fast()
    codes, layout = layer.int_weight().clone(), layer.layout
    layer.to(torch.float32)
    assert layer.weight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert layer.layout == layout
    assert torch.equal(layer.int_weight(), codes)
    x = torch.randn(1, 256)
    assert_agree(layer(x), plain_output(layer, x))


@NEEDS_INT8
def test_misaligned_input_is_safe():
    layer = make_layer(8, None, True)
    storage = torch.randn(3 * 256, dtype=torch.bfloat16)
    x = storage[1:257].view(1, 256)  # starts 2 bytes into an allocation: not 32-byte aligned
    assert x.data_ptr() % 32 != 0
    assert layer.kernel_for(x) == "int8"
    assert_agree(layer(x), plain_output(layer, x))


@NEEDS_INT8
def test_misaligned_weight_is_realigned():
    layer = make_layer(8, None, True)
    state = layer.state_dict()
    storage = torch.empty(state["weight"].numel() + 1, dtype=torch.int8)
    misaligned = storage[1:].view(state["weight"].shape)
    misaligned.copy_(state["weight"])
    layer.load_state_dict({**state, "weight": misaligned}, assign=True)
    assert not kernels.is_aligned(layer.weight)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    assert layer.kernel_for(x) == "int8"
    assert kernels.is_aligned(layer.weight)
    assert_agree(layer(x), plain_output(layer, x))


def test_input_needing_grad_skips_kernel():
    layer = make_layer(4, 32, True)
    x = torch.randn(1, 256, dtype=torch.bfloat16, requires_grad=True)
    assert layer.kernel_for(x) is None
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_interleave_pairs_matches_stack(dtype):
    torch.manual_seed(0)
    first, second = torch.randn(2, 3, 5, dtype=dtype)  # negative values too: their top bit is set
    assert torch.equal(kernels.interleave_pairs(first, second), torch.stack((first, second), dim=-1))
    zeros = torch.zeros_like(first)
    assert torch.equal(kernels.interleave_pairs(first), torch.stack((first, zeros), dim=-1))


@NEEDS_INT4
def test_int4_layout_probe_matches():
    block = kernels.int4_layout_block()
    assert block in (32, 64)
    torch.manual_seed(0)
    w_q = torch.randint(-8, 8, (2 * block, 64), dtype=torch.int8)
    assert torch.equal(kernels.from_int4pack(kernels.to_int4pack(w_q), 2 * block, 64), w_q)


def test_prepare_fast_model_keeps_outputs(tiny_opt):
    myq.quantize_model(tiny_opt.to(torch.bfloat16), bits=4, group_size=32)
    footprint = myq.footprint_bytes(tiny_opt)
    ids = torch.randint(3, 512, (1, 6))
    with torch.no_grad(), plain_path():
        plain_logits = tiny_opt(ids[:, -1:]).logits
    prepared = prepare_fast(tiny_opt)
    with torch.no_grad():
        fast_logits = tiny_opt(ids[:, -1:]).logits
    expected = len(myq.quantized_layers(tiny_opt)) if expected_kernel(4, 32, True, 64, 64, 1) else 0
    assert prepared == expected
    assert myq.footprint_bytes(tiny_opt) == footprint
    assert_agree(fast_logits, plain_logits)


def test_prepare_fast_rejects_non_module():
    with pytest.raises(TypeError, match="model"):
        prepare_fast("opt-350m")


def test_cached_decode_matches_recompute(tiny_opt):
    torch.manual_seed(0)
    prompt = torch.randint(3, 512, (1, 5))
    tokens, seconds = bench.greedy_decode(tiny_opt, prompt, 6)
    assert tokens.shape == (1, 6)
    assert seconds > 0
    sequence = prompt
    with torch.no_grad():
        for _ in range(6):  # no KV cache: the whole sequence every step
            next_token = tiny_opt(input_ids=sequence, use_cache=False).logits[:, -1:].argmax(-1)
            sequence = torch.cat((sequence, next_token), dim=1)
    assert torch.equal(tokens, sequence[:, 5:])


def test_stored_bytes_matches_footprint(tiny_opt):
    assert bench.stored_bytes(tiny_opt) == myq.footprint_bytes(tiny_opt)
    myq.quantize_model(tiny_opt, bits=4, group_size=32)
    assert bench.stored_bytes(tiny_opt) == myq.footprint_bytes(tiny_opt)


def test_table_ratios_use_first_row():
    rows = [bench.Variant("bf16", None, footprint_bytes=4_000_000, decode_seconds=[2.0, 1.0],
                          prefill_seconds=[0.5, 0.4]),
            bench.Variant("W4", None, quantize_seconds=1.5, footprint_bytes=1_000_000, decode_seconds=[0.5],
                          prefill_seconds=[0.8])]
    bf16, w4 = bench.table_rows(rows, new_tokens=8)
    assert bf16["decode_tokens_per_s"] == 8.0
    assert bf16["decode_ratio"] == 1.0
    assert w4["decode_tokens_per_s"] == 16.0
    assert w4["decode_ratio"] == 2.0
    assert w4["prefill_ratio"] == 0.5
    assert w4["footprint_mb"] == 1.0
    text = bench.format_table([bf16, w4], new_tokens=8, prefill_tokens=16)
    assert "2.00x" in text
    assert "0.50x" in text


def test_bench_arguments_checked():
    args = bench.parse_args(["--quick", "--threads", "1"])
    assert (args.new_tokens, args.prefill_tokens, args.repeats, args.threads) == (8, 64, 1, 1)
    for bad in (["--repeats", "0"], ["--prefill-tokens", "4096"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
