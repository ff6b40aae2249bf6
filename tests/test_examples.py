"""The scripts in examples/, run as a user runs them (``python examples/NN_….py --fast``, one subprocess each), so
that they stay true to the code.

One small campaign (example 1's ``--fast``: GFN1-xTB → GFN2-xTB, 15-atom Si vacancy, q = 0, +1, a tiny MACE) runs
once into a MongoDB wire server (SecantusDB, the ``mongo_uri`` fixture). Example 3 submits the same campaign to
FireWorks and example 2 its steps 1-2 to jobflow-remote, both into that store: every tracked job finds its finished
twin there and reuses it (docs/results.md, Resume), so they cost mostly the managers' own bookkeeping. Example 4
queries the store; example 5 trains a surrogate on extxyz files it writes from xTB single points.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pymongo
import pytest

pytest.importorskip("tblite")
pytest.importorskip("mace")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CHARGES = {0, 1}  # the --fast campaign's charge states
GROUND_STATE = re.compile(r"^\s+v_Si q=([+-]\d+): start (\S+), E(?:_HF)? = (-?\d+\.\d+) eV", re.MULTILINE)


def run_example(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``examples/<script>`` with ``args`` in ``cwd``; its stdout (the test fails on a non-zero exit status)."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=600, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, (f"{script} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                                  f"--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout


def ground_states(stdout: str) -> dict[int, float]:
    """q → energy (eV) of the ground-state lines an example printed."""
    return {int(q): float(e) for q, _label, e in GROUND_STATE.findall(stdout)}


@pytest.fixture(scope="module")
def campaign_store(mongo_uri, tmp_path_factory):
    """Example 1 (--fast) run once into its own database of the session's MongoDB server: (URI, stdout, folder)."""
    uri = mongo_uri.rsplit("/", 1)[0] + "/df_examples"
    folder = tmp_path_factory.mktemp("examples")
    stdout = run_example("01_local_campaign.py", "--fast", "--store", uri, "--work-dir", str(folder / "local"),
                         cwd=folder)
    return uri, stdout, folder


def test_local_campaign_finds_a_verified_ground_state_for_every_charge(campaign_store):
    uri, stdout, _ = campaign_store
    assert re.search(r"campaign example-si-vacancy-fast: \d+ jobs in \d+ s, 0 failed", stdout), stdout
    energies = ground_states(stdout)
    assert set(energies) == CHARGES and all(math.isfinite(e) for e in energies.values()), stdout
    assert re.search(r"v_Si ε\(\+1/\+0\) = -?\d+\.\d+ eV", stdout), stdout
    with pymongo.MongoClient(uri) as client:  # the job documents are in the database named by --store
        verify = list(client.get_default_database()["outputs"].find({"metadata.step": "verify"}, ["metadata"]))
    assert {d["metadata"]["charge"] for d in verify} == CHARGES


def test_local_campaign_default_is_the_quickstart_campaign():
    """Example 1 says its default campaign is workflows/quickstart.yaml written in Python: the same settings, the
    same host cell (built in Python instead of read from Si.POSCAR)."""
    import numpy as np
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Structure

    from defectflow.campaign import Campaign

    sys.path.insert(0, str(EXAMPLES))
    try:
        example = importlib.import_module("01_local_campaign")
    finally:
        sys.path.remove(str(EXAMPLES))
    mine = example.build_campaign().model_dump(mode="json")
    quickstart = Campaign.from_yaml(ROOT / "workflows/quickstart.yaml").model_dump(mode="json")
    for data in (mine, quickstart):
        del data["name"], data["description"]
    cell = Structure.from_dict(mine["host"].pop("structure"))
    poscar = Structure.from_file(ROOT / "workflows" / quickstart["host"].pop("structure"))
    assert mine == quickstart
    assert np.allclose(cell.lattice.matrix, poscar.lattice.matrix) and StructureMatcher().fit(cell, poscar)


