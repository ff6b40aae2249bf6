"""Steps 1-2 as a jobflow graph: generation (doped + ShakeNBreak), LF relaxations, summaries, harvest.

The end-to-end test runs for real with tblite GFN1-xTB on a 15-atom Si vacancy cell through jobflow's
run_locally into the embedded (sqlite) store. "A failed relaxation is recorded and the campaign goes on" is made
deterministic with a GFN1-xTB calculator that fails like an SCF failure for the strongly distorted q = -1 cells
(:data:`ANION_FAILS`, written to a temporary module), instead of relying on xTB losing convergence on this machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import GFN1, GFN2, si_vacancy_campaign
from jobflow import run_locally

from defectflow.campaign import Campaign
from defectflow.flows import DefectCampaignMaker
from defectflow.generate import bond_distortion_grid, generate
from defectflow.store import make_store


def small_campaign(work_dir, charges=(-1, 0), distortions=(-0.3, 0.3), dimer=False, **extra) -> Campaign:
    return Campaign.from_dict(si_vacancy_campaign(
        "si-small", work_dir, charges=list(charges),
        distortions={"bond_distortions": list(distortions), "dimer": dimer}, **extra))


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    return generate(small_campaign(tmp_path_factory.mktemp("gen"), charges=(-1, 0, 1), dimer=True))


def test_grid_matches_shakenbreak_default():
    grid = bond_distortion_grid(0.1)
    assert len(grid) == 13 and grid[0] == -0.6 and grid[-1] == 0.6 and grid.count(0.0) == 1


def test_generation_document(generation):
    assert generation.charges == {"v_Si": [-1, 0, 1]} and generation.charge_source == {"v_Si": "campaign"}
    assert len(generation.bulk_supercell) == 16
    assert [d.name for d in generation.distortion_sets] == ["v_Si_-1", "v_Si_0", "v_Si_+1"]
    for ds in generation.distortion_sets:
        labels = [s.label for s in ds.structures]
        assert labels == ["Unperturbed", "Bond_Distortion_-30.0%", "Bond_Distortion_30.0%", "Dimer"]
        assert all(s.structure.charge == ds.charge and len(s.structure) == 15 for s in ds.structures)
        assert ds.defect_type == "vacancy" and ds.defect_entry["@class"] == "DefectEntry"
    n0 = next(d for d in generation.distortion_sets if d.charge == 0).num_distorted_neighbours
    assert n0 == 4  # V_Si^0 with Si4+: four dangling-bond neighbours distorted
    # distorted structures really are distorted
    ds0 = generation.distortion_sets[1]
    unp, comp = ds0.structures[0].structure, ds0.structures[1].structure
    assert max(unp[i].distance(comp[i]) for i in ds0.distorted_atoms) > 0.2
    # JSON round trip (stored by jobflow)
    from defectflow.generate import GenerationResult

    again = GenerationResult.model_validate_json(generation.model_dump_json())
    assert again.distortion_sets[0].structures[1].structure == generation.distortion_sets[0].structures[1].structure


def test_doped_charge_guesses_are_used_when_auto(tmp_path):
    c = small_campaign(tmp_path)
    c.charges = "auto"
    g = generate(c)
    assert g.charge_source == {"v_Si": "doped"}
    assert g.charges["v_Si"] == sorted(g.charge_guessing_log["v_Si"]["guessed"])
    assert 0 in g.charges["v_Si"]


def test_unknown_defect_name_is_one_clear_error(tmp_path):
    from defectflow.campaign import CampaignError

    c = small_campaign(tmp_path)
    c.defects.include = ["v_Ge"]
    with pytest.raises(CampaignError, match="defects.include: doped generated no defect named 'v_Ge'; available: v_Si"):
        generate(c)


def test_graph_shape_and_names(generation, tmp_path):
    flow = DefectCampaignMaker(steps="lf").make(small_campaign(tmp_path, charges=(-1, 0, 1), dimer=True), generation)
    names = [j.name for j in flow.jobs]
    n_structures = sum(len(d.structures) for d in generation.distortion_sets)
    relax = [n for n in names if n.startswith("relax_lf ")]
    assert len(relax) == n_structures == 12
    assert len(flow.jobs) == n_structures + 4 + 3 + 1  # + generation, 2 bulk + reference, 3 summaries, harvest
    assert "relax_lf v_Si_-1 Bond_Distortion_-30.0%" in names and "summary v_Si_+1" in names
    assert {"generation", "bulk_lf", "bulk_hf", "bulk_reference", "harvest_lf"} <= set(names)
    # the charge reaches every relaxation job, and the right engine settings too
    for j in flow.jobs:
        if j.name.startswith("relax_lf v_Si_-1"):
            from defectflow.schemas import as_structure

            assert j.function_args[1] == -1 and as_structure(j.function_args[0]).charge == -1
            assert j.function_args[2]["kwargs"]["method"] == "GFN1-xTB"


def test_engine_setup_error_fails_at_build_time(generation, tmp_path):
    from defectflow.engines import EngineError

    c = small_campaign(tmp_path)
    c.fidelities.high = {"engine": "ase", "calculator": "no_such_module.Calc"}
    c = Campaign.from_dict(c.model_dump(mode="json"))
    with pytest.raises(EngineError, match="cannot import module 'no_such_module'"):
        DefectCampaignMaker(steps="lf").make(c, generation)


#: the shortest Si-Si distance below which the test calculator fails at q = -1: between the ideal vacancy cell's
#: 2.35 Å bonds (Unperturbed) and the 1.85 Å the ±30 % ShakeNBreak distortions (with their rattle) create
FAIL_BELOW = 2.1

ANION_FAILS = f'''
"""GFN1-xTB (tblite) that fails like an SCF failure for strongly distorted anion cells, deterministically."""
import numpy as np
from ase.calculators.calculator import CalculationFailed, all_changes
from tblite.ase import TBLite


class AnionFailsTBLite(TBLite):
    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        a = atoms if atoms is not None else self.atoms
        if self.parameters.get("charge") == -1:
            d = a.get_all_distances(mic=True)
            np.fill_diagonal(d, np.inf)
            if d.min() < {FAIL_BELOW}:
                raise CalculationFailed(f"SCF not converged (test calculator: q = -1, atoms {{d.min():.2f}} A apart)")
        return super().calculate(atoms, properties, system_changes)
'''


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    import sys

    pytest.importorskip("tblite")
    calc_dir = tmp_path_factory.mktemp("calculator")
    (calc_dir / "anion_fails.py").write_text(ANION_FAILS)
    sys.path.insert(0, str(calc_dir))
    work = tmp_path_factory.mktemp("run")
    low = {**GFN1, "calculator": "anion_fails.AnionFailsTBLite", "charge_kwarg": "charge",
           "spin_kwarg": "multiplicity"}
    campaign = small_campaign(work, fidelities={"low": low, "high": GFN2})
    try:
        flow = DefectCampaignMaker(steps="lf").make(campaign)
        store = make_store("embedded", work)
        responses = run_locally(flow, store=store, create_folders=True, root_dir=str(work / "jobs"), log=False)
    finally:
        sys.path.remove(str(calc_dir))
        sys.modules.pop("anion_fails", None)
    store.connect()
    return campaign, flow, store, responses


def test_end_to_end_run_records_everything(finished_run):
    _, flow, store, responses = finished_run
    assert len(responses) == len(flow.jobs)  # every job ran, failures included
    records = [d["output"] for d in store.query({"name": {"$regex": "^relax_lf "}}, load=True)]
    assert len(records) == 6
    assert {r["charge"] for r in records} == {-1, 0}
    for r in records:
        assert r["status"] in ("converged", "unconverged", "failed")
        assert r["engine"] == "ase" and r["fidelity"] == "low"
        if r["status"] != "failed":
            traj = r["trajectory"]
            assert len(traj["frames"]) == r["n_steps"] >= 1
            assert all(f["charge"] == r["charge"] for f in traj["frames"])
    neutral = [r for r in records if r["charge"] == 0]
    assert all(r["status"] != "failed" for r in neutral)


def test_failed_relaxation_is_recorded_and_flow_goes_on(finished_run):
    """Exactly the q = -1 starts the test calculator fails on (derived from their geometry) are recorded as failed,
    with the calculator's error; the other q = -1 start, the q = 0 ones, the summary and the harvest still ran."""
    import numpy as np

    from defectflow.schemas import as_structure

    _, flow, store, _ = finished_run
    expected = set()
    for j in flow.jobs:
        if j.name.startswith("relax_lf v_Si_-1 "):
            d = np.array(as_structure(j.function_args[0]).distance_matrix)
            np.fill_diagonal(d, np.inf)
            if d.min() < FAIL_BELOW:
                expected.add(j.metadata["distortion"])
    assert expected == {"Bond_Distortion_-30.0%", "Bond_Distortion_30.0%"}  # the distorted starts, not Unperturbed
    failed = [d["output"] for d in store.query({"name": {"$regex": "^relax_lf "}, "output.status": "failed"})]
    assert {(f["charge"], f["distortion"]) for f in failed} == {(-1, x) for x in expected}
    assert all(f["error"].startswith("CalculationFailed: SCF not converged") for f in failed)
    assert all(f["n_steps"] == 0 and f["energy"] is None for f in failed)
    summary = store.query_one({"name": "summary v_Si_-1"})["output"]
    assert summary["n_failed"] == len(failed)
    assert set(summary["errors"]) == expected
    assert summary["ground_state"] == "Unperturbed"  # the one q = -1 relaxation that ran
    harvest = store.query_one({"name": "harvest_lf"}, load=True)
    assert harvest is not None and -1 in harvest["output"]["charges"]  # downstream ran, with the q = -1 frames


def test_bulk_reference_has_both_fidelities(finished_run):
    _, _, store, _ = finished_run
    ref = store.query_one({"name": "bulk_reference"})["output"]
    assert ref["natoms"] == 16 and not ref["errors"]
    # GFN1 and GFN2 are different methods: the two reference energies must differ
    assert ref["energy_lf"] != pytest.approx(ref["energy_hf"], abs=1e-3)


def test_summary_follows_shakenbreak(finished_run):
    _, _, store, _ = finished_run
    s = store.query_one({"name": "summary v_Si_0"})["output"]
    e = s["energies"]
    assert s["ground_state"] == min(e, key=e.get)
    assert s["energy_lowering"] == pytest.approx(min(e.values()) - e["Unperturbed"])
    assert s["energy_lowering_found"] == (s["energy_lowering"] < -0.05)
    assert s["plot"] and Path(s["plot"]).stat().st_size > 10_000


def test_harvested_extxyz_is_readable_by_mace(finished_run, tmp_path):
    from mace.data.utils import KeySpecification, load_from_xyz

    _, _, store, _ = finished_run
    ts = store.query_one({"name": "harvest_lf"}, load=True)["output"]
    assert ts["n_frames"] >= 4 and ts["n_frames"] <= ts["n_candidates"]
    assert sum(ts["dropped"].values()) == ts["n_candidates"] - ts["n_frames"]
    path = tmp_path / "lf.xyz"
    path.write_text(ts["extxyz"])
    keys = KeySpecification(info_keys={"energy": "REF_energy", "stress": "REF_stress", "total_charge": "total_charge",
                                       "head": "head"}, arrays_keys={"forces": "REF_forces"})
    _, configs = load_from_xyz(str(path), key_specification=keys, head_name="lf")
    assert len(configs) == ts["n_frames"]
    charges = sorted({int(c.properties["total_charge"]) for c in configs})
    assert charges == ts["charges"] and 0 in charges
    assert all(c.properties["forces"].shape == (15, 3) for c in configs)
    assert all(c.head == "lf" for c in configs)


