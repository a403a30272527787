"""`zoflat plot`: what each figure draws, checked on its artists (lines, bands, scales, legend, title)."""

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from typer.testing import CliRunner

from zoflat_cli.cli import app
from zoflat_cli.tools.plot import figure, read_frame, run_title

runner = CliRunner()


def zoflat(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """gd reaches a loss of exactly 0; zo, 3 seeds each, 60 logged points; λ_max exact."""
    out = tmp_path_factory.mktemp("plot")
    return Path(zoflat("toy", "--dim", 4, "--steps", 600, "--log-every", 10, "--seeds", 3, "-o", "gd,zo", "--lr",
                       "gd=0.05", "--out", out, "-q").strip())


def draw(folder: Path, **options):
    df, summary = read_frame(folder)
    return df, figure(df, summary, run_title(folder, summary), **options)


def panel(fig, title: str):
    return next(ax for ax in fig.axes if ax.get_title().startswith(title))


def line(ax, label: str):
    return next(l for l in ax.get_lines() if l.get_label().startswith(label))


def test_zeros_stay_on_a_log_axis_as_symlog_from_zero(toy):
    df, fig = draw(toy)
    loss = panel(fig, "loss")
    gd = df[df.optimizer == "gd"]
    assert (gd["loss"] == 0).any()  # the case the plain log axis dropped
    assert loss.get_yscale() == "symlog" and loss.get_ylim()[0] == 0 and "symlog: linear below" in loss.get_title()
    drawn = line(loss, "gd").get_ydata()
    assert len(drawn) == gd["step"].nunique() and np.isfinite(drawn).all()  # every logged step, zeros too
    expected = gd.groupby("step")["loss"].mean().to_numpy()
    assert np.array_equal(drawn, expected)
    plt.close(fig)


def test_bands_are_selectable_and_clipped_to_the_seeds_range(toy):
    df, _ = draw(toy)
    zo = df[df.optimizer == "zo"].groupby("step")["balance"]
    for band in ("std", "minmax", "ci", "none"):
        _, fig = draw(toy, band=band)
        polys = [c for c in panel(fig, "balance").collections if isinstance(c, PolyCollection)]
        assert len(polys) == (0 if band == "none" else 2)  # a band per method
        if band == "minmax":
            (zo_band,) = [p for p in polys if np.allclose(p.get_facecolor()[0][:3], (1.0, 0.498, 0.055), atol=0.01)]
            ys = zo_band.get_paths()[0].vertices[:, 1]
            assert np.isclose(ys.min(), zo.min().min()) and np.isclose(ys.max(), zo.max().max())
        if band == "std":  # mean ± std, never past the seeds' own range
            low = (zo.mean() - zo.std()).clip(lower=zo.min())
            ys = np.concatenate([p.get_paths()[0].vertices[:, 1] for p in polys])
            assert np.isclose(ys, low.min()).any()
        title = fig._suptitle.get_text()
        assert title.startswith(f"zoflat toy: {toy.name}\n") and ("std" in title) == (band == "std")
        plt.close(fig)


def test_the_legend_is_outside_every_panel_and_inside_the_figure(toy):
    _, fig = draw(toy)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    page = fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
    for ax in fig.axes:
        if ax.get_visible():
            assert not box.overlaps(ax.get_tightbbox(renderer)), ax.get_title()
    assert len(legend.get_texts()) >= 4 and legend._ncols >= 2  # gd, zo, their theory lines, references
    plt.close(fig)


def test_x_axis_choices_and_markers_for_sparse_series(toy):
    df, fig = draw(toy, x="n_evals")
    loss = panel(fig, "loss")
    assert loss.get_xlabel().startswith("oracle calls")
    zo = df[df.optimizer == "zo"].groupby("step")["n_evals"].mean().to_numpy()
    assert np.array_equal(line(loss, "zo").get_xdata(), zo)  # two losses a step: twice gd's calls
    assert line(loss, "zo").get_marker() in (None, "None", "")  # 61 points: a line
    sparse = df[df["step"] % 100 == 0]  # 7 points: markers
    fig2 = figure(sparse, read_frame(toy)[1], "sparse")
    assert line(panel(fig2, "loss"), "zo").get_marker() == "o"
    plt.close(fig)
    plt.close(fig2)
    result = runner.invoke(app, ["plot", str(toy), "--x", "forward_passes"])
    assert result.exit_code == 2 and "--x forward_passes: these runs did not log it" in result.output


def test_overlay_draws_several_folders_in_one_figure_and_sweeps_below_a_path_one_each(toy, tmp_path):
    other = Path(zoflat("toy", "--dim", 4, "--steps", 100, "--log-every", 10, "-o", "zo", "--out", tmp_path / "b",
                        "-q").strip())
    written = zoflat("plot", toy, other, "--overlay", "--out", tmp_path / "figs").split()
    assert written == [str(tmp_path / "figs" / "overlay.png"), str(tmp_path / "figs" / "overlay.pdf")]
    frames = [read_frame(f)[0].assign(source=f.name) for f in (toy, other)]
    fig = figure(pd.concat(frames, ignore_index=True), read_frame(toy)[1], "overlay")
    labels = [l.get_label() for l in panel(fig, "loss").get_lines() if "theory" not in l.get_label()]
    assert {label.split(":")[0] for label in labels} == {toy.name, other.name}
    plt.close(fig)
    sweeps = tmp_path / "sweeps"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "toy" / "fig4.yaml"
    for name in ("one", "two"):
        zoflat("sweep", recipe, "--steps", 20, "--log-every", 10, "--dim", 3, "--seeds", 2, "--out", sweeps,
               "--name", name, "--jobs", 1, "-q")
    written = zoflat("plot", sweeps).split()
    folders = sorted({Path(w).parent for w in written})  # a figure per sweep folder, none per job
    assert len(written) == 4 and [(f / "sweep.yaml").is_file() for f in folders] == [True, True]


@pytest.mark.parametrize("values, expected", [
    ([1e-3, 1.0, 10.0], "log"),
    ([0.0, 1e-3, 1.0, 10.0], "symlog"),  # GD's loss reaching exactly 0
    ([-0.4, 1.0, 12.0, 60.0], "symlog"),  # a negative λ_max estimate beside positive ones
    ([-8.0, 0.01, 3.0, 9.0], "linear"),  # a signed metric (the toy's balance)
    ([1.0, 2.0, 3.0], "linear"),  # not spanning decades
])
def test_the_y_scale_keeps_zeros_and_negative_estimates(values, expected):
    from zoflat_cli.tools.plot import y_scale

    kind, linthresh = y_scale(pd.Series(values))
    assert kind == expected
    if kind == "symlog":
        assert linthresh == min(v for v in values if v > 0)
