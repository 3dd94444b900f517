"""Count the bytes a model holds: every parameter and buffer, a shared (tied) tensor once."""

from .layers import QuantizedLinear


def footprint_bytes(module):
    """Return the bytes of all parameters and buffers of `module`, counting a shared tensor once."""
    seen, total = set(), 0
    tensors = list(module.parameters()) + list(module.buffers())
    for tensor in tensors:
        key = id(tensor) if tensor.is_meta else (tensor.device, tensor.data_ptr(), tensor.numel())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def footprint_mb(module):
    """Return `footprint_bytes(module)` in megabytes (10^6 bytes), the unit the course quotes."""
    return footprint_bytes(module) / 1e6


def bits_per_weight(layer):
    """Return the storage bits per weight of a `QuantizedLinear`: codes plus scales and zero points."""
    if not isinstance(layer, QuantizedLinear):
        raise TypeError(f"expected a QuantizedLinear, got {type(layer).__name__}")
    stored = layer.weight.numel() * layer.weight.element_size() + layer.scale.numel() * layer.scale.element_size()
    if layer.zero_point is not None:
        stored += layer.zero_point.numel()
    return 8 * stored / (layer.in_features * layer.out_features)
