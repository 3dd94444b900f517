"""Bad input and edge values: clear errors, exact results, nothing silently changed.

Each section pins one kind of input that weight quantizers commonly get wrong: all-zero rows, NaN, odd K,
extreme bf16/fp16 magnitudes, tied embeddings, meta tensors, dtype moves, bad activations, broken
folders and unstable notebook output. Where it applies, every bit width and granularity is tested.
Checks that other test files already make are not repeated here.
Shapes: N = out_features, K = in_features, G = K / S groups of S = group_size.
"""

import re
import warnings
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import OPTForCausalLM

import myq
from myq import cli
from myq.layers import QuantizedLinear, QuantizedLinearLayer, plain_path
from myq.serialization import INDEX_FILE, QUANTIZATION_FILE

from conftest import tiny_opt_config

# (bits, group_size, symmetric): every bit width, per-channel and group-wise, symmetric and asymmetric.
SETTINGS = [(bits, group_size, symmetric) for bits in (8, 4, 2) for group_size in (None, 32)
            for symmetric in (True, False)]
SETTING_IDS = [f"w{b}-{'g' + str(g) if g else 'channel'}-{'sym' if s else 'asym'}" for b, g, s in SETTINGS]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def make_layer(k, n, bits, group_size, symmetric, dtype=torch.float32, bias=False):
    """Return the empty layer quantize_model would build: the W8A16 class for 8-bit symmetric per-channel."""
    if bits == 8 and group_size is None and symmetric:
        return QuantizedLinearLayer(k, n, bias=bias, dtype=dtype)
    return QuantizedLinear(k, n, bias=bias, dtype=dtype, bits=bits, group_size=group_size, symmetric=symmetric)


def plain_output(layer, x):
    with plain_path():
        return layer(x)


def assert_matches_dequantized(y, x, w_dq, bias=None):
    """Assert `y` equals x @ w_dq^T + bias up to rounding in y's dtype (2% of sum |x w|, per output)."""
    reference = F.linear(x.float(), w_dq.float(), None if bias is None else bias.float())
    bound = F.linear(x.float().abs(), w_dq.float().abs())  # what the rounding of a dot product scales with
    assert torch.isfinite(y).all()
    assert ((y.float() - reference).abs() <= 0.02 * bound + 1e-2 * (bias is not None)).all()


def quantized_state(model):
    return {name: t.clone() for name, t in model.state_dict().items()}


def same_state(model, state):
    current = model.state_dict()
    return current.keys() == state.keys() and all(torch.equal(current[k], state[k]) for k in state)


# ------------------------------------------------------------------------ 1. all-zero rows and groups

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bits,group_size,symmetric", SETTINGS, ids=SETTING_IDS)
def test_zero_row_dequantizes_to_zero(bits, group_size, symmetric, dtype):
    torch.manual_seed(0)
    w = torch.randn(64, 128).to(dtype)
    w[3] = 0
    w[5, 32:64] = 0  # one all-zero group inside a non-zero row
    x = torch.randn(2, 128, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = make_layer(128, 64, bits, group_size, symmetric, dtype).quantize(w)
        w_dq = layer.dequantized_weight(torch.float32)
        fast, plain = layer(x), plain_output(layer, x)
    assert torch.isfinite(layer.scale.float()).all()
    assert (layer.scale.float() > 0).all()
    assert torch.equal(w_dq[3], torch.zeros(128))
    assert torch.equal(w_dq[5, 32:64], torch.zeros(32))
    assert torch.equal(fast[:, 3], torch.zeros(2, dtype=dtype))
    assert torch.equal(plain[:, 3], torch.zeros(2, dtype=dtype))


@pytest.mark.parametrize("bits,group_size,symmetric", SETTINGS, ids=SETTING_IDS)
def test_zero_row_leaves_neighbours_alone(bits, group_size, symmetric):
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    with_zero_row = torch.cat([w[:3], torch.zeros(1, 64), w[3:]])  # a zero row inserted at index 3
    alone = make_layer(64, 8, bits, group_size, symmetric).quantize(w)
    beside = make_layer(64, 9, bits, group_size, symmetric).quantize(with_zero_row)
    neighbours = torch.cat([beside.int_weight()[:3], beside.int_weight()[4:]])
    assert torch.equal(neighbours, alone.int_weight())


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True), (4, False), (2, True), (2, False)])
def test_zero_group_leaves_other_groups_alone(bits, symmetric):
    torch.manual_seed(0)
    w = torch.randn(4, 128)
    zeroed = w.clone()
    zeroed[:, 64:96] = 0
    codes = make_layer(128, 4, bits, 32, symmetric).quantize(w).int_weight()
    codes_zeroed = make_layer(128, 4, bits, 32, symmetric).quantize(zeroed).int_weight()
    keep = torch.ones(128, dtype=torch.bool)
    keep[64:96] = False
    assert torch.equal(codes_zeroed[:, keep], codes[:, keep])


