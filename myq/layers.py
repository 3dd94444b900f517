"""Weight-only quantized linear layers (W8A16, W4A16, W2A16).

A layer keeps integer codes for its weight and a float scale per output channel (N) or per group of
S inputs (N, G). The input activations stay in floating point (the "A16" half of W8A16). Shapes:
N = out_features, K = in_features, G = K / S groups of S = group_size, B/T = batch/tokens.

Buffers, all registered so that `state_dict()` and memory footprints see every byte:
    weight      int8 (N, K) at 8 bits; uint8 (N, ceil(K * bits / 8)) packed codes at 4 and 2 bits
    scale       (N,) per-channel or (N, G) per-group, in the layer dtype (float32 for float16 layers)
    zero_point  int8, the shape of `scale`; only when asymmetric
    bias        (N,) in the layer dtype, or None

Two forward passes give the same output within float rounding:
    plain_forward   the one the course teaches: rebuild the float weight, then `F.linear`.
    fast_forward    on CPU with few rows (decoding, see `kernels.MAX_KERNEL_ROWS`), PyTorch's int8 or int4
                    weight-only kernel where one fits (see `myq.kernels`); otherwise (prefill, batches, GPUs,
                    other bit widths) dequantize with fewer, smaller temporaries and call `F.linear`.
`forward` takes the fast one unless `FAST_PATH` is False (see `plain_path()`).

The int4 kernel reads its own weight layout. A 4-bit layer converts `weight` to it once, on its first
kernel call or in `prepare_fast()`, and then holds only that copy; its scales keep their (N, G) shape
but are stored transposed in memory. `layout` records which one is in use ("plain" or "int4pack_cpu").
`int_weight()` and `state_dict()` always give the plain codes and bytes, so saved files do not depend
on the machine, and loading a state dict restores the plain layout.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, packing
from .quant import check_bits, get_scale, get_scale_and_zero_point, group_view, quantize_with

# Set to False (or use `plain_path()`) to run every layer's plain_forward, for comparisons.
FAST_PATH = True
PLAIN_LAYOUT = "plain"
INT4PACK_LAYOUT = "int4pack_cpu"


@contextlib.contextmanager
def plain_path():
    """Run every quantized layer's plain_forward inside the `with` block, then restore the switch."""
    global FAST_PATH
    previous, FAST_PATH = FAST_PATH, False
    try:
        yield
    finally:
        FAST_PATH = previous


def scale_dtype_for(dtype):
    """Return the dtype scales are stored in for a layer of `dtype`.

    float16 cannot hold scales below about 6e-8, so a row of weights near 1e-6 would get a zero scale;
    such layers keep float32 scales. bfloat16 has float32's exponent range and keeps bfloat16.
    """
    return torch.float32 if dtype == torch.float16 else dtype


def round_scale_up(scale, dtype):
    """Cast float32 `scale` to `dtype`, rounding up wherever the nearest value would be smaller.

    A scale rounded down shrinks the grid, so the extreme weights clamp and can miss their code by more
    than half a step (by about one step at 8 bits asymmetric in bfloat16). With a scale rounded up, every
    weight stays within half a step of a code, also with a zero point computed from the unrounded scale.
    """
    stored = scale.to(dtype)
    rounded_down = stored.float() < scale.float()
    return torch.where(rounded_down, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)


def default_symmetric(bits):
    """Return whether `bits` quantizes symmetrically by default: 8 and 4 bits yes, 2 bits no.

    Symmetric 2-bit codes can only use {-1, 0, 1} of the four codes [-2, 1]; a zero point puts all four
    on the weight's range, which loses less.
    """
    return bits != 2


