import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from myq.plots import (  # noqa: E402
    plot_error_by_granularity,
    plot_footprints,
    plot_perplexity_vs_bits,
    plot_weight_histogram,
    quantization_grid,
)
from myq.quant import get_scale, get_scale_and_zero_point  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def grid_lines(ax):
    """Return the x positions of the grid lines drawn by plot_weight_histogram, one per code."""
    collections = [c for c in ax.collections if c.get_label().endswith(" grid")]
    assert len(collections) == 1
    return np.array([segment[0][0] for segment in collections[0].get_segments()])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_grid_has_one_line_per_code(bits):
    torch.manual_seed(0)
    w = torch.randn(64)
    ax = plot_weight_histogram(w, get_scale(w, bits), bits=bits)
    assert len(grid_lines(ax)) == 2 ** bits


def test_symmetric_grid_is_codes_times_scale():
    scale = torch.tensor(0.5)
    ax = plot_weight_histogram(torch.tensor([-1.0, 0.25, 1.0]), scale, bits=4)
    expected = np.arange(-8, 8) * 0.5
    assert np.array_equal(grid_lines(ax), expected)


def test_asymmetric_grid_subtracts_zero_point():
    torch.manual_seed(0)
    w = torch.relu(torch.randn(256))
    scale, zero_point = get_scale_and_zero_point(w, 8)
    ax = plot_weight_histogram(w, scale, zero_point, bits=8)
    codes = np.arange(-128, 128)
    expected = (codes - zero_point.item()) * scale.item()
    np.testing.assert_allclose(grid_lines(ax), expected, rtol=1e-6)
    assert grid_lines(ax)[zero_point.item() + 128] == 0.0


def test_histogram_counts_every_weight():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    ax = plot_weight_histogram(w, get_scale(w), bins=20)
    heights = [patch.get_height() for patch in ax.patches]
    assert len(heights) == 20
    assert sum(heights) == w.numel()


def test_histogram_draws_on_given_axes():
    _, ax = plt.subplots()
    returned = plot_weight_histogram(torch.randn(16), torch.tensor(0.1), ax=ax)
    assert returned is ax


def test_grid_accepts_python_float_scale():
    grid = quantization_grid(0.25, zero_point=1, bits=2)
    assert torch.equal(grid, torch.tensor([-0.75, -0.5, -0.25, 0.0]))


def test_grid_rejects_per_channel_scale():
    with pytest.raises(ValueError, match=r"scale must be a single value .* shape \(4, 1\)"):
        quantization_grid(torch.ones(4, 1), bits=8)


def test_histogram_rejects_integer_weights():
    with pytest.raises(TypeError, match="torch.int8"):
        plot_weight_histogram(torch.zeros(4, dtype=torch.int8), 1.0)


def test_bar_heights_equal_errors():
    rows = [{"granularity": "per-tensor", "mse": 4e-4, "sqnr_db": 12.5},
            {"granularity": "per-channel", "mse": 2e-5, "sqnr_db": 38.0},
            {"granularity": "group 32", "mse": 1e-5, "sqnr_db": 41.25}]
    ax = plot_error_by_granularity(rows)
    assert [patch.get_height() for patch in ax.patches] == [12.5, 38.0, 41.25]
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["per-tensor", "per-channel", "group 32"]
    assert ax.get_ylabel() == "SQNR (dB)"


def test_bar_chart_plots_chosen_metric():
    rows = [{"granularity": "per-tensor", "mse": 4e-4}, {"granularity": "per-channel", "mse": 2e-5}]
    ax = plot_error_by_granularity(rows, metric="mse")
    assert [patch.get_height() for patch in ax.patches] == [4e-4, 2e-5]
    assert ax.get_ylabel() == "MSE"


def test_bar_chart_rejects_missing_metric():
    with pytest.raises(ValueError, match=r"'sqnr_db'.*\['granularity', 'mse'\]"):
        plot_error_by_granularity([{"granularity": "per-tensor", "mse": 1.0}])


def test_bar_chart_rejects_empty_rows():
    with pytest.raises(ValueError, match="rows is empty"):
        plot_error_by_granularity([])


FOOTPRINT_ROWS = [{"label": "bf16", "footprint_mb": 662.4}, {"label": "W8", "footprint_mb": 359.8},
                  {"label": "W4 g128", "footprint_mb": 212.6}, {"label": "W2 g128", "footprint_mb": 139.2}]


def test_footprint_bars_in_row_order():
    ax = plot_footprints(FOOTPRINT_ROWS)
    assert [patch.get_height() for patch in ax.patches] == [662.4, 359.8, 212.6, 139.2]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["bf16", "W8", "W4 g128", "W2 g128"]
    assert [text.get_text() for text in ax.texts] == ["662.4", "359.8", "212.6", "139.2"]


def test_perplexity_points_and_labels():
    rows = [{"label": "W8 per-channel", "bits_per_weight": 8.0156, "perplexity": 20.1},
            {"label": "W2 g32", "bits_per_weight": 2.75, "perplexity": 310.0}]
    ax = plot_perplexity_vs_bits(rows)
    assert ax.collections[0].get_offsets().tolist() == [[8.0156, 20.1], [2.75, 310.0]]
    assert [text.get_text() for text in ax.texts] == ["W8 per-channel", "W2 g32"]
    assert ax.get_yscale() == "log"
    assert plot_perplexity_vs_bits(rows, log_scale=False).get_yscale() == "linear"


def test_sweep_plots_reject_missing_key():
    with pytest.raises(ValueError, match=r"is missing \['perplexity'\]"):
        plot_perplexity_vs_bits([{"label": "W4", "bits_per_weight": 4.125}])
    with pytest.raises(ValueError, match="rows is empty"):
        plot_perplexity_vs_bits([])