# ------------------------------------------------------------------------------------ 2. NaN and Inf

@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 32), (4, 32), (2, None)])
def test_nan_error_names_module_and_count(tiny_opt, bits, group_size):
    with torch.no_grad():
        fc1 = tiny_opt.model.decoder.layers[0].fc1.weight
        fc1[1, 2] = float("nan")
        fc1[3, 4] = float("nan")
        fc1[5, 6] = float("-inf")
    with pytest.raises(ValueError, match=r"^model\.decoder\.layers\.0\.fc1: weight contains 2 NaN and 1 Inf"):
        myq.quantize_model(tiny_opt, bits=bits, group_size=group_size)
    assert not myq.quantized_layers(tiny_opt)  # nothing replaced before the error


@pytest.mark.parametrize("bits,group_size,symmetric", SETTINGS, ids=SETTING_IDS)
def test_layer_rejects_inf_weight(bits, group_size, symmetric):
    w = torch.randn(4, 64)
    w[0, 0] = float("inf")
    layer = make_layer(64, 4, bits, group_size, symmetric)
    with pytest.raises(ValueError, match="weight contains 0 NaN and 1 Inf values"):
        layer.quantize(w)
    assert torch.equal(layer.scale, torch.zeros_like(layer.scale))  # buffers untouched


# --------------------------------------------------------------------- 3. group size that does not divide K

@pytest.mark.parametrize("bits", [8, 4, 2])
def test_group_error_names_module_k_sizes(tiny_opt, bits):
    with pytest.raises(ValueError, match=r"model\.decoder\.project_out: group_size=96 does not divide its "
                                         r"K=in_features=128; group sizes that divide 128: \[128, 64, 32"):
        myq.quantize_model(tiny_opt, bits=bits, group_size=96)
    assert not myq.quantized_layers(tiny_opt)


# -------------------------------------------------------------------- 4. K not a multiple of codes per byte