class QuantizedLinear(nn.Module):
    """A linear layer y = x W^T + b whose weight W is stored as `bits`-bit integer codes and scales."""

    def __init__(self, in_features, out_features, bias=True, dtype=torch.float32, bits=8, group_size=None,
                 symmetric=None):
        super().__init__()
        check_bits(bits)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype={dtype} is the activation dtype and must be floating point, "
                            f"for example torch.bfloat16")
        if group_size is not None:
            group_view(torch.empty(out_features, in_features, device="meta"), group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.symmetric = default_symmetric(bits) if symmetric is None else symmetric

        # Zeros, not random values: a layer whose quantize() was forgotten outputs only its bias,
        # which is obviously wrong, instead of plausible noise.
        width = in_features if bits == 8 else packing.packed_width(in_features, bits)
        code_dtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("weight", torch.zeros(out_features, width, dtype=code_dtype))
        self.layout = PLAIN_LAYOUT
        scale_shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("scale", torch.zeros(scale_shape, dtype=scale_dtype_for(dtype)))
        if not self.symmetric:
            self.register_buffer("zero_point", torch.zeros(scale_shape, dtype=torch.int8))
        else:
            self.zero_point = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype))
        else:
            self.bias = None

    def extra_repr(self):
        granularity = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"{granularity}, {kind}, bias={self.bias is not None}")

    @torch.no_grad()
    def quantize(self, weight, bias=None):
        """Quantize a float weight (N, K) into this layer's buffers; copy `bias` too when given."""
        check_weight(weight, (self.out_features, self.in_features))
        w = weight.detach().to(self.weight.device)
        scale, zero_point = self._scale_and_zero_point(w)
        self.use_plain_layout()  # the copy_ below writes plain bytes

        # Quantize with the scale as stored (possibly rounded up to bf16), so codes and scale agree.
        stored_scale = round_scale_up(scale, self.scale.dtype)
        grouped = w if self.group_size is None else group_view(w, self.group_size)  # (N, K) -> (N, G, S)
        w_q = quantize_with(grouped, stored_scale, zero_point, self.bits).reshape(w.shape)

        self.weight.copy_(w_q if self.bits == 8 else packing.pack(w_q, self.bits))
        self.scale.copy_(stored_scale.reshape(self.scale.shape))
        if zero_point is not None:
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias.detach())
        return self

    def _scale_and_zero_point(self, w):
        axis = 0 if self.group_size is None else None
        if self.symmetric:
            return get_scale(w, self.bits, axis, self.group_size), None
        return get_scale_and_zero_point(w, self.bits, axis, self.group_size)

    def int_weight(self):
        """Return the signed int8 codes (N, K), unpacking them at 4 and 2 bits, whatever the layout."""
        if self.layout == INT4PACK_LAYOUT:
            return kernels.from_int4pack(self.weight, self.out_features, self.in_features)
        if self.bits == 8:
            return self.weight
        return packing.unpack(self.weight, self.bits, self.in_features)

    def dequantized_weight(self, dtype=None):
        """Return the float weight (N, K) that the codes and scales stand for, in `dtype` (default: scale's)."""
        dtype = dtype or self.scale.dtype
        w_q = self.int_weight()
        if self.group_size is not None:
            w_q = w_q.reshape(self.out_features, -1, self.group_size)  # (N, K) -> (N, G, S)
        expand = (..., None)  # scale (N,) -> (N, 1), or (N, G) -> (N, G, 1)
        w = w_q.float()
        if self.zero_point is not None:
            w = w - self.zero_point[expand].float()
        w = w * self.scale[expand].float()
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x):
        check_input(x, self.in_features)
        return self.fast_forward(x) if FAST_PATH else self.plain_forward(x)

    def plain_forward(self, x):
        """Rebuild the float weight (N, K) and call F.linear: the formula the course teaches."""
        return F.linear(x, self.dequantized_weight(x.dtype), self._bias_for(x))

    def _bias_for(self, x):
        return self.bias.to(x.dtype) if self.bias is not None else None

    def fast_forward(self, x):
        """Return plain_forward's result (within rounding) through a CPU kernel where one fits `x`."""
        kernel = self.kernel_for(x)
        if kernel is None:
            if self.layout != PLAIN_LAYOUT and self.weight.device.type != "cpu":
                self.use_plain_layout()  # moved off the CPU: the CPU layout would only cost an extra unpack
            return self.dequantize_forward(x)
        if kernel == "int8":
            y = kernels.int8_matmul(x, self.weight, self.scale)
        else:
            y = kernels.int4_matmul(x, self.weight, self.out_features, self.in_features, self.group_size,
                                    self.scale, self.zero_point)
        return y if self.bias is None else y.add_(self.bias)  # y is the kernel's new output

    def dequantize_forward(self, x):
        """Dequantize the weight once, in few passes, and call F.linear: the route for many rows and GPUs."""
        return F.linear(x, self.fast_dequantized_weight(x.dtype), self._bias_for(x))

    def kernel_for(self, x):
        """Return "int8" or "int4" when a CPU kernel can compute this layer for `x`, else None.

        The first such call prepares the weight (see `prepare_fast`).
        """
        kernel = {8: "int8", 4: "int4"}.get(self.bits)
        if kernel is None or not kernels.kernel_may_run(x, kernel):
            return None
        if self.layout == INT4PACK_LAYOUT and self.weight.device.type == "cpu":
            return kernel  # prepared already: skip the checks, which cost more than a small layer's matmul
        return kernel if self.prepare_fast() else None

    @torch.no_grad()
    def prepare_fast(self):
        """Store the weight the way this machine's CPU kernel reads it, once; return whether a kernel can run it.

        A 4-bit layer moves to PyTorch's int4 layout, which replaces the plain bytes. An int8 weight only
        needs a 64-byte aligned start, which a weight loaded from a file may lack. Other layers stay as they are.
        """
        if self.bits == 4 and kernels.int4_kernel_fits(self.out_features, self.in_features, self.group_size,
                                                        self.weight.device):
            if self.layout != INT4PACK_LAYOUT:
                self.weight = kernels.to_int4pack(self.int_weight())
                # Same (N, G) values, stored as (G, N): the kernel's table is built from the transpose
                # on every call, and a contiguous read makes that several times faster.
                self.scale = self.scale.t().contiguous().t()
                if self.zero_point is not None:
                    self.zero_point = self.zero_point.t().contiguous().t()
                self.layout = INT4PACK_LAYOUT
            return True
        if self.bits == 8 and self.group_size is None and self.zero_point is None and kernels.HAS_INT8_KERNEL:
            if self.weight.device.type == "cpu" and not kernels.is_aligned(self.weight):
                self.weight = self.weight.clone(memory_format=torch.contiguous_format)
            return kernels.int8_kernel_fits(self.weight)
        return False

    @torch.no_grad()
    def use_plain_layout(self):
        """Store the weight in the plain layout again (documented packing along K), if it is not already."""
        if self.layout != PLAIN_LAYOUT:
            self.weight = packing.pack(self.int_weight(), self.bits)
            self.scale = self.scale.contiguous()
            if self.zero_point is not None:
                self.zero_point = self.zero_point.contiguous()
            self.layout = PLAIN_LAYOUT

    def fast_dequantized_weight(self, dtype):
        """Return `dequantized_weight(dtype)`, computed in fewer passes over the weight.

        Packed codes are unpacked as offset codes (uint8), and the offset and zero point are subtracted
        there in place: the wrap-around of uint8 arithmetic leaves exactly the signed codes' bytes, so a
        view as int8 gives the codes. They are converted to floats once and the scale multiplied in place,
        so with scales in `dtype` this rounds exactly as `dequantized_weight` does. From the int4 kernel's
        layout the result is the transposed view of a (K, N) tensor, which F.linear uses without a copy.
        """
        # NOTE: torch.compile of a one-expression dequantize was slower on the CPU (3.0 ms against 0.75 ms
        # here for a 4096 x 1024 W4 g128 weight, torch 2.14.1, two threads), so it is not used.
        work_dtype = dtype if self.scale.dtype == dtype else torch.float32
        n, k, span = self.out_features, self.in_features, self.group_size or self.in_features
        transposed = self.layout == INT4PACK_LAYOUT

        def per_group(tensor):  # (N,) or (N, G) -> (G, 1, N) against (G, S, N), else (N, G, 1)
            tensor = tensor.reshape(n, -1)
            # Contiguous along N: a strided operand would make the in-place ops below run unvectorized.
            return tensor.t().contiguous()[:, None, :] if transposed else tensor[..., None]

        if self.bits == 8:
            w = self.weight.to(work_dtype).view(n, -1, span)  # (N, K) -> (N, G, S)
            if self.zero_point is not None:
                w.sub_(per_group(self.zero_point).to(work_dtype))  # code - zero_point can exceed int8
        else:
            if transposed:
                codes = kernels.int4pack_offset_codes_t(self.weight, n, k).view(-1, span, n)  # (K, N) -> (G, S, N)
            else:
                codes = kernels.unpacked_offset_codes(self.weight, self.bits, k).reshape(n, -1, span)
            shift = 2 ** (self.bits - 1)
            if self.zero_point is not None:
                shift = (per_group(self.zero_point).to(torch.int16) + shift).to(torch.uint8)
            w = codes.sub_(shift).view(torch.int8).to(work_dtype)
        w.mul_(per_group(self.scale).to(work_dtype))
        w = w.view(k, n).t() if transposed else w.view(n, k)
        return w.to(dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Saved files always hold the plain layout, so they load on any machine, whatever ran here.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != PLAIN_LAYOUT:
            destination[prefix + "weight"] = packing.pack(self.int_weight(), self.bits)
            for name in ("scale", "zero_point"):
                if prefix + name in destination:
                    destination[prefix + name] = destination[prefix + name].contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # State dicts hold plain bytes (see _save_to_state_dict), so the layer takes the plain layout first.
        self.use_plain_layout()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # Module.to(torch.float16) and .half() cast every float buffer to float16, which rounds the scales
        # of tiny rows to 0 (see scale_dtype_for). So a layer made float16 keeps float32 scales.
        scale = self.scale
        super()._apply(fn, recurse)
        if self.scale.dtype == torch.float16 and scale.dtype != torch.float16:
            self.scale = scale.to(device=self.scale.device, dtype=scale_dtype_for(torch.float16))
        return self


class QuantizedLinearLayer(QuantizedLinear):
    """The W8A16 layer: int8 weight (N, K), one scale per output channel (N,), optional bias (N,).

    The int8 matmul is exact in the activation dtype for codes in [-128, 127], so the scale is applied
    to the (T, N) output instead of the (N, K) weight: y = (x W_q^T) * scale + bias. float16 inputs,
    whose range those unscaled sums can exceed, take the dequantized weight instead.
    """

    def __init__(self, in_features, out_features, bias=True, dtype=torch.float32):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, bits=8, group_size=None,
                         symmetric=True)

    def plain_forward(self, x):
        """Compute y = (x W_q^T) * scale + bias, the W8A16 formula."""
        if x.dtype == torch.float16:
            # float16 stops at 65504: unscaled sums (up to 127 * K) would overflow to inf, and scales below
            # 6e-8 would round to 0. Scaling the weight before the matmul keeps both in range.
            return super().plain_forward(x)
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def dequantize_forward(self, x):
        """Compute the W8A16 formula with the scale and bias applied in place, on the new (T, N) output.

        Without a kernel the formula is already the cheap route, because it converts the codes once and
        builds no float weight. Working in place skips two (T, N) temporaries and rounds exactly as
        `plain_forward` does.
        """
        if x.dtype == torch.float16:
            return super().dequantize_forward(x)  # unscaled sums would overflow, as in plain_forward
        y = F.linear(x, self.weight.to(x.dtype)).mul_(self.scale.to(x.dtype))
        return y if self.bias is None else y.add_(self.bias.to(x.dtype))


