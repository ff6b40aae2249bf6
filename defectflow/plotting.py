"""Shared plotting helpers (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: str | Path, dpi: int | None = None) -> str:
    """Save ``fig`` as ``path`` (parent folders created), close it, and return the path as a string.

    ``dpi=None`` uses matplotlib's ``savefig.dpi`` setting."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return str(path)