@pytest.mark.parametrize("k,group_size", [(33, None), (33, 11), (35, 7), (37, None), (30, 10)])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (2, True), (2, False)])
def test_odd_k_round_trips_and_runs(bits, symmetric, k, group_size):
    torch.manual_seed(0)
    w = torch.randn(6, k)
    layer = QuantizedLinear(k, 6, bias=True, bits=bits, group_size=group_size, symmetric=symmetric)
    layer.quantize(w, torch.randn(6))
    granularity = dict(axis=0) if group_size is None else dict(group_size=group_size)
    w_q, _, _ = myq.linear_quantize(w, bits, symmetric, **granularity)
    assert layer.weight.shape == (6, -(-k * bits // 8))
    assert torch.equal(myq.unpack(layer.weight, bits, k), w_q)
    assert torch.equal(myq.unpack(myq.pack(w_q, bits), bits, k), w_q)
    x = torch.randn(3, 2, k)
    expected = F.linear(x, layer.dequantized_weight(torch.float32), layer.bias)
    assert torch.equal(plain_output(layer, x), expected)
    torch.testing.assert_close(layer(x), expected)


# ------------------------------------------------------------------------------ 5. unsupported bit widths

BAD_BITS = [0, 3, 16, "4", 4.0, True, None]


@pytest.mark.parametrize("bits", BAD_BITS, ids=repr)
def test_layer_rejects_bits(bits):
    with pytest.raises(ValueError, match=rf"^bits={re.escape(repr(bits))} is not supported; use one of 2, 4, 8$"):
        QuantizedLinear(64, 4, bits=bits)


@pytest.mark.parametrize("bits", [4.0, True, None], ids=repr)
def test_quantize_model_rejects_odd_bits(tiny_opt, bits):
    with pytest.raises(ValueError, match=rf"^bits={re.escape(repr(bits))} is not supported; use one of 2, 4, 8$"):
        myq.quantize_model(tiny_opt, bits=bits)
    assert not myq.quantized_layers(tiny_opt)


@pytest.mark.parametrize("value", ["3", "16", "0"])
def test_cli_bits_error_is_one_line(value, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["quantize", "--offline", "--bits", value])
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [f"python -m myq quantize: error: argument --bits: invalid choice: {value} "
                      f"(choose from 2, 4, 8)"]


# ------------------------------------------------------------------------------ 6. already quantized model

@pytest.mark.parametrize("first,second", [(8, 4), (4, 4), (2, 8), (4, 2)])
def test_requantize_rejected_model_unchanged(tiny_opt, first, second):
    myq.quantize_model(tiny_opt, bits=first, group_size=32)
    state, config = quantized_state(tiny_opt), tiny_opt.myq_config
    with pytest.raises(ValueError, match=r"^the model is already quantized \(14 quantized layers.*"
                                         r"quantizing integer codes again"):
        myq.quantize_model(tiny_opt, bits=second, exclude=())
    assert same_state(tiny_opt, state)
    assert tiny_opt.myq_config is config
    assert isinstance(tiny_opt.lm_head, nn.Linear)


# --------------------------------------------------------------------------- 7. extreme bf16/fp16 magnitudes

def extreme_weight(dtype):
    """Rows: 1e5-scale (bfloat16 only, past float16's 65504), 1e-6-scale, then ordinary weights."""
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    w[1] *= 1e-6
    if dtype == torch.bfloat16:
        w[0] = w[0] / w[0].abs().max() * 1e5
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group_size,symmetric", SETTINGS, ids=SETTING_IDS)
def test_extreme_rows_keep_their_values(bits, group_size, symmetric, dtype):
    w = extreme_weight(dtype)
    layer = make_layer(64, 4, bits, group_size, symmetric, dtype).quantize(w)
    scale = layer.scale.float()
    assert torch.isfinite(scale).all()
    assert (scale > 0).all()
    step = scale.reshape(4, -1).repeat_interleave(64 // scale.reshape(4, -1).shape[1], dim=1)  # (N, G) -> (N, K)
    w_dq = layer.dequantized_weight(torch.float32)
    assert ((w_dq - w.float()).abs() <= (0.5 + 1e-3) * step).all()
    largest = w[1].float().abs().argmax()
    assert w_dq[1, largest] != 0
    assert w_dq[1, largest].sign() == w[1, largest].float().sign()
    x = torch.randn(2, 64, dtype=dtype)
    for y in (plain_output(layer, x), layer(x)):
        assert_matches_dequantized(y, x, w_dq)
        assert (y[:, 1] != 0).all()  # the 1e-6 row still contributes


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_float16_sums_do_not_overflow(bits):
    """Codes summed before scaling reach 127 * K; in float16 that passes 65504 while the output is 10."""
    w = torch.full((2, 1024), 0.01, dtype=torch.float16)
    model = nn.Sequential(nn.Linear(1024, 2, bias=False, dtype=torch.float16))
    with torch.no_grad():
        model[0].weight.copy_(w)
    myq.quantize_model(model, bits=bits)
    x = torch.ones(1, 1024, dtype=torch.float16)
    assert_matches_dequantized(model(x), x, model[0].dequantized_weight(torch.float32))
    assert_matches_dequantized(plain_output(model, x), x, model[0].dequantized_weight(torch.float32))



# ------------------------------------------------------------------------------------- 8. tied lm_head

def test_tied_embedding_kept_and_counted_once(tiny_opt):
    embedding = tiny_opt.model.decoder.embed_tokens.weight.detach().clone()
    myq.quantize_model(tiny_opt, bits=4, group_size=32)
    state = tiny_opt.state_dict()  # lists the tied tensor under both names
    expected = sum(t.numel() * t.element_size() for name, t in state.items() if name != "lm_head.weight")
    assert myq.footprint_bytes(tiny_opt) == expected
    assert tiny_opt.lm_head.weight is tiny_opt.model.decoder.embed_tokens.weight
    assert torch.equal(tiny_opt.model.decoder.embed_tokens.weight, embedding)


def test_untied_head_leaves_embedding_float(tiny_opt):
    embedding = tiny_opt.model.decoder.embed_tokens.weight.detach().clone()
    myq.untie_weights(tiny_opt, "lm_head")
    myq.quantize_model(tiny_opt, bits=8, exclude=())
    assert tiny_opt.config.tie_word_embeddings is False
    assert isinstance(tiny_opt.lm_head, QuantizedLinearLayer)
    assert torch.equal(tiny_opt.model.decoder.embed_tokens.weight, embedding)
    expected = sum(t.numel() * t.element_size() for t in tiny_opt.state_dict().values())
    assert myq.footprint_bytes(tiny_opt) == expected


# --------------------------------------------------------------------------------------- 9. meta device

@pytest.mark.parametrize("bits", [8, 4, 2])
def test_meta_model_error_names_module(bits):
    with torch.device("meta"):
        model = OPTForCausalLM(tiny_opt_config())
    with pytest.raises(ValueError, match=r"^model\.decoder\.project_out: weight is on the meta device and has "
                                         r"no values; load the real weights first"):
        myq.quantize_model(model, bits=bits, group_size=32)
    assert not myq.quantized_layers(model)


# ----------------------------------------------------------------------------------- 10. .to(device/dtype)

@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "prepared"])
@pytest.mark.parametrize("target", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("bits,group_size,symmetric", SETTINGS, ids=SETTING_IDS)
def test_to_dtype_keeps_codes_exact(bits, group_size, symmetric, target, prepared):
    torch.manual_seed(0)
    layer = make_layer(256, 64, bits, group_size, symmetric, torch.bfloat16, bias=True)
    layer.quantize(torch.randn(64, 256), torch.randn(64))
    if prepared:
        layer.prepare_fast()  # 4-bit layers move to the CPU kernel's own layout
    weight, codes, scale = layer.weight.clone(), layer.int_weight().clone(), layer.scale.clone()
    layer.to(target)
    assert layer.weight.dtype == weight.dtype
    assert torch.equal(layer.weight, weight)
    assert torch.equal(layer.int_weight(), codes)
    assert layer.scale.dtype == (torch.bfloat16 if target == torch.bfloat16 else torch.float32)
    assert torch.equal(layer.scale.float(), scale.float())
    assert layer.bias.dtype == target
    x = torch.randn(3, 256, dtype=target)
    w_dq = layer.dequantized_weight(torch.float32)
    assert_matches_dequantized(plain_output(layer, x), x, w_dq, layer.bias)
    assert_matches_dequantized(layer(x), x, w_dq, layer.bias)


@pytest.mark.parametrize("bits,group_size,symmetric", SETTINGS, ids=SETTING_IDS)
def test_to_cpu_moves_nothing(bits, group_size, symmetric):
    layer = make_layer(256, 64, bits, group_size, symmetric, torch.bfloat16).quantize(torch.randn(64, 256))
    layer.prepare_fast()
    before = {name: t.data_ptr() for name, t in layer.named_buffers()}
    layer.to("cpu")
    assert {name: t.data_ptr() for name, t in layer.named_buffers()} == before


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_float16_move_keeps_tiny_scales(bits):
    """A float16 layer keeps float32 scales (1e-6 weights need scales below float16's 6e-8); .to() too."""
    w = torch.full((4, 64), 1e-6, dtype=torch.float16)
    model = nn.Sequential(make_layer(64, 4, bits, None, bits != 2, torch.float16).quantize(w))
    model.to(torch.float16)
    assert model[0].scale.dtype == torch.float32
    assert (model[0].dequantized_weight(torch.float32) > 0).all()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_model_to_bfloat16_keeps_codes(tiny_opt, bits):
    myq.quantize_model(tiny_opt, bits=bits, group_size=32)
    codes = {name: layer.int_weight().clone() for name, layer in myq.quantized_layers(tiny_opt).items()}
    tiny_opt.to(torch.bfloat16)
    for name, layer in myq.quantized_layers(tiny_opt).items():
        assert layer.weight.dtype == (torch.int8 if bits == 8 else torch.uint8), name
        assert torch.equal(layer.int_weight(), codes[name]), name
        assert layer.scale.dtype == torch.bfloat16, name
    with torch.no_grad():
        logits = tiny_opt(torch.tensor([[2, 5, 7, 11]])).logits
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "prepared"])
@pytest.mark.parametrize("bits,group_size,symmetric", SETTINGS, ids=SETTING_IDS)
def test_to_cuda_keeps_codes_and_output(bits, group_size, symmetric, prepared):
    torch.manual_seed(0)
    layer = make_layer(256, 64, bits, group_size, symmetric, torch.bfloat16, bias=True)
    layer.quantize(torch.randn(64, 256), torch.randn(64))
    if prepared:
        layer.prepare_fast()
    codes, scale = layer.int_weight().clone(), layer.scale.clone()
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    expected = plain_output(layer, x)
    layer.to("cuda")
    assert layer.weight.is_cuda and layer.scale.is_cuda
    assert torch.equal(layer.int_weight().cpu(), codes)
    assert torch.equal(layer.scale.cpu(), scale)
    torch.testing.assert_close(layer(x.cuda()).cpu(), expected, rtol=0.02, atol=0.02)
    layer.to("cpu")
    assert torch.equal(layer.int_weight(), codes)


