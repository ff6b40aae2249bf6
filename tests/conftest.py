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