def test_fireworks_example_runs_the_campaign(campaign_store, mongo_uri):
    uri, local, folder = campaign_store
    launchpad = mongo_uri.rsplit("/", 1)[0] + "/fw_examples"
    stdout = run_example("03_fireworks.py", "--fast", "--store", uri, "--work-dir", str(folder / "fireworks"),
                         "--launchpad-uri", launchpad, "--reset-launchpad", "--run-here", cwd=folder)
    assert re.search(r"submitted example-si-vacancy-fast: \d+ Fireworks", stdout), stdout
    states = dict(re.findall(r"^  (\w+): (.+)$", stdout, re.MULTILINE))
    assert states["relax_lf"] == "4 COMPLETED" and states["verify"] == "2 COMPLETED", stdout
    assert all(s.endswith("COMPLETED") and "," not in s for s in states.values()), stdout
    assert ground_states(stdout) == ground_states(local)  # the same calculations, reused from the local run


def test_jobflow_remote_example_runs_the_lf_steps(campaign_store, tmp_path):
    uri, _, _ = campaign_store
    projects = tmp_path / "jfremote"
    projects.mkdir()
    stdout = run_example("02_jobflow_remote.py", "--fast", "--store", uri, "--work-dir", str(tmp_path / "work"),
                         "--project", "examples_test", "--create-project", "--steps", "lf", "--run-here",
                         cwd=tmp_path, env={"JFREMOTE_PROJECTS_FOLDER": str(projects)})
    assert (projects / "examples_test.yaml").is_file()
    assert "submitted example-si-vacancy-fast to jobflow-remote project examples_test (worker local)" in stdout
    states = dict(re.findall(r"^  (\w+): (.+)$", stdout, re.MULTILINE))
    assert states["relax_lf"] == "4 COMPLETED" and "train" not in states, stdout
    assert all(s.endswith("COMPLETED") and "," not in s for s in states.values()), stdout
    assert set(ground_states(stdout)) == CHARGES and stdout.count("(lf)") == len(CHARGES), stdout


def test_query_example_reads_the_same_energies_through_both_apis(campaign_store):
    uri, local, folder = campaign_store
    stdout = run_example("04_query_mongodb.py", "--fast", "--store", uri, cwd=folder)
    api = ground_states(stdout.split("pymongo:")[0])
    assert api == ground_states(local), stdout
    verify = re.findall(r"^    verify v_Si ([+-]\d+) round 0: E_HF = (-?\d+\.\d+) eV", stdout, re.MULTILINE)
    assert {int(q): float(e) for q, e in verify} == api, stdout
    assert "Results API and pymongo agree on 2 ground-state HF energies: yes" in stdout
    assert re.search(r"^    relax_lf\s+4\s+\d+", stdout, re.MULTILINE), stdout


def test_own_surrogate_example_gives_different_energies_at_two_charges(tmp_path):
    from ase.io import read

    from defectflow.campaign import MlipSpec
    from defectflow.train import TrainedModel

    out = tmp_path / "surrogate"
    stdout = run_example("05_train_own_surrogate.py", "--fast", "--out", str(out), cwd=tmp_path)
    for name, n in (("lf.xyz", 16), ("hf.xyz", 8)):
        frames = read(out / name, index=":")
        assert len(frames) == n and {a.info["total_charge"] for a in frames} == CHARGES
        assert all(isinstance(a.info["REF_energy"], float) and a.arrays["REF_forces"].shape == (15, 3)
                   for a in frames)
    model = TrainedModel.model_validate_json((out / "model.json").read_text())
    assert model.kind == MlipSpec().multi_fidelity and model.charge_embedding  # the default recipe
    energies = {int(q): (float(e), float(ref)) for q, e, ref in re.findall(
        r"^  q=([+-]\d+): E = (-?\d+\.\d+) eV, max \|F\| component = \d+\.\d+ eV/Å \(GFN2-xTB: (-?\d+\.\d+) eV\)",
        stdout, re.MULTILINE)}
    assert set(energies) == CHARGES, stdout
    (e0, ref0), (e1, ref1) = energies[0], energies[1]
    assert abs(e1 - e0) > 0.01, stdout  # the charge embedding at work: one geometry, two total charges
    assert abs(ref1 - ref0) > 1.0  # GFN2-xTB: removing an electron costs eV