# -------------------------------------------------------------------------------- 11. bad input activations

@pytest.mark.parametrize("bits,group_size,symmetric", SETTINGS, ids=SETTING_IDS)
def test_token_ids_rejected_naming_dtype(bits, group_size, symmetric):
    layer = make_layer(64, 4, bits, group_size, symmetric)
    with pytest.raises(TypeError, match=r"input must be a floating-point tensor \(float32, bfloat16 or "
                                        r"float16\), got torch\.int64"):
        layer(torch.randint(0, 100, (1, 5, 64)))


@pytest.mark.parametrize("x", [torch.tensor(1.0), torch.ones(2, 63), torch.ones(64, 2)], ids=["0-d", "K-1", "KxB"])
@pytest.mark.parametrize("bits,group_size,symmetric", SETTINGS, ids=SETTING_IDS)
def test_wrong_shape_names_both(bits, group_size, symmetric, x):
    layer = make_layer(64, 4, bits, group_size, symmetric)
    expected = re.escape(f"input has shape {tuple(x.shape)}; expected the last dimension to be in_features=64")
    with pytest.raises(ValueError, match=expected):
        layer(x)


# ------------------------------------------------------------------------------------ 12. broken folders

@pytest.fixture
def sharded(tiny_opt, tmp_path):
    myq.quantize_model(tiny_opt, bits=4, group_size=32)
    return myq.save_quantized(tiny_opt, tmp_path / "w4", max_shard_size=100_000)


