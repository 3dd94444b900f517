"""Replace the `nn.Linear` modules of a model with quantized layers.

`replace_linear_with_target` is the course's recursive swap: it walks the module tree, builds a
`target_class` layer for every `nn.Linear` child that is not excluded and, when `quantized=True`,
quantizes the original weight into it. `quantized=False` builds the same structure with empty
(zero) buffers, ready for `load_state_dict` of weights quantized and saved earlier.

`quantize_model` is the one-call form the notebooks and the command line use.
"""

from dataclasses import dataclass, field

from torch import nn

from .layers import QuantizedLinear, QuantizedLinearLayer, check_weight
from .quant import SUPPORTED_BITS, check_bits, divisors_of


@dataclass
class SwapReport:
    """The dotted names of the linear modules a swap replaced and of those it skipped."""
    replaced: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


@dataclass
class QuantizationConfig:
    """The settings and module lists of a quantized model, stored by `quantize_model` as `model.myq_config`."""
    bits: int
    group_size: int | None
    symmetric: bool
    replaced: list
    skipped: list


def find_linears(module, exclude=()):
    """Return ([(parent, child_name, dotted_name, linear)] to replace, [dotted names excluded]).

    A name in `exclude` matches a child's own name ("lm_head") or its full dotted name
    ("model.decoder.layers.0.fc1").
    """
    targets, skipped = [], []

    def walk(parent, prefix):
        for name, child in parent.named_children():
            dotted = f"{prefix}{name}"
            if isinstance(child, nn.Linear):
                if name in exclude or dotted in exclude:
                    skipped.append(dotted)
                else:
                    targets.append((parent, name, dotted, child))
            else:
                walk(child, dotted + ".")

    walk(module, "")
    return targets, skipped


def shared_weight_names(module):
    """Return {dotted parameter name: [other names of the same tensor]} for tied parameters."""
    by_tensor = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return {name: [other for other in names if other != name]
            for names in by_tensor.values() if len(names) > 1 for name in names}


def check_targets(module, targets, layer_kwargs, quantized):
    """Raise before anything is changed when a target cannot be quantized as asked."""
    tied = shared_weight_names(module)
    group_size = layer_kwargs.get("group_size")
    for _, _, dotted, linear in targets:
        others = tied.get(f"{dotted}.weight")
        if others:
            raise ValueError(
                f"{dotted} shares its weight with {', '.join(others)} (tied embeddings). Quantizing it would "
                f"keep the float embedding and add a quantized copy. Exclude it (exclude=('{dotted.split('.')[-1]}',)) "
                f"or untie it first with myq.untie_weights(model, '{dotted}')")
        k = linear.in_features
        if group_size is not None and (group_size <= 0 or k % group_size):
            raise ValueError(
                f"{dotted}: group_size={group_size} does not divide its K=in_features={k}; "
                f"group sizes that divide {k}: {divisors_of(k)}")
        if quantized:
            try:
                check_weight(linear.weight, (linear.out_features, k))
            except (ValueError, TypeError) as error:
                raise type(error)(f"{dotted}: {error}") from error


def replace_linear_with_target(module, target_class, exclude=("lm_head",), quantized=True, **layer_kwargs):
    """Replace every `nn.Linear` under `module` by `target_class`, except the excluded names.

    `target_class(in_features, out_features, bias=..., dtype=..., **layer_kwargs)` builds each new
    layer; with `quantized=True` its `quantize(weight, bias)` fills it from the original layer. Every
    target is checked before any is replaced, so an error leaves the model unchanged. Returns a
    `SwapReport`; raises ValueError when nothing would be replaced.
    """
    targets, skipped = find_linears(module, tuple(exclude))
    if not targets:
        raise ValueError(f"found no nn.Linear to replace outside exclude={tuple(exclude)} "
                         f"(excluded: {skipped or 'none'}); is the model quantized already?")
    check_targets(module, targets, layer_kwargs, quantized)

    report = SwapReport(skipped=skipped)
    for parent, name, dotted, linear in targets:
        layer = target_class(linear.in_features, linear.out_features, bias=linear.bias is not None,
                             dtype=linear.weight.dtype, **layer_kwargs).to(linear.weight.device)
        if quantized:
            layer.quantize(linear.weight, linear.bias)
        setattr(parent, name, layer)
        report.replaced.append(dotted)
    return report


def quantized_layers(model):
    """Return {dotted name: layer} for every `QuantizedLinear` in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantize_model(model, bits=8, group_size=None, exclude=("lm_head",), symmetric=None):
    """Quantize the linear layers of `model` in place to `bits` bits and return the same model.

    8 bits per-channel uses `QuantizedLinearLayer` (W8A16); other settings use `QuantizedLinear`.
    The result is also recorded as `model.myq_config` (a `QuantizationConfig`).
    """
    check_bits(bits, SUPPORTED_BITS)
    already = quantized_layers(model)
    if already:
        first = next(iter(already))
        raise ValueError(f"the model is already quantized ({len(already)} quantized layers, e.g. {first}); "
                         f"quantizing integer codes again would lose more precision. Load the float model "
                         f"again to quantize it with other settings")

    if bits == 8 and group_size is None and symmetric in (None, True):
        report = replace_linear_with_target(model, QuantizedLinearLayer, exclude)
        symmetric = True
    else:
        report = replace_linear_with_target(model, QuantizedLinear, exclude, bits=bits, group_size=group_size,
                                            symmetric=symmetric)
        symmetric = next(iter(quantized_layers(model).values())).symmetric
    model.myq_config = QuantizationConfig(bits, group_size, symmetric, report.replaced, report.skipped)
    return model


def untie_weights(model, name):
    """Give the linear module `name` its own copy of a weight it shares (tied embeddings), in place."""
    linear = model.get_submodule(name)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
    linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=linear.weight.requires_grad)
    if hasattr(model, "config") and getattr(model.config, "tie_word_embeddings", False):
        # Otherwise transformers ties the weights again on the next save/load or tie_weights() call.
        model.config.tie_word_embeddings = False
    return model
