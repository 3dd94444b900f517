"""Linear quantization of tensors: scales, zero points, quantize, dequantize, error measures.

A weight w is mapped to signed integer codes w_q of `bits` bits, qmin = -2^(bits-1), qmax = 2^(bits-1) - 1:

    symmetric:   w_q = clamp(round(w / scale), qmin, qmax)              w_dq = w_q * scale
    asymmetric:  w_q = clamp(round(w / scale) + zero_point, qmin, qmax) w_dq = (w_q - zero_point) * scale

`zero_point` is an integer code (the code that dequantizes to 0.0). Granularity is chosen by two arguments:
`axis=None, group_size=None` is per-tensor, `axis=a` gives one scale per index along axis `a` (per-channel),
and `group_size=S` splits the last dimension K of a 2-D weight (N, K) into G = K / S groups of S values each.
Scales always broadcast against the tensor they belong to: shape () per-tensor, a 1 at every dimension but
`axis` per-channel, and (N, G, 1) against the grouped view (N, G, S) per-group.

Scales are computed in float32 whatever the weight dtype, so bf16 weights above 65504 or near 1e-6 still get
finite, positive scales. Codes are stored as int8 whatever `bits` is; packing 4- and 2-bit codes into bytes
lives in `myq.packing`.
"""

import torch

SUPPORTED_BITS = (2, 4, 8)


def check_bits(bits, supported=SUPPORTED_BITS):
    """Raise ValueError unless `bits` is one of `supported` (an int, not a bool or a string)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in supported:
        raise ValueError(f"bits={bits!r} is not supported; use one of {', '.join(map(str, supported))}")
    return bits


def integer_range(bits):
    """Return (qmin, qmax) of a signed integer of `bits` bits, for example (-128, 127) for 8 bits."""
    check_bits(bits, supported=tuple(range(2, 9)))
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def group_view(w, group_size):
    """View a 2-D weight (N, K) as (N, G, S) groups of `group_size` along K."""
    if w.dim() != 2:
        raise ValueError(f"group-wise quantization needs a 2-D weight (N, K), got shape {tuple(w.shape)}")
    n, k = w.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide K={k}; sizes that divide it: {divisors_of(k)}")
    return w.reshape(n, k // group_size, group_size)  # (N, K) -> (N, G, S)


def divisors_of(k, limit=8):
    """Return the powers of two (up to 1024) that divide `k`, largest first, as group-size suggestions."""
    sizes = [2 ** p for p in range(10, 0, -1) if k % (2 ** p) == 0]
    return sizes[:limit]


def _extrema(w, axis=None, group_size=None):
    """Return float32 (min, max) of `w` per tensor, per `axis` or per group, shaped to broadcast.

    Per-tensor results have shape (); per-channel ones keep `axis` with size 1 elsewhere; per-group
    ones have shape (N, G, 1), matching `group_view(w, group_size)`.
    """
    w32 = w.detach().float()
    if group_size is not None:
        grouped = group_view(w32, group_size)  # (N, K) -> (N, G, S)
        return grouped.amin(dim=-1, keepdim=True), grouped.amax(dim=-1, keepdim=True)
    if axis is None:
        return w32.amin(), w32.amax()
    axis = axis % w.dim()
    dims = tuple(d for d in range(w.dim()) if d != axis)
    return w32.amin(dim=dims, keepdim=True), w32.amax(dim=dims, keepdim=True)


def get_scale(w, bits=8, axis=None, group_size=None):
    """Return the symmetric scale max|w| / qmax in float32, shaped to broadcast (see `_extrema`).

    An all-zero slice gets scale 1.0: any finite positive value works, because its codes are all 0.
    """
    _, qmax = integer_range(bits)
    lo, hi = _extrema(w, axis, group_size)
    amax = torch.maximum(lo.abs(), hi.abs())
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def get_scale_and_zero_point(w, bits=8, axis=None, group_size=None):
    """Return the asymmetric (scale, zero_point) that map [min(w, 0), max(w, 0)] onto [qmin, qmax].

    The range always contains 0, so 0.0 has a code (zero_point) and zero_point lies within [qmin, qmax].
    `zero_point` is an int8 tensor of codes; `scale` is float32. Both broadcast like `get_scale`'s result.
    """
    qmin, qmax = integer_range(bits)
    lo, hi = _extrema(w, axis, group_size)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    span = hi - lo
    scale = torch.where(span > 0, span / (qmax - qmin), torch.ones_like(span))
    zero_point = torch.round(qmin - lo / scale).clamp(qmin, qmax).to(torch.int8)
    return scale, zero_point


def quantize_with(w, scale, zero_point=None, bits=8):
    """Quantize `w` with a given scale (and zero point): round, saturate to [qmin, qmax], cast to int8.

    Clamping happens before the cast, so out-of-range values saturate instead of wrapping around.
    """
    qmin, qmax = integer_range(bits)
    codes = torch.round(w.float() / scale.float())
    if zero_point is not None:
        codes = codes + zero_point.float()
    return codes.clamp(qmin, qmax).to(torch.int8)


def dequantize_with(w_q, scale, zero_point=None):
    """Return the float32 values (w_q - zero_point) * scale."""
    w = w_q.float()
    if zero_point is not None:
        w = w - zero_point.float()
    return w * scale.float()


def linear_quantize(w, bits=8, symmetric=True, axis=None, group_size=None):
    """Quantize `w`; return (w_q, scale, zero_point), zero_point being None when symmetric.

    w_q is int8 with the shape of `w`. With `group_size`, `w` must be 2-D (N, K) and scale (and zero_point)
    have shape (N, G, 1); `linear_dequantize` with the same `group_size` undoes it.
    """
    if group_size is not None and axis is not None:
        raise ValueError(f"pass either axis={axis} or group_size={group_size}, not both")
    if symmetric:
        scale, zero_point = get_scale(w, bits, axis, group_size), None
    else:
        scale, zero_point = get_scale_and_zero_point(w, bits, axis, group_size)
    target = w if group_size is None else group_view(w, group_size)
    w_q = quantize_with(target, scale, zero_point, bits)
    return w_q.reshape(w.shape), scale, zero_point


def linear_dequantize(w_q, scale, zero_point=None, group_size=None):
    """Return float32 (w_q - zero_point) * scale, undoing `linear_quantize`."""
    target = w_q if group_size is None else group_view(w_q, group_size)
    return dequantize_with(target, scale, zero_point).reshape(w_q.shape)


def mean_squared_error(w, w_dq):
    """Return the mean of (w - w_dq)^2 as a Python float, computed in float32."""
    return (w.float() - w_dq.float()).pow(2).mean().item()


def max_abs_error(w, w_dq):
    """Return max |w - w_dq| as a Python float."""
    return (w.float() - w_dq.float()).abs().max().item()


def sqnr_db(w, w_dq):
    """Return the signal-to-quantization-noise ratio 10 log10(sum w^2 / sum (w - w_dq)^2) in dB.

    An exact reconstruction has no noise and returns +inf.
    """
    signal = w.float().pow(2).sum()
    noise = (w.float() - w_dq.float()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return (10 * torch.log10(signal / noise)).item()
