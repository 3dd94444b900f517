import pytest
import torch
from torch import nn

import myq
from myq.layers import QuantizedLinear, QuantizedLinearLayer
from myq.swap import replace_linear_with_target


def linear_names(model):
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_swap_replaces_every_linear_but_lm_head(tiny_opt):
    before = linear_names(tiny_opt)
    report = replace_linear_with_target(tiny_opt, QuantizedLinearLayer, exclude=("lm_head",))
    assert set(report.replaced) == before - {"lm_head"}
    assert report.skipped == ["lm_head"]
    assert linear_names(tiny_opt) == {"lm_head"}
    assert len(report.replaced) == 2 * 6 + 2  # q, k, v, out_proj, fc1, fc2 per layer; project_in/out


def test_lm_head_stays_tied(tiny_opt):
    myq.quantize_model(tiny_opt)
    assert tiny_opt.lm_head.weight is tiny_opt.model.decoder.embed_tokens.weight


def test_exclude_matches_dotted_name(tiny_opt):
    report = replace_linear_with_target(tiny_opt, QuantizedLinearLayer,
                                        exclude=("lm_head", "model.decoder.layers.0.fc1"))
    assert "model.decoder.layers.0.fc1" in report.skipped
    assert isinstance(tiny_opt.model.decoder.layers[1].fc1,
                      QuantizedLinearLayer)
    assert isinstance(tiny_opt.model.decoder.layers[0].fc1, nn.Linear)


def test_skeleton_mode_leaves_buffers_zero(tiny_opt):
    replace_linear_with_target(tiny_opt, QuantizedLinearLayer, quantized=False)
    fc1 = tiny_opt.model.decoder.layers[0].fc1
    assert torch.count_nonzero(fc1.weight) == 0
    assert torch.count_nonzero(fc1.scale) == 0


def test_swap_raises_when_nothing_to_replace():
    with pytest.raises(ValueError, match="found no nn.Linear to replace"):
        replace_linear_with_target(nn.Sequential(nn.ReLU()), QuantizedLinearLayer)


def test_quantize_model_returns_same_object_and_config(tiny_opt):
    model = myq.quantize_model(tiny_opt, bits=8)
    assert model is tiny_opt
    assert model.myq_config.bits == 8
    assert model.myq_config.skipped == ["lm_head"]
    assert len(model.myq_config.replaced) == 14


def test_quantized_model_logits_close_to_float(tiny_opt):
    ids = torch.randint(3, 512, (1, 16))
    with torch.no_grad():
        expected = tiny_opt(ids).logits
        myq.quantize_model(tiny_opt, bits=8)
        got = tiny_opt(ids).logits
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize("bits", [0, 3, 16, "8"])
def test_quantize_model_rejects_bits(tiny_opt, bits):
    with pytest.raises(ValueError, match=r"bits=.* is not supported; use one of 2, 4, 8"):
        myq.quantize_model(tiny_opt, bits=bits)


def test_group_size_error_names_layer_k_and_sizes(tiny_opt):
    with pytest.raises(ValueError, match=r"model.decoder.project_out: group_size=48 does not divide its "
                                          r"K=in_features=128; group sizes that divide 128: \[128, 64, 32"):
        myq.quantize_model(tiny_opt, bits=4, group_size=48)
    assert linear_names(tiny_opt) > {"lm_head"}  # nothing was replaced


def test_already_quantized_model_rejected(tiny_opt):
    myq.quantize_model(tiny_opt, bits=8)
    with pytest.raises(ValueError, match="already quantized"):
        myq.quantize_model(tiny_opt, bits=4)


def test_tied_lm_head_rejected_unless_untied(tiny_opt):
    with pytest.raises(ValueError, match="lm_head shares its weight with model.decoder.embed_tokens.weight"):
        myq.quantize_model(tiny_opt, exclude=())
    assert isinstance(tiny_opt.model.decoder.layers[0].fc1, nn.Linear)  # nothing half-done
    myq.untie_weights(tiny_opt, "lm_head")
    myq.quantize_model(tiny_opt, exclude=())
    assert isinstance(tiny_opt.lm_head, QuantizedLinear)
    assert tiny_opt.model.decoder.embed_tokens.weight.dtype == torch.float32


def test_nan_weight_error_names_module(tiny_opt):
    with torch.no_grad():
        tiny_opt.model.decoder.layers[1].fc2.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"model.decoder.layers.1.fc2: weight contains 0 NaN and 1 Inf"):
        myq.quantize_model(tiny_opt)
    assert isinstance(tiny_opt.model.decoder.layers[0].fc1, nn.Linear)
