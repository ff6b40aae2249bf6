"""The one low-level plotting helper every step uses (matplotlib, Agg backend: no display needed); figures of a
finished run drawn again from its store are in :mod:`defectflow.replot`."""

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
