"""The README's main path in one campaign: GFN1-xTB (LF) → Quantum ESPRESSO PBE (HF), through
:func:`defectflow.submit.run_campaign`, end to end: generation, xTB relaxations, selection, QE single points, a tiny
charge-embedded MACE, surrogate search, QE verification of each surrogate minimum, doped CTLs.

Small enough for CI: the 15-atom Si vacancy cell at q = 0, +1 (q = +1: odd electron count, nspin = 2 in QE), three
ShakeNBreak starts per charge, pw.x Γ only at 15 Ry with Debian's Si.pbe-rrkj.UPF on 2 MPI ranks. Every check ties
a stored number to the QE run that made it: the pw.in / pw.out of the job's folder (charge, positions, energy).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MLIP, have, si_vacancy_campaign

from defectflow.campaign import Campaign
from defectflow.engines import get_engine
from defectflow.levels import with_potentials
from defectflow.engines.qe import RY_IN_EV
from defectflow.results import Results
from defectflow.submit import run_campaign

PSEUDO = Path("/usr/share/espresso/pseudo")
QE = {"engine": "qe", "xc": "PBE", "ecutwfc": 15.0, "pseudo_dir": str(PSEUDO),
      "pseudopotentials": {"Si": "Si.pbe-rrkj.UPF"}, "mpi_procs": 2}
CHARGES = (0, 1)
NATOMS = 15  # 16-site supercell, one vacancy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.dft,
    pytest.mark.skipif(not have("pw.x") or not have("mpirun"), reason="pw.x / mpirun not installed "
                       "(Debian: quantum-espresso, openmpi-bin)"),
    pytest.mark.skipif(not (PSEUDO / "Si.pbe-rrkj.UPF").is_file(),
                       reason="Debian quantum-espresso-data not installed"),
]


@pytest.fixture(scope="module")
def qe_run(tmp_path_factory):
    pytest.importorskip("tblite")
    pytest.importorskip("mace")
    work = tmp_path_factory.mktemp("campaign_qe")
    campaign = Campaign.from_dict(si_vacancy_campaign(
        "campaign-qe", work,
        charges=list(CHARGES),
        fidelities={"low": {"engine": "ase", "calculator": "tblite.ase.TBLite", "xc": "GFN1-xTB",
                            "kwargs": {"method": "GFN1-xTB", "verbosity": 0}},
                    "high": QE},
        relax={"fmax": 0.3, "max_steps": 4},
        selection={"strategy": "minima", "budget": 4},
        mlip=TINY_MLIP,
        search={"extra_starts": 1, "fmax": 0.1, "max_steps": 60},
        verify={"max_rounds": 0, "top_k": 1, "uncertain_window": 0},
        levels={"dielectric": 11.7},
    ))
    t0 = time.perf_counter()
    run = run_campaign(campaign)
    print(f"\nQE campaign: {run.n_jobs} jobs in {time.perf_counter() - t0:.0f} s")
    return campaign, run, Results.for_campaign(campaign, run=run.flow_uuid)


def _structure(d):
    from defectflow.schemas import as_structure

    return as_structure(d)


def _pw_runs(work: Path, pattern: str) -> list[dict]:
    """Every pw.x run in job folders matching ``pattern``: tot_charge and positions from pw.in, energy from pw.out."""
    import ase.io

    out = []
    for pw_in in sorted((work / "jobs").glob(f"*/{pattern}/pw.in")):
        text = pw_in.read_text()
        tot = [float(ln.split("=")[1].strip().rstrip(",")) for ln in text.splitlines()
               if ln.strip().startswith("tot_charge")]
        atoms = ase.io.read(pw_in, format="espresso-in")
        totals = [ln for ln in (pw_in.parent / "pw.out").read_text().splitlines() if ln.startswith("!")]
        out.append({"dir": pw_in.parent, "tot_charge": tot, "positions": atoms.positions, "cell": atoms.cell.array,
                    "energy": float(totals[-1].split("=")[1].split()[0]) * RY_IN_EV if totals else None})
    return out


def _matching_run(runs: list[dict], structure) -> dict:
    """The one pw.x run whose cell and positions are ``structure``'s."""
    hits = [r for r in runs if np.allclose(r["cell"], structure.lattice.matrix, atol=1e-6)
            and np.allclose(r["positions"], structure.cart_coords, atol=1e-5)]
    assert len(hits) == 1, f"{len(hits)} pw.x runs have this structure"
    return hits[0]


