"""Shared fixtures. No tests/__init__.py on purpose: mace-torch installs a top-level ``tests`` package."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

SI_A = 5.431  # Å, experimental lattice constant of Si


def si_conventional() -> Structure:
    """8-atom conventional diamond Si cell (a = 5.431 Å)."""
    return Structure.from_spacegroup("Fd-3m", Lattice.cubic(SI_A), ["Si"], [[0, 0, 0]])


def si_vacancy(supercell=(1, 1, 1), rattle: float = 0.0, seed: int = 0) -> Structure:
    """Si cell with one vacancy (site 0 removed): 7 atoms for the conventional cell, 63 for 2×2×2."""
    s = si_conventional()
    s.make_supercell(supercell)
    s.remove_sites([0])
    if rattle:
        rng = np.random.default_rng(seed)
        s = Structure(s.lattice, s.species, s.cart_coords + rng.normal(0, rattle, (len(s), 3)),
                      coords_are_cartesian=True)
    return s


@pytest.fixture
def si_vac7() -> Structure:
    return si_vacancy()


@pytest.fixture
def si_vac7_rattled() -> Structure:
    return si_vacancy(rattle=0.05, seed=1)


def have(exe: str) -> bool:
    return shutil.which(exe) is not None