def test_harvest_filter_drops_duplicates_and_outliers():
    from pymatgen.core import Lattice, Structure

    from defectflow.relax import HarvestFilter, RelaxRecord, _filter
    from defectflow.schemas import Frame, RelaxTrajectory

    s = Structure(Lattice.cubic(5), ["Si", "Si"], [[0, 0, 0], [0.5, 0.5, 0.5]])

    def frame(e, fmax=0.1, step=0, shift=0.0, suspect=False):
        st = s.copy()
        st.translate_sites([1], [shift, 0, 0], frac_coords=False)
        return Frame(structure=st, energy=e, forces=[[fmax, 0, 0], [0, 0, 0]], charge=0, engine="ase",
                     settings_digest="x", step=step, forces_suspect=suspect)

    frames = [frame(-10.0), frame(-10.0001, step=1, shift=0.001),  # near-duplicate of step 0
              frame(-10.5, step=2, shift=0.3), frame(-9.0, fmax=50.0, step=3, shift=0.4),  # huge force
              frame(-10.55, step=4, shift=0.5, suspect=True),  # forces the engine flagged
              frame(-10.6, step=5, shift=0.35)]
    rec = RelaxRecord(defect="v", charge=0, distortion="d", status="converged", engine="ase", fidelity="low",
                      settings_digest="x", trajectory=RelaxTrajectory(frames=frames, status="converged", charge=0,
                                                                       engine="ase", settings_digest="x",
                                                                       fmax_target=0.1))
    kept, dropped, n = _filter([rec], HarvestFilter())
    assert n == 6
    assert [f.step for f, _ in kept] == [0, 2, 5]
    assert dropped["near_duplicate"] == 1 and dropped["max_force"] == 1 and dropped["forces_suspect"] == 1