def test_every_job_finished_with_a_result(qe_run):
    _, run, res = qe_run
    assert not run.failed_jobs and not run.failures, run.failures
    assert run.result is not None and run.result.levels is not None, run.result and run.result.levels_error
    steps = {row["step"]: row for row in res.cost()}
    for step in ("generation", "bulk_lf", "bulk_hf", "relax_lf", "summary", "harvest_lf", "select", "single_hf",
                 "collect_hf", "train", "search", "verify", "finalize"):
        assert steps.get(step, {}).get("jobs", 0) >= 1, step
    assert steps["relax_lf"]["jobs"] == 3 * len(CHARGES)  # Unperturbed, ±30 %
    relax = [d["output"] for d in res.query(step="relax_lf")]
    assert all(r["status"] != "failed" for r in relax)


def test_hf_single_points_are_qe_runs_at_the_right_charge(qe_run):
    """Every single_hf Frame: engine 'qe', PBE, the campaign's QE settings digest, and the energy and charge of a
    real pw.x run in its job folder (pw.out's total energy; pw.in's tot_charge and positions)."""
    campaign, _, res = qe_run
    qe_digest = get_engine(QE).digest
    frames = res.query(step="single_hf", load=True)
    assert 2 <= len(frames) <= 4 and {d["metadata"]["charge"] for d in frames} == set(CHARGES)
    runs = _pw_runs(campaign.work_dir(), "v_Si_*_step*")
    assert len(runs) == len(frames)  # one pw.x run per HF single point, nothing else in those folders
    for doc in frames:
        f, q = doc["output"], doc["metadata"]["charge"]
        assert f["engine"] == "qe" and f["xc"] == "PBE" and f["fidelity"] == "high"
        assert f["settings_digest"] == qe_digest and f["scf_converged"] and f["error"] is None
        structure = _structure(f["structure"])
        assert f["charge"] == q and structure.charge == q and len(structure) == NATOMS
        pw = _matching_run(runs, structure)
        assert pw["tot_charge"] == [float(q)]  # the charge reached pw.x
        assert f["energy"] == pytest.approx(pw["energy"], abs=1e-4)  # and the stored energy is pw.x's
        assert np.asarray(f["forces"]).shape == (NATOMS, 3)
        assert (pw["dir"] / "pw.out").read_text().count("JOB DONE") == 1


def test_hf_energies_are_on_qe_scale_not_xtb(qe_run):
    """The defect cells' QE energy per atom is within a vacancy's worth of QE's bulk energy per atom, and far from
    the xTB scale: the HF head was trained on QE numbers. Bounds derived from the run's own bulk references."""
    _, _, res = qe_run
    bulk = res.query(step="bulk_reference")[0]["output"]
    e_hf, e_lf = bulk["energy_hf"] / bulk["natoms"], bulk["energy_lf"] / bulk["natoms"]
    assert math.isfinite(e_hf) and abs(e_hf - e_lf) > 5.0  # two codes, two energy zeros
    bulk_frame = res.query(step="bulk_hf")[0]["output"]
    assert bulk_frame["engine"] == "qe" and bulk_frame["vbm"] < bulk_frame["cbm"]
    for d in res.query(step="single_hf"):
        per_atom = d["output"]["energy"] / NATOMS
        # a vacancy costs a few eV per cell: < 1 eV per atom away from bulk, in QE's zero and not xTB's
        assert abs(per_atom - e_hf) < 1.0 and abs(per_atom - e_lf) > abs(e_hf - e_lf) - 1.0


