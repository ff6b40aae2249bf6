"""Shared fixtures. No tests/__init__.py on purpose: mace-torch installs a top-level ``tests`` package."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

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
             "max_epochs": 20, "batch_size": 4, "committee": 2, "finetune_epochs": 8, "finetune_min_frames": 32}


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


# ---------------------------------------------------------------------------------------------------------------
# trained-model cache: inside pytest's temporary folder, never the machine's /tmp
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """``load_calculator`` writes model bytes to ``$DEFECTFLOW_MODEL_CACHE`` (default: ``<system tmp>/defectflow-
    models``, shared by every run on the machine). The tests point it at a session folder under pytest's basetemp,
    so no test reads a model another session (or another user) left there; subprocesses inherit the variable."""
    old = os.environ.get("DEFECTFLOW_MODEL_CACHE")
    os.environ["DEFECTFLOW_MODEL_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    yield os.environ["DEFECTFLOW_MODEL_CACHE"]
    if old is None:
        os.environ.pop("DEFECTFLOW_MODEL_CACHE", None)
    else:
        os.environ["DEFECTFLOW_MODEL_CACHE"] = old


# ---------------------------------------------------------------------------------------------------------------
# CI=true: a skipped test fails the run
# ---------------------------------------------------------------------------------------------------------------
# Every skip in this suite means "this engine / package / platform is missing" (pw.x, Debian's pseudopotentials,
# cp2k + cp2k-data, mpirun, tblite, mace, chgnet, ASE's test data, Linux /proc). scripts/setup.sh installs all of
# them, so in CI a skip is a broken set-up, never a pass: with CI=true (set by CI services; .ci/run sets it too)
# a test that skips is reported as failed, and a module skipped at import (pytest.importorskip at module level)
# makes the run exit with status 1 and is listed in the summary. A skip that is intentional even in CI must be
# listed here, with why: (regular expression matched against the skip reason, the reason it is allowed).
INTENTIONAL_SKIPS: tuple[tuple[str, str], ...] = ()

_ci_collection_skips: list[str] = []


def ci_strict() -> bool:
    """True when the environment says CI (CI=true/1/yes/on, case-insensitive)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def _skip_reason(report) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2]).removeprefix("Skipped: ")
    return str(lr)


def _intentional(reason: str) -> bool:
    return any(re.search(pattern, reason) for pattern, _why in INTENTIONAL_SKIPS)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and ci_strict():
        reason = _skip_reason(report)
        if not _intentional(reason):
            report.outcome = "failed"
            report.longrepr = (f"CI=true: this test was skipped ({reason}); in CI a missing engine or package fails "
                               "the run (install it: scripts/setup.sh), or list an intentional skip in "
                               "tests/conftest.py INTENTIONAL_SKIPS")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if report.skipped and ci_strict():
        reason = _skip_reason(report)
        if not _intentional(reason):
            _ci_collection_skips.append(f"{report.nodeid}: {reason}")
    return report


def pytest_sessionfinish(session, exitstatus):
    if _ci_collection_skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _ci_collection_skips:
        terminalreporter.section("CI=true: skipped modules fail the run", sep="=", red=True, bold=True)
        for line in _ci_collection_skips:
            terminalreporter.line(f"SKIPPED MODULE {line}", red=True)


# ---------------------------------------------------------------------------------------------------------------
# processes (Linux /proc): which engine children a call left behind
# ---------------------------------------------------------------------------------------------------------------
def proc_table() -> dict[int, dict]:
    """pid → comm, state, ppid, pgrp, sid, start (clock ticks since boot) of every process (Linux /proc)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        f = text.rsplit(")", 1)[1].split()
        table[int(stat.parent.name)] = {"comm": text[text.index("(") + 1: text.rindex(")")], "state": f[0],
                                        "ppid": int(f[1]), "pgrp": int(f[2]), "sid": int(f[3]), "start": int(f[19])}
    return table


def descendants(root: int, table: dict[int, dict]) -> dict[int, dict]:
    """The processes of ``table`` descending from ``root`` (by parent pid), whatever session or group they are in."""
    out, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, info in table.items():
            if info["ppid"] == parent and pid not in out:
                out[pid] = info
                todo.append(pid)
    return out


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """The whole campaign of test_pipeline.py, run once per session (test_report.py reads the same run)."""
    from defectflow.campaign import Campaign
    from defectflow.submit import run_campaign

    work = tmp_path_factory.mktemp("pipeline")
    campaign = Campaign.from_dict(si_vacancy_campaign(
        "pipeline", work,
        relax={"fmax": 0.3, "max_steps": 6},
        selection={"strategy": "minima", "budget": 6},
        mlip=TINY_MLIP,
        # path frames every 2 FIRE steps: top-up candidates even from short relaxations
        search={"extra_starts": 1, "fmax": 0.1, "max_steps": 60, "path_every": 2},
        # a threshold no tiny model meets: forces the top-up round (warm-started retraining) to run
        verify={"energy_threshold": 0.001, "max_rounds": 1},
        levels={"dielectric": 11.7},
    ))
    return campaign, run_campaign(campaign)
