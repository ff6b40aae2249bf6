"""Output helpers shared by the engines: the one definition of the band edges (VBM, CBM) of a calculation, and
the one reduction of an electrostatic-potential grid to what the finite-size corrections need.

Every code prints Kohn-Sham levels (eV) and their occupations differently (QE: per k-point and spin, normalised to
1; CP2K: per spin channel, up to 2 restricted / 1 unrestricted; tblite: up to 2); each code's parser reads its own
table and hands the levels to :func:`band_edges`, which decides what is occupied the same way for all of them.

A code that writes its electrostatic potential on a grid (QE's pp.x) hands it to :func:`potential_from_grid`, which
keeps the planar averages (doped's FNV) and the per-site values (doped's eFNV) as an
:class:`~defectflow.schemas.core.ElectrostaticPotential`. VASP needs no grid: its OUTCAR prints the site potentials.
"""

from __future__ import annotations

import numpy as np
from pymatgen.core import Structure

from defectflow.schemas.core import ElectrostaticPotential

__all__ = ["SITE_POTENTIAL_SIGMA", "band_edges", "potential_from_grid", "site_potentials"]

#: Width (standard deviation, Å) of the Gaussian test charge the site potentials are averaged with. VASP averages
#: over test-charge spheres of ~1 Å radius; any width well below the distance of the sampled sites from the defect
#: (> 2 Å) gives the same eFNV alignment, as the point-charge model potential is harmonic there.
SITE_POTENTIAL_SIGMA = 0.5


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


def site_potentials(grid: np.ndarray, structure: Structure, sigma: float = SITE_POTENTIAL_SIGMA) -> np.ndarray:
    """The periodic function on ``grid`` (values at fractional points i/n along each lattice vector of
    ``structure``) averaged with a normalised Gaussian of standard deviation ``sigma`` (Å) centred on each site, in
    structure order and in the grid's units.

    Exact for the band-limited function the grid holds (a plane-wave code's potential): the Fourier coefficients
    are damped by exp(−σ²G²/2) and summed at each site, so the value moves smoothly with the site (no dependence
    on which grid points fall inside a sphere)."""
    grid = np.asarray(grid, dtype=float)
    coeffs = np.fft.fftn(grid) / grid.size
    hkl = np.meshgrid(*(np.fft.fftfreq(n, 1.0 / n) for n in grid.shape), indexing="ij")  # integer Miller indices
    g_cart = np.einsum("i...,ij->...j", np.stack(hkl), structure.lattice.reciprocal_lattice.matrix)  # Å⁻¹, with 2π
    damped = coeffs * np.exp(-0.5 * sigma**2 * np.einsum("...j,...j->...", g_cart, g_cart))
    out = np.empty(len(structure))
    for i, frac in enumerate(structure.frac_coords):
        phase = 2j * np.pi * (hkl[0] * frac[0] + hkl[1] * frac[1] + hkl[2] * frac[2])
        out[i] = float(np.real(np.sum(damped * np.exp(phase))))
    return out


def potential_from_grid(
    grid_ev: np.ndarray, structure: Structure, source: str, file: str | None = None,
    sigma: float = SITE_POTENTIAL_SIGMA,
) -> ElectrostaticPotential:
    """Planar averages and site potentials of an electrostatic potential on a grid.

    ``grid_ev``: the potential energy of an electron (local ionic + Hartree) in eV at the fractional points i/n of
    the cell of ``structure`` (the sign of VASP's LOCPOT). Planar averages keep that sign (doped's FNV reads
    LOCPOTs); site potentials are its Gaussian average at each site (:func:`site_potentials`) with the sign
    flipped, in V, the convention doped's eFNV takes from VASP's OUTCAR."""
    grid_ev = np.asarray(grid_ev, dtype=float)
    planar = [grid_ev.mean(axis=tuple(j for j in range(3) if j != axis)).tolist() for axis in range(3)]
    return ElectrostaticPotential(
        planar_averages=planar, site_potentials=(-site_potentials(grid_ev, structure, sigma)).tolist(),
        site_sigma=sigma, grid=list(grid_ev.shape), source=source, file=file,
    )