def test_verification_is_qe_at_the_surrogate_minimum(qe_run):
    """Each verify job ran pw.x at q on exactly the structure its search returned as the lowest minimum (top_k 1),
    and the verified HF energy is that run's energy; the ground state is the lowest HF energy it knows (a known HF
    frame gets a pw.x run of its own)."""
    campaign, run, res = qe_run
    runs = _pw_runs(campaign.work_dir(), "v_Si_*_verify_*")
    for g in run.result.ground_states:
        (search,) = res.query(step="search", defect=g.defect, charge=g.charge, load=True)
        (verify,) = res.query(step="verify", defect=g.defect, charge=g.charge, load=True)
        gs = _structure(search["output"]["ground_state"]["structure"])
        checks = verify["output"]["checks"]
        v = checks[0]
        assert v["role"] == "rank 1" and v["charge"] == g.charge and v["hf_frame"]["charge"] == g.charge
        # the HF engine, with pp.x's potential switched on for the finite-size correction (levels.with_potentials)
        hf_settings = with_potentials(QE, campaign.levels.correction)
        assert v["hf_frame"]["engine"] == "qe" and v["hf_frame"]["settings_digest"] == get_engine(hf_settings).digest
        assert np.allclose(_structure(v["structure"]).cart_coords, gs.cart_coords, atol=1e-8)
        pw = _matching_run(runs, gs)
        assert pw["dir"].name == f"{g.defect}_{g.charge:+d}_verify_0"
        assert pw["tot_charge"] == [float(g.charge)]
        assert v["hf_energy"] == pytest.approx(pw["energy"], abs=1e-4)
        assert v["surrogate_energy"] == pytest.approx(search["output"]["ground_state"]["energy"])
        assert v["error_mev_per_atom"] == pytest.approx(1000 * abs(v["hf_energy"] - v["surrogate_energy"]) / NATOMS)
        assert g.hf_energy == pytest.approx(min(c["hf_energy"] for c in checks if c["hf_energy"] is not None))
        if g.source == "known HF frame":  # an HF training frame below the surrogate's minimum, run again here
            assert g.reason and len(checks) == 2 and checks[1]["role"] == "known HF frame"
            assert _matching_run(runs, g.structure)["dir"].name == f"{g.defect}_{g.charge:+d}_verify_known"
        else:
            assert len(checks) == 1 and np.allclose(g.structure.cart_coords, gs.cart_coords, atol=1e-8)
            assert g.verification_error_mev_per_atom == pytest.approx(v["error_mev_per_atom"])


def test_ctls_from_qe_energies(qe_run):
    """Formation energies at E_F = VBM recomputed by hand from the QE energies (μ_Si = QE bulk energy per atom,
    q·E_VBM with QE's bulk VBM, the finite-size correction: eFNV from pp.x's potentials, which ``auto`` picks for
    QE), and ε(+1/0) = E_f(0) − E_f(+1)."""
    _, run, res = qe_run
    lv = run.result.levels
    bulk = res.query(step="bulk_reference")[0]["output"]
    assert lv.vbm == pytest.approx(bulk["vbm"]) and lv.band_gap == pytest.approx(bulk["band_gap"])
    assert 0 < lv.band_gap < 2.0  # Γ-only PBE Si, a gapped host
    mu = bulk["energy_hf"] / bulk["natoms"]
    ef = {}
    for g in run.result.ground_states:
        key = f"{g.defect} {g.charge:+d}"
        ef[g.charge] = g.hf_energy - bulk["energy_hf"] + mu + g.charge * lv.vbm + lv.corrections[key]
        assert lv.formation_energies_vbm[key] == pytest.approx(ef[g.charge], abs=1e-6)
    assert lv.correction_scheme == "efnv" and "eFNV" in lv.correction_reason
    assert lv.corrections["v_Si +1"] != 0 and lv.corrections["v_Si +0"] == 0
    level = ef[0] - ef[1]
    if -1.0 <= level <= lv.band_gap + 1.0:  # doped reports levels in [VBM − 1 eV, CBM + 1 eV]
        (t,) = lv.transition_levels
        assert (t.q_from, t.q_to) == (1, 0) and t.level == pytest.approx(level, abs=1e-6)
        assert t.in_gap == (0.0 <= level <= lv.band_gap)
    else:
        assert lv.transition_levels == []
    assert Path(lv.plot).stat().st_size > 10_000


def test_surrogate_was_trained_on_the_qe_frames(qe_run):
    """The HF head's training data are the QE single points (collect_hf's extxyz energies = the Frames')."""
    from defectflow.train.data import read_frames

    _, _, res = qe_run
    (collect,) = res.query(step="collect_hf", load=True)
    hf = read_frames(collect["output"]["extxyz"])
    singles = sorted(d["output"]["energy"] for d in res.query(step="single_hf"))
    assert sorted(a.info["REF_energy"] for a in hf) == pytest.approx(singles, abs=1e-8)
    assert {int(a.info["total_charge"]) for a in hf} == set(CHARGES)
    (train,) = res.query(step="train")
    assert train["output"]["n_hf_frames"] == len(singles)
