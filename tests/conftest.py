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


def _rattled(s: Structure, rattle: float, seed: int) -> Structure:
    """Gaussian rattle (stdev ``rattle`` in Å), deterministic for ``seed``; unchanged when ``rattle`` is 0."""
    if not rattle:
        return s
    rng = np.random.default_rng(seed)
    return Structure(s.lattice, s.species, s.cart_coords + rng.normal(0, rattle, (len(s), 3)), coords_are_cartesian=True)


def si_vacancy(supercell=(1, 1, 1), rattle: float = 0.0, seed: int = 0) -> Structure:
    """Si cell with one vacancy (site 0 removed): 7 atoms for the conventional cell, 63 for 2×2×2."""
    s = si_conventional()
    s.make_supercell(supercell)
    s.remove_sites([0])
    return _rattled(s, rattle, seed)


def si_vac15(rattle: float = 0.0, seed: int = 3) -> Structure:
    """15-atom Si vacancy cell (2×2×2 primitive cell, one site removed), optionally Gaussian-rattled (stdev in Å,
    deterministic for ``seed``). GFN1-xTB converges on it for q = -1, 0, +1 unrattled; GFN2 for q = 0, +1."""
    prim = si_conventional().get_primitive_structure()
    prim.make_supercell(2)
    prim.remove_sites([0])
    return _rattled(prim, rattle, seed)


#: tblite settings used as cheap real "low" and "high" fidelities in tests
GFN1 = {"engine": "ase", "calculator": "tblite.ase.TBLite", "xc": "GFN1-xTB",
        "kwargs": {"method": "GFN1-xTB", "verbosity": 0}}
GFN2 = {**GFN1, "xc": "GFN2-xTB", "kwargs": {"method": "GFN2-xTB", "verbosity": 0}}

#: a MACE model small enough to train in seconds on 2 cores
TINY_MLIP = {"hidden_irreps": "8x0e", "max_L": 0, "num_interactions": 2, "correlation": 2, "r_max": 4.0,
             "max_epochs": 20, "batch_size": 4}


def si_vacancy_campaign(name: str, work, **sections) -> dict:
    """The test campaign most pipeline tests share: v_Si in the 16-site cell (2×2×2 primitive supercell),
    q = 0, +1, ±30 % distortions, GFN1-xTB (low) → GFN2-xTB (high), 4 LF steps, ``work`` as work_dir.
    Each keyword replaces that whole section (``relax={...}``, ``mlip=TINY_MLIP``, ``execution={...}``)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = {
        "name": name,
        "host": {"structure": str(root / "workflows/structures/Si.POSCAR"),
                 "supercell": {"matrix": [[2, 0, 0], [0, 2, 0], [0, 0, 2]]}, "oxidation_states": {"Si": 4}},
        "defects": {"include": ["v_Si"]},
        "charges": [0, 1],
        "distortions": {"bond_distortions": [-0.3, 0.3], "dimer": False},
        "fidelities": {"low": GFN1, "high": GFN2},
        "relax": {"fmax": 0.3, "max_steps": 4},
        "execution": {"work_dir": str(work)},
    }
    data.update(sections)
    return data


@pytest.fixture
def si_vac7() -> Structure:
    return si_vacancy()


@pytest.fixture
def si_vac7_rattled() -> Structure:
    return si_vacancy(rattle=0.05, seed=1)


def have(exe: str) -> bool:
    return shutil.which(exe) is not None


# ---------------------------------------------------------------------------------------------------------------
# a real MongoDB wire-protocol server (SecantusDB) for FireWorks / jobflow-remote / MongoDB-store tests
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mongo_uri():
    """``mongodb://127.0.0.1:PORT/defectflow_test`` on a SecantusDB server (in memory) started for the session.

    The server runs as a subprocess (``python -m secantus``), so it has its own interpreter and does not compete
    with the tests for the GIL; tests pick their own database names when they need isolation."""
    import socket
    import subprocess
    import sys
    import time

    import pymongo

    with socket.socket() as s:  # a free loopback port (tiny race window until the server binds it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", str(port),
                             "--storage-path", ":memory:", "--log-level", "WARNING"])
    base = f"mongodb://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                with pymongo.MongoClient(base, serverSelectionTimeoutMS=500) as client:
                    client.admin.command("ping")
                break
            except pymongo.errors.PyMongoError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"SecantusDB did not start on port {port} (exit code {proc.poll()})")
                time.sleep(0.2)
        yield base + "defectflow_test"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
