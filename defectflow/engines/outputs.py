"""Output helpers shared by the engines: the one definition of the band edges (VBM, CBM) of a calculation.

Every code prints Kohn-Sham levels (eV) and their occupations differently (QE: per k-point and spin, normalised to
1; CP2K: per spin channel, up to 2 restricted / 1 unrestricted; tblite: up to 2); each code's parser reads its own
table and hands the levels to :func:`band_edges`, which decides what is occupied the same way for all of them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["band_edges"]


def band_edges(
    eigenvalues,
    occupations,
    max_occupation=1.0,
    reference: float | None = None,
) -> tuple[float | None, float | None]:
    """(VBM, CBM) in the units of ``eigenvalues`` (eV in every engine) from levels and their occupations.

    VBM = highest level whose occupation is above half of ``max_occupation`` (the full occupation of one level:
    2 for spin-restricted levels, 1 for one spin channel or occupations normalised to 1; a scalar, or one value
    per level), CBM = lowest level below half; over all k-points and spins given. With smearing a partly filled
    (defect) level therefore counts as VBM or CBM by its occupation: the definition is meant for gapped cells.

    An occupation of NaN means "not printed": such a level counts as occupied when it lies at or below
    ``reference`` (eV; the Fermi level, where f = 1/2 for Fermi-Dirac, Gaussian and Methfessel-Paxton smearing,
    or the highest occupied level), else empty. Without a reference, unknown occupations give (None, None).
    A side with no level (no empty bands computed) is None.
    """
    e = np.asarray(eigenvalues, dtype=float).ravel()
    o = np.asarray(occupations, dtype=float).ravel()
    half = np.broadcast_to(np.asarray(max_occupation, dtype=float).ravel() / 2, e.shape)
    unknown = np.isnan(o)
    if unknown.any():
        if reference is None:
            return None, None
        o = np.where(unknown, np.where(e <= reference + 1e-9, 2 * half, 0.0), o)
    occupied, empty = e[o > half], e[o < half]
    return (float(occupied.max()) if occupied.size else None, float(empty.min()) if empty.size else None)