def test_missing_shard_named(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"weight file {shard.name} is missing"):
        myq.load_quantized(sharded)


def test_truncated_description_named(sharded):
    path = sharded / QUANTIZATION_FILE
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match=rf"{QUANTIZATION_FILE} is not valid JSON"):
        myq.load_quantized(sharded)


def test_truncated_index_named(sharded):
    path = sharded / INDEX_FILE
    path.write_text(path.read_text()[:30])
    with pytest.raises(ValueError, match=rf"{re.escape(INDEX_FILE)} is not a safetensors index"):
        myq.load_quantized(sharded)


@pytest.mark.parametrize("field,value", [("bits", 3), ("bits", "4"), ("symmetric", "yes"), ("layer_class", "Linear4bit")])
def test_bad_description_field_named(sharded, field, value):
    path = sharded / QUANTIZATION_FILE
    text = re.sub(rf'"{field}": [^,\n]+', f'"{field}": {value!r}'.replace("'", '"'), path.read_text(), count=1)
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{QUANTIZATION_FILE}: '?{field}'?"):
        myq.load_quantized(sharded)


# ---------------------------------------------------------------------------------- 13. notebook outputs

TIMING = re.compile(r"\d\s*(ms|µs|us|ns|s|sec|seconds|s/it|it/s|tokens/s|tok/s)\b")
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def text_outputs(cell):
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            yield output.text
        elif output.output_type in ("execute_result", "display_data"):
            yield from (value for mime, value in output.data.items() if mime.startswith("text/"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_timings_only_in_ignored_cells(path):
    notebook = nbformat.read(path, as_version=4)
    checked = [cell for cell in notebook.cells
               if cell.cell_type == "code" and "# NBVAL_IGNORE_OUTPUT" not in cell.source]
    found = [(cell.source.splitlines()[0][:50], match.group()) for cell in checked
             for text in text_outputs(cell) for match in [TIMING.search(text)] if match]
    assert found == [], "cells printing timings must start with # NBVAL_IGNORE_OUTPUT"
