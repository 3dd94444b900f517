"""myq: a small weight quantizer for large language models, written to be read.

Conventions used throughout the package and the course notebooks:

Shapes      N = out_features, K = in_features (a linear weight is (N, K)), S = group_size,
            G = K / S groups per row, B/T = batch/tokens.
Codes       signed integers of `bits` bits in [qmin, qmax] = [-2^(bits-1), 2^(bits-1) - 1], kept as int8.
Dequantize  w_dq = (w_q - zero_point) * scale; symmetric quantization has no zero_point (it is 0).
Names       w (float weight), w_q (integer codes), w_dq (dequantized), w_packed (packed bytes),
            scale, zero_point (an integer code), qmin/qmax, axis, group_size.
Packing     4- and 2-bit codes are packed along K into uint8, first code in the low bits, stored with an
            offset of 2^(bits-1); see `myq.packing`.

The package prints nothing except progress bars on long work; it returns values for the caller to show.
"""

from .footprint import bits_per_weight, footprint_bytes, footprint_mb
from .layers import QuantizedLinear, QuantizedLinearLayer
from .packing import pack, unpack
from .quant import (
    SUPPORTED_BITS,
    get_scale,
    get_scale_and_zero_point,
    linear_dequantize,
    linear_quantize,
    max_abs_error,
    mean_squared_error,
    sqnr_db,
)
from .swap import (
    QuantizationConfig,
    SwapReport,
    quantize_model,
    quantized_layers,
    replace_linear_with_target,
    untie_weights,
)

__version__ = "0.1.0"
