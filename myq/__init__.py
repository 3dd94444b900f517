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
from .evaluate import (
    EMBEDDED_PROMPT,
    OPT_350M_PROMPT,
    bits_per_byte,
    decode_tokens_per_second,
    default_prompt,
    generate,
    negative_log_likelihood,
    perplexity,
)
from .layers import QuantizedLinear, QuantizedLinearLayer, plain_path, prepare_fast
from .models import (
    DATA_DIR,
    EMBEDDED_MODEL_DIR,
    build_opt_350m,
    held_out_text,
    hub_reachable,
    is_embedded_model,
    load_embedded_model,
    load_model,
    opt_350m_config,
    runtime_dtype,
)
from .packing import pack, unpack
from .plots import (
    plot_error_by_granularity,
    plot_footprints,
    plot_perplexity_vs_bits,
    plot_weight_histogram,
    quantization_grid,
)
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
from .serialization import load_quantized, save_quantized
from .swap import (
    QuantizationConfig,
    SwapReport,
    quantize_model,
    quantized_layers,
    replace_linear_with_target,
    untie_weights,
)

__version__ = "0.1.0"
