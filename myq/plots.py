"""Plots for the course notebooks: weight histograms over the quantization grid, errors by granularity,
model footprints and perplexity against bits per weight.

Each function draws on the matplotlib Axes it is given (or on a new Figure) and returns that Axes. It never
calls `plt.show()` and prints nothing, so the notebook decides when to display. `w` may have any shape, and
is flattened for the histogram. `scale` and `zero_point` must be single values (per-tensor), because one
histogram has one grid. To see a per-channel grid, plot one row (1, K) with its own scale.
"""

import torch

from .quant import dequantize_with, integer_range

ERROR_LABELS = {"mse": "MSE", "sqnr_db": "SQNR (dB)", "max_abs_error": "max abs error"}


def quantization_grid(scale, zero_point=None, bits=8):
    """Return the float32 value that each of the 2^bits codes dequantizes to, lowest code first.

    These are the only values a quantized weight can take: (code - zero_point) * scale for every
    code in [qmin, qmax]. `scale` and `zero_point` must each hold a single value.
    """
    scale = _single_value(scale, "scale", torch.float32)
    if zero_point is not None:
        zero_point = _single_value(zero_point, "zero_point", torch.int64)
    qmin, qmax = integer_range(bits)
    codes = torch.arange(qmin, qmax + 1, dtype=torch.int64)
    return dequantize_with(codes, scale, zero_point)


def _single_value(value, name, dtype):
    tensor = torch.as_tensor(value).detach().cpu()
    if tensor.numel() != 1:
        raise ValueError(f"{name} must be a single value (per-tensor), got shape {tuple(tensor.shape)}. "
                         f"For per-channel scales, plot one row at a time with its own {name}")
    return tensor.reshape(()).to(dtype)


def plot_weight_histogram(w, scale, zero_point=None, bits=8, ax=None, bins=100):
    """Draw a histogram of the values of `w` and the quantization grid as thin vertical lines.

    The grid is drawn as one LineCollection labelled "int{bits} grid", with one line at each value of
    `quantization_grid(scale, zero_point, bits)`, so a reader sees where each weight will snap to.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        received = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"w must be a floating-point tensor, got {received}")
    grid = quantization_grid(scale, zero_point, bits)
    ax = ax if ax is not None else _new_axes(figsize=(8, 3))

    ax.hist(w.detach().flatten().float().cpu().numpy(), bins=bins, color="tab:blue", alpha=0.8,
            label="weights")
    # The x axis transform spans the lines over the full height whatever the histogram's counts.
    ax.vlines(grid.numpy(), 0, 1, transform=ax.get_xaxis_transform(), colors="tab:red", linewidths=0.6,
              alpha=0.7, label=f"int{bits} grid")
    ax.set_xlabel("weight value")
    ax.set_ylabel("count")
    ax.legend(loc="upper right")
    return ax


def plot_error_by_granularity(rows, ax=None, metric="sqnr_db"):
    """Draw a bar chart of one error measure per granularity, one bar per row, in order.

    `rows` is a list of dicts, each with a "granularity" label and the `metric` key, for example
    {"granularity": "per-channel", "mse": 1.2e-5, "sqnr_db": 38.1}. The bar heights are the metric values.
    """
    if not rows:
        raise ValueError("rows is empty. Pass one dict per granularity, e.g. {'granularity': 'per-tensor', "
                         "'sqnr_db': 30.0}")
    missing = [row for row in rows if "granularity" not in row or metric not in row]
    if missing:
        raise ValueError(f"every row needs the keys 'granularity' and {metric!r}. This row has "
                         f"{sorted(missing[0])}")
    ax = ax if ax is not None else _new_axes(figsize=(5, 3))

    labels = [str(row["granularity"]) for row in rows]
    values = [float(row[metric]) for row in rows]
    ax.bar(labels, values, color="tab:blue")
    ax.set_ylabel(ERROR_LABELS.get(metric, metric))
    ax.set_xlabel("granularity")
    return ax


def plot_footprints(rows, ax=None):
    """Draw a bar chart of model footprints, one bar per row in order, each labelled with its size in MB.

    `rows` is a list of dicts with the keys "label" and "footprint_mb", for example
    {"label": "W4 g128", "footprint_mb": 212.6}, as `myq.sweep.perplexity_sweep` returns them.
    """
    _check_rows(rows, ("label", "footprint_mb"))
    ax = ax if ax is not None else _new_axes(figsize=(6, 3))

    bars = ax.bar([str(row["label"]) for row in rows], [float(row["footprint_mb"]) for row in rows],
                  color="tab:blue")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("footprint (MB)")
    ax.margins(y=0.15)  # room for the labels above the tallest bar
    return ax


def plot_perplexity_vs_bits(rows, ax=None, log_scale=True):
    """Draw perplexity against bits per weight, one point per row, each annotated with its label.

    `rows` is a list of dicts with the keys "label", "bits_per_weight" and "perplexity", as
    `myq.sweep.perplexity_sweep` returns them. The y axis is logarithmic by default, because 2-bit
    perplexities can be orders of magnitude above 8-bit ones.
    """
    _check_rows(rows, ("label", "bits_per_weight", "perplexity"))
    ax = ax if ax is not None else _new_axes(figsize=(7, 4))

    x = [float(row["bits_per_weight"]) for row in rows]
    y = [float(row["perplexity"]) for row in rows]
    ax.scatter(x, y, color="tab:blue", zorder=2)
    for row, x_value, y_value in zip(rows, x, y):
        ax.annotate(str(row["label"]), (x_value, y_value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes + scales + zero points)")
    ax.set_ylabel("perplexity")
    ax.grid(True, alpha=0.3)
    return ax


def _check_rows(rows, keys):
    """Raise ValueError unless `rows` is a non-empty list of dicts that all have `keys`."""
    if not rows:
        raise ValueError(f"rows is empty. Pass one dict per bar or point, with the keys {list(keys)}")
    for row in rows:
        missing = [key for key in keys if key not in row]
        if missing:
            raise ValueError(f"every row needs the keys {list(keys)}. The row {row} is missing {missing}")


def _new_axes(figsize):
    # Imported here so that `import myq` does not load pyplot and choose a backend for programs that never plot.
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax
