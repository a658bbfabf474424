"""Pictures for ``explore`` and ``eval`` (PNG or SVG), drawn with matplotlib's Agg canvas.

matplotlib is an optional extra (``pip install 'eft-local[plot]'``) imported only here, and
only when a plot is asked for; :func:`require` checks for it before any long run starts.
Figures are built without pyplot (no display, no global state) and written atomically.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eft_local.errors import EftError
from eft_local.files import atomic_path

FORMATS = ("png", "svg")
HINT = "--plot needs matplotlib: pip install 'eft-local[plot]'"
POINTS_GID = "combinations"
"""The SVG group id holding one marker per combination (tests count them)."""


def require(path: Path) -> None:
    """Fail now (one line) when ``path`` cannot be drawn: unknown format, no matplotlib,
    or a folder that does not exist."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise EftError(f"--plot {path}: give a .png or .svg file name")
    if not Path(path).parent.is_dir():
        raise EftError(f"--plot {path}: folder {Path(path).parent} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EftError(HINT) from None


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise EftError(HINT) from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: Path) -> None:
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    except OSError as exc:
        raise EftError(f"{path}: cannot write the plot ({exc})") from None


def _labels(ax: Any, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str]) -> None:
    """Label each point; a label that would sit on an earlier one moves down a line."""
    ax.autoscale_view()
    anchors = ax.transData.transform(list(zip(xs, ys, strict=True)))
    pixels = ax.figure.dpi / 72  # per point
    placed: list[tuple[float, float]] = []
    for (x, y), text, data in zip(anchors, texts, zip(xs, ys, strict=True), strict=True):
        dy = 4.0
        while any(abs(x - px) < 110 and abs(y + dy * pixels - py) < 10 * pixels
                  for px, py in placed):
            dy -= 10.0
        placed.append((x, y + dy * pixels))
        ax.annotate(text, data, textcoords="offset points", xytext=(6, dy), fontsize=7)


def explore_plot(rows: Sequence[Any], path: Path, *, title: str = "") -> int:
    """KL to the reference against decode tokens/s, one labelled point per row (size =
    memory), Pareto-optimal rows in orange; returns the number of points."""
    fig = _figure(7.0, 4.6)
    ax = fig.add_subplot()
    speed = [r.speed for r in rows]
    kl = [r.quality.kl_mean for r in rows]
    memory = [r.memory_bytes for r in rows]
    biggest = max(memory, default=1) or 1
    sizes = [30 + 370 * m / biggest for m in memory]
    colours = ["tab:orange" if r.pareto else "tab:blue" for r in rows]
    points = ax.scatter(speed, kl, s=sizes, c=colours, alpha=0.7, edgecolors="black",
                        linewidths=0.5)
    points.set_gid(POINTS_GID)
    if any(r.pareto for r in rows):  # optimal on three axes: no line through a 2-D front
        ax.scatter([], [], s=60, c="tab:orange", alpha=0.7, edgecolors="black",
                   linewidths=0.5, label="Pareto-optimal (KL, speed, memory)")
        ax.legend(loc="best", fontsize=8)
    positive = [k for k in kl if k > 0]
    if positive and max(positive) / min(positive) > 10:
        ax.set_yscale("symlog", linthresh=min(positive))
    ax.margins(x=0.2, y=0.12)  # room for the labels of the outermost points
    _labels(ax, speed, kl, [r.label + (" (reference)" if r.is_reference else "")
                            for r in rows])
    ax.set_xlabel("decode tokens/s (the better of plain and speculative)")
    ax.set_ylabel("mean KL(reference || combination), nats")
    ax.set_title(title or "combinations: closeness to the reference vs speed "
                 "(point area = memory)", fontsize=9)
    ax.grid(True, alpha=0.3)
    _save(fig, path)
    return len(rows)


_SWEEP = re.compile(r"^(?P<base>[^@]+)@(?P<knob>beta|lam|lambda)=(?P<value>[-+0-9.eE]+)$")


def _sweeps(scores: Sequence[Any], knob: str) -> dict[str, list[tuple[float, Any]]]:
    out: dict[str, list[tuple[float, Any]]] = {}
    for s in scores:
        found = _SWEEP.match(s.label)
        if found and found["knob"].startswith(knob):
            out.setdefault(found["base"], []).append((float(found["value"]), s))
    return {base: sorted(points, key=lambda p: p[0]) for base, points in out.items()}


def _declined(score: Any) -> float:
    """Declines among birth-year questions when the set has them, else over all."""
    if "year" in score.by_category:
        return float(score.category_rate("year", "declined"))
    return score.declined / score.n if score.n else 0.0


def scores_plot(scores: Sequence[Any], path: Path) -> int:
    """``eval``'s picture: accuracy and format against beta, declines against lambda (when
    those sweeps were run, ``PRESET@beta=X`` targets) and a bar chart of the other targets;
    returns the number of panels."""
    beta, lam = _sweeps(scores, "beta"), _sweeps(scores, "lam")
    bars = [s for s in scores if "@" not in s.label]
    panels: list[Callable[[Any], None]] = []

    def draw_beta(ax: Any) -> None:
        for base, points in beta.items():
            xs = [x for x, _ in points]
            ax.plot(xs, [s.accuracy for _, s in points], marker="o", label=f"{base} accuracy")
            ax.plot(xs, [s.format_rate for _, s in points], marker="s", linestyle="--",
                    label=f"{base} format")
        ax.set_xlabel("beta")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("beta sweep", fontsize=9)
        ax.legend(fontsize=7)

    def draw_lam(ax: Any) -> None:
        for base, points in lam.items():
            xs = [x for x, _ in points]
            ax.plot(xs, [_declined(s) for _, s in points], marker="o", label=f"{base} declined")
            ax.plot(xs, [s.accuracy for _, s in points], marker="s", linestyle="--",
                    label=f"{base} accuracy")
        ax.set_xlabel("lambda")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("lambda sweep", fontsize=9)
        ax.legend(fontsize=7)

    def draw_bars(ax: Any) -> None:
        xs = range(len(bars))
        ax.bar([x - 0.2 for x in xs], [s.accuracy for s in bars], width=0.4, label="accuracy")
        ax.bar([x + 0.2 for x in xs], [s.format_rate for s in bars], width=0.4,
               label="format")
        ax.set_xticks(list(xs), [s.label.removeprefix("tiny-") for s in bars], rotation=30,
                      ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title("targets", fontsize=9)
        ax.legend(fontsize=7)

    panels += [draw_beta] if beta else []
    panels += [draw_lam] if lam else []
    panels += [draw_bars] if bars else []
    if not panels:
        raise EftError("nothing to plot: no scores")
    fig = _figure(4.0 * len(panels), 3.6)
    for i, draw in enumerate(panels):
        draw(fig.add_subplot(1, len(panels), i + 1))
    _save(fig, path)
    return len(panels)