def prepare_fast(model):
    """Prepare every quantized layer of `model` for its CPU kernel now, instead of on its first call.

    Returns the number of layers a kernel can run. Layers whose scales are not in a kernel dtype
    (bfloat16) are left alone, because a kernel would never run them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}; pass the quantized model")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    return sum(layer.prepare_fast() for layer in layers if layer.scale.dtype in kernels.KERNEL_DTYPES)


def check_weight(weight, expected_shape):
    """Raise a clear error unless `weight` is a real, finite float tensor of `expected_shape`."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.is_meta:
        raise ValueError("weight is on the meta device and has no values; load the real weights first "
                         "(for example with from_pretrained without device_map, or load_state_dict)")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be floating point to quantize, got dtype {weight.dtype}; "
                        f"is it quantized already?")
    if tuple(weight.shape) != tuple(expected_shape):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {tuple(expected_shape)} (N, K)")
    finite = torch.isfinite(weight)
    if not finite.all():
        n_nan = int(torch.isnan(weight).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ValueError(f"weight contains {n_nan} NaN and {n_inf} Inf values; a scale cannot be computed")


def check_input(x, in_features):
    """Raise a clear error unless `x` is a floating-point tensor whose last dimension is K."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        received = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"input must be a floating-point tensor (float32, bfloat16 or float16), got {received}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"input has shape {tuple(x.shape)}; expected the last dimension to be "
                         f"in_features={in_features}, as in (B, T, {in_features})")
