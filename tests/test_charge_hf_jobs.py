"""The total charge reaches the high-fidelity jobs, not only the LF relaxations: ``label_hf``'s ``single_hf`` jobs
and the verification, run as jobflow jobs at q = ±1 with Quantum ESPRESSO (pw.in's ``tot_charge`` and ``nspin``, the
stored energy = pw.out's) and with tblite (the stored energy = a single point at q, which differs at −q).

Small and quick: the 7-atom Si vacancy cell (28 valence electrons: q = ±1 is an odd count, spin-polarised), pw.x
Γ only at 15 Ry on 2 MPI ranks, GFN1/GFN2-xTB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import GFN1, GFN2, have, si_vac15, si_vacancy
from jobflow import run_locally
from pymatgen.core import Structure

from defectflow.engines import get_engine
from defectflow.engines.qe import RY_IN_EV
from defectflow.schemas import Frame, Minimum, SearchResult, SelectedFrame, Selection
from defectflow.store import make_store

PSEUDO = Path("/usr/share/espresso/pseudo")
QE = {"engine": "qe", "xc": "PBE", "ecutwfc": 15.0, "pseudo_dir": str(PSEUDO),
      "pseudopotentials": {"Si": "Si.pbe-rrkj.UPF"}, "mpi_procs": 2}
needs_qe = pytest.mark.skipif(not (have("pw.x") and have("mpirun") and (PSEUDO / "Si.pbe-rrkj.UPF").is_file()),
                              reason="pw.x / mpirun / Debian quantum-espresso-data not installed")


def _run(job, root: Path):
    store = make_store("embedded", root)
    run_locally(job, store=store, create_folders=True, root_dir=str(root / "jobs"), log=False, ensure_success=True)
    store.connect()
    return store


def _pw(folder: Path) -> dict:
    """tot_charge and nspin from pw.in, the final total energy (eV) from pw.out."""
    values = {}
    for ln in (folder / "pw.in").read_text().splitlines():
        key, _, value = ln.partition("=")
        if key.strip() in ("tot_charge", "nspin"):
            values[key.strip()] = float(value.strip().rstrip(","))
    totals = [ln for ln in (folder / "pw.out").read_text().splitlines() if ln.startswith("!")]
    values["energy"] = float(totals[-1].split("=")[1].split()[0]) * RY_IN_EV
    return values


def _selection(structure, charges) -> Selection:
    """The same geometry selected at each charge in ``charges``, as the selection step hands it to label_hf (the LF
    labels are placeholders: only the structure and q reach the HF jobs)."""
    chosen = []
    for i, q in enumerate(charges):
        at_q = Structure(structure.lattice, structure.species, structure.frac_coords, charge=q)
        frame = Frame(structure=at_q, energy=0.0, forces=np.zeros((len(structure), 3)).tolist(), charge=q,
                      engine="ase", xc="placeholder", fidelity="low", settings_digest="placeholder")
        chosen.append(SelectedFrame(defect="v_Si", charge=q, distortion="test", relax_status="converged", step=i,
                                    is_final=True, frame=frame, reason="test", order=i))
    return Selection(strategy="test", seed=0, budget=len(chosen), n_candidates=len(chosen), n_chosen=len(chosen),
                     per_group={}, per_group_candidates={}, chosen=chosen)


@pytest.mark.parametrize("engine", [pytest.param("qe", marks=[pytest.mark.dft, needs_qe]), "tblite"])
def test_single_hf_jobs_run_at_the_selected_charge(tmp_path, engine):
    from defectflow.label import label_selected

    if engine == "tblite":
        pytest.importorskip("tblite")
    # QE: the ideal 7-atom cell at q = ∓1 (odd electron counts; pw.x's SCF at q = −1 does not converge in 100
    # iterations once the cell is rattled); GFN2-xTB: the 15-atom cell at q = 0, +1 (where it converges)
    high = QE if engine == "qe" else GFN2
    structure = si_vacancy() if engine == "qe" else si_vac15()
    charges = (-1, 1) if engine == "qe" else (0, 1)
    store = _run(label_selected(_selection(structure, charges), high, "high"), tmp_path)
    docs = {d["metadata"]["charge"]: d["output"]
            for d in store.query({"name": {"$regex": "^single_hf "}}, properties=["metadata", "output"])}
    assert sorted(docs) == list(charges)
    hf = get_engine(high, fidelity="high")
    for i, q in enumerate(charges):
        f = Frame.model_validate(docs[q])
        assert f.charge == q and f.structure.charge == q and f.engine == hf.name and f.settings_digest == hf.digest
        assert f.error is None and f.energy is not None
        if engine == "qe":
            (folder,) = (tmp_path / "jobs").glob(f"*/v_Si_{q:+d}_test_step{i}")
            pw = _pw(folder)
            assert pw["tot_charge"] == q and pw["nspin"] == 2  # 28 − q electrons: odd, spin-polarised
            assert f.energy == pytest.approx(pw["energy"], abs=1e-4)
        else:
            assert f.energy == pytest.approx(hf.single_point(structure, q).energy, abs=1e-6)
    # same geometry, different numbers of electrons: energies far apart
    assert abs(docs[charges[1]]["energy"] - docs[charges[0]]["energy"]) > 1.0
    collect = store.query_one({"name": "collect_hf"}, load=True)["output"]
    assert collect["n_labelled"] == 2 and sorted(f["charge"] for f in collect["frames"]) == list(charges)


@needs_qe
@pytest.mark.dft
def test_verification_runs_hf_and_lf_at_the_searched_charge(tmp_path):
    """verify at q = +1 with a threshold no surrogate meets: the QE single point (pw.in tot_charge = 1) and the LF
    single point a Δ-learning top-up needs (GFN1-xTB at q = +1) are both at the search's charge."""
    from defectflow.campaign import VerifySpec
    from defectflow.search.jobs import verify_minima

    pytest.importorskip("tblite")
    q = 1
    gs = si_vacancy(rattle=0.03, seed=2)
    search = SearchResult(defect="v_Si", charge=q, model="test", n_starts=1, landscape={"start": 0.0},
                          minima=[Minimum(energy=0.0, structure=gs, labels=["start"])],
                          ground_state=Minimum(energy=0.0, structure=gs, labels=["start"]), ground_state_label="start")
    job = verify_minima(search, QE, GFN1, VerifySpec(energy_threshold=1e-6), need_lf=True)  # Δ-learning's LF point
    store = _run(job, tmp_path)
    gv = store.query_one({"uuid": job.uuid}, load=True)["output"]
    assert len(gv["checks"]) == 1 and gv["ground_state"]["role"] == "rank 1"
    v = gv["checks"][0]
    (folder,) = (tmp_path / "jobs").glob(f"*/v_Si_{q:+d}_verify_0")
    pw = _pw(folder)
    assert pw["tot_charge"] == q and pw["nspin"] == 2
    assert v["charge"] == q and v["hf_frame"]["charge"] == q and v["hf_frame"]["engine"] == "qe"
    assert v["hf_energy"] == pytest.approx(pw["energy"], abs=1e-4)
    assert np.allclose(Frame.model_validate(v["hf_frame"]).structure.cart_coords, gs.cart_coords)
    assert v["agrees"] is False and v["lf_frame"]["charge"] == q
    lf = get_engine(GFN1, fidelity="low")
    assert v["lf_frame"]["energy"] == pytest.approx(lf.single_point(gs, q).energy, abs=1e-6)
    assert abs(v["lf_frame"]["energy"] - lf.single_point(gs, -q).energy) > 1.0
