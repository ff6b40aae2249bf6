"""Training step, for real: tblite GFN1-xTB (LF) and GFN2-xTB (HF) labels on rattled 15-atom Si vacancy cells at
q = 0 and +1, a tiny MACE trained with mace_run_train (multi-head + charge embedding, delta, ablations).

Every geometry is labelled at both q = 0 and q = +1, so a model that ignores the charge cannot tell the pairs apart:
that is what the charge-embedding assertions rely on. (q = −1 is left out: GFN2 loses SCF convergence for rattled
cells of this size.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import GFN1, GFN2, si_vac15

pytest.importorskip("tblite")
pytest.importorskip("mace")

from defectflow.campaign import MlipSpec  # noqa: E402
from defectflow.engines import get_engine  # noqa: E402
from defectflow.train import (  # noqa: E402
    DeltaCalculator,
    TrainedModel,
    TrainingError,
    attach_lf_labels,
    evaluate,
    load_calculator,
    split_frames,
    train_models,
    train_surrogate,
)
from defectflow.train.data import (
    frames_to_extxyz,  # noqa: E402
    frames_to_text,  # noqa: E402
    read_frames,  # noqa: E402
)

ROOT = Path(__file__).resolve().parents[1]
# A tiny model in float64 (exact sums to 1e-9 below), without EMA and with the plain-loss settings these tests
# were written against; each test names the multi-fidelity kind it is about (the library default is finetune).
TINY = dict(hidden_irreps="8x0e", max_L=0, num_interactions=2, correlation=2, r_max=4.0, max_epochs=6,
            batch_size=4, lr=0.01, device="cpu", seed=1, default_dtype="float64", ema_decay=None,
            energy_weight=1.0, scheduler_patience=50)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores shared with other work: tiny models are fastest on one thread
    yield
    torch.set_num_threads(old)



@pytest.fixture(scope="module")
def dataset():
    """LF: 12 geometries × q ∈ {0, +1} (GFN1); HF: every other geometry × both q (GFN2). extxyz texts."""
    lf_engine, hf_engine = get_engine(GFN1, fidelity="low"), get_engine(GFN2, fidelity="high")
    lf, hf = [], []
    for i in range(12):
        s = si_vac15(0.05, 100 + i)
        for q in (0, 1):
            f = lf_engine.single_point(s, q)
            if f.energy is None or not f.scf_converged:
                continue
            meta = {"defect": "v_Si", "distortion": f"rattle{i}"}
            lf.append((f, meta))
            if i % 2 == 0:
                h = hf_engine.single_point(s, q)
                if h.energy is not None and h.scf_converged:
                    hf.append((h, meta))
    assert len(lf) >= 20 and len(hf) >= 8, (len(lf), len(hf))
    return frames_to_extxyz(lf, "lf"), frames_to_extxyz(hf, "hf")


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    lf, hf = dataset
    work = tmp_path_factory.mktemp("train")
    spec = MlipSpec(**TINY, multi_fidelity="multihead", embedding_readout=True,
                   ablations=["no_charge", "hf_only", "lf_only"])
    return train_models(lf, hf, spec, work / "run", plot_dir=work / "plots"), work


@pytest.fixture(scope="module")
def delta(dataset, tmp_path_factory):
    lf, hf = dataset
    spec = MlipSpec(**TINY, multi_fidelity="delta", embedding_readout=True)
    return train_surrogate(lf, hf, spec, tmp_path_factory.mktemp("delta"))


def same_geometry(q: int):
    from defectflow.engines.base import structure_to_atoms

    return structure_to_atoms(si_vac15(0.05, 999), q)  # sets atoms.info["charge"] = q


def energy(calc, q: int) -> float:
    atoms = same_geometry(q)
    atoms.calc = calc
    return atoms.get_potential_energy()


# ---------------------------------------------------------------------------------------------------------------
def test_split_is_deterministic_and_holds_out_hf_frames():
    from ase import Atoms

    def frames(n):
        return [Atoms("Si", info={"total_charge": i % 2, "REF_energy": 0.0}) for i in range(n)]

    a = split_frames(frames(20), frames(10), 0.2, 0.1, seed=1).as_dict()
    assert a == split_frames(frames(20), frames(10), 0.2, 0.1, seed=1).as_dict()
    assert a != split_frames(frames(20), frames(10), 0.2, 0.1, seed=2).as_dict()
    assert len(a["hf_test"]) == 2 and {i % 2 for i in a["hf_test"]} == {0, 1}  # both charges tested
    assert sorted(a["hf_test"] + a["hf_valid"] + a["hf_train"]) == list(range(10))
    assert sorted(a["lf_valid"] + a["lf_train"]) == list(range(20)) and len(a["lf_valid"]) == 2
    assert len(split_frames(frames(5), frames(3), 0.01, 0.1, 0).hf_test) == 1  # ≥ 1 test frame from 3 HF
    assert split_frames(frames(5), frames(2), 0.5, 0.1, 0).hf_test == []


def test_inconsistent_max_L_is_refused(dataset, tmp_path):
    spec = MlipSpec(**{**TINY, "max_L": 1})
    with pytest.raises(ValueError, match="mlip.max_L: 1 does not match mlip.hidden_irreps '8x0e'"):
        train_surrogate(*dataset, spec, tmp_path)


def test_a_frame_without_total_charge_is_refused_not_trained_as_neutral(dataset, tmp_path):
    hf = read_frames(dataset[1])
    del hf[2].info["total_charge"]  # mace-torch would read it as q = 0
    with pytest.raises(ValueError, match=r"frame 2: extxyz lacks the total charge 'total_charge' \(info\): expected"):
        train_surrogate(dataset[0], frames_to_text(hf), MlipSpec(**TINY), tmp_path)
    assert not list(tmp_path.glob("**/*.model"))  # refused before mace ran


def test_mace_failure_raises_with_log_tail(dataset, tmp_path):
    spec = MlipSpec(**TINY, extra_args={"no_such_option": 1})
    with pytest.raises(TrainingError) as err:
        train_surrogate(*dataset, spec, tmp_path)
    msg = str(err.value)
    assert "exit status 2" in msg and "unrecognized arguments: --no_such_option" in msg
    assert "command: " in msg and "mace_run_train" in msg


def test_training_document(trained):
    result, _ = trained
    main = result.main
    assert main.kind == "multihead" and main.heads == ["lf", "hf"] and main.charge_embedding
    (run,) = main.components
    assert run.epochs == TINY["max_epochs"] and run.seconds_per_epoch > 0
    for flag in ("--heads", "--embedding_specs", "--total_charge_key total_charge", "--use_embedding_readout True",
                 "--default_dtype float64", "--hidden_irreps 8x0e", "--max_num_epochs 6", "--seed 1"):
        assert flag in run.command, flag
    # E0s 'average' fitted per head: GFN1 and GFN2 have different per-atom reference energies
    assert set(run.e0s) == {"lf", "hf"} and abs(run.e0s["lf"]["14"] - run.e0s["hf"]["14"]) > 0.5
    assert len(main.model_bytes()) > 10_000 and main.model_bytes()[:2] == b"PK"  # torch.save zip archive
    # held-out HF frames never reach the training files
    hf_train = read_frames(Path(run.workdir) / "hf_train.xyz") + read_frames(Path(run.workdir) / "hf_valid.xyz")
    test_idx = set(main.split["hf_test"])
    assert test_idx and not test_idx & {a.info["source_index"] for a in hf_train}
    assert run.n_train["hf"] + run.n_valid["hf"] + len(test_idx) == result.n_hf_frames
    no_charge = result.models["no_charge"].components[0].command
    assert "--embedding_specs" not in no_charge and "--total_charge_key" not in no_charge


def test_charge_embedding_changes_energy_and_ablation_does_not(trained):
    result, _ = trained
    calc = load_calculator(result.main, "hf")
    e0, e1 = energy(calc, 0), energy(calc, 1)
    assert abs(e1 - e0) > 1e-2  # same geometry, same calculator object: only q changed
    flat = load_calculator(result.models["no_charge"], "hf")
    assert energy(flat, 0) == pytest.approx(energy(flat, 1), abs=1e-10)


def test_hf_head_differs_from_lf_head(trained):
    result, _ = trained
    hf, lf = load_calculator(result.main, "hf"), load_calculator(result.main, "lf")
    a, b = same_geometry(0), same_geometry(0)
    a.calc, b.calc = hf, lf
    assert abs(a.get_potential_energy() - b.get_potential_energy()) > 1.0  # different E0s and readouts
    assert np.abs(a.get_forces() - b.get_forces()).max() > 1e-4  # forces: readouts differ, not just E0
    with pytest.raises(ValueError, match="has no head 'lf'; available: hf"):
        load_calculator(result.models["hf_only"], "lf")


def test_model_bytes_load_identically_in_a_fresh_process(trained, tmp_path):
    result, _ = trained
    main = result.main
    doc = tmp_path / "model.json"
    doc.write_text(main.model_dump_json())
    raw = tmp_path / "raw.model"
    raw.write_bytes(main.model_bytes())
    frames = read_frames(main.hf_test_extxyz)
    calc = load_calculator(main, "hf")
    ref = []
    for a in frames:
        a = a.copy()
        a.info["charge"] = int(a.info["total_charge"])
        a.calc = calc
        ref.append([a.get_potential_energy(), a.get_forces().tolist()])
    (tmp_path / "test.xyz").write_text(main.hf_test_extxyz)
    code = f"""
import json
from mace.calculators import MACECalculator
from defectflow.train import TrainedModel, load_calculator
from defectflow.train.data import read_frames
m = TrainedModel.model_validate_json(open({str(doc)!r}).read())
calcs = [load_calculator(m, "hf"),
         MACECalculator(model_paths={str(raw)!r}, head="hf", default_dtype="float64", device="cpu")]
out = []
for calc in calcs:
    rows = []
    for a in read_frames({str(tmp_path / 'test.xyz')!r}):
        a.info["charge"] = int(a.info["total_charge"])
        a.calc = calc
        rows.append([a.get_potential_energy(), a.get_forces().tolist()])
    out.append(rows)
print("RESULT" + json.dumps(out))
"""
    env = {**os.environ, "DEFECTFLOW_MODEL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert list((tmp_path / "cache").glob("*.model"))  # the fresh process wrote the bytes itself
    for rows in out:
        for (e, f), (e_ref, f_ref) in zip(rows, ref, strict=True):
            assert e == pytest.approx(e_ref, abs=1e-9)
            np.testing.assert_allclose(f, f_ref, atol=1e-9)


def _independent_errors(calc, frames):
    """RMSE/MAE in meV/atom and meV/Å, overall and per q, computed here from plain ASE predictions."""
    rows = []
    for a in frames:
        b = a.copy()
        b.info["charge"] = int(a.info["total_charge"])
        b.calc = calc
        rows.append((int(a.info["total_charge"]), (b.get_potential_energy() - a.info["REF_energy"]) / len(a),
                     (b.get_forces() - a.arrays["REF_forces"]).ravel()))

    def stats(sel):
        de = np.array([r[1] for r in sel]) * 1000
        df = np.concatenate([r[2] for r in sel]) * 1000
        return (np.sqrt(np.mean(de**2)), np.mean(np.abs(de)), np.sqrt(np.mean(df**2)), np.mean(np.abs(df)))

    out = {"all": stats(rows)}
    for q in {r[0] for r in rows}:
        out[f"+{q}" if q > 0 else str(q)] = stats([r for r in rows if r[0] == q])
    return out


def _as_tuple(s):
    return (s.energy_rmse, s.energy_mae, s.force_rmse, s.force_mae)


def test_metrics_match_independent_computation(trained):
    result, _ = trained
    main, m = result.main, result.metrics["main"]
    hf = read_frames(main.hf_test_extxyz)
    want = _independent_errors(load_calculator(main, "hf"), hf)
    assert set(m.hf_test.per_charge) == {"0", "+1"} == set(want) - {"all"}
    assert m.hf_test.overall.n_frames == len(hf) == len(main.split["hf_test"]) >= 2
    np.testing.assert_allclose(_as_tuple(m.hf_test.overall), want["all"], rtol=1e-9)
    for q, stats in m.hf_test.per_charge.items():
        np.testing.assert_allclose(_as_tuple(stats), want[q], rtol=1e-9)
    lf = read_frames(main.lf_valid_extxyz)
    want_lf = _independent_errors(load_calculator(main, "lf"), lf)
    np.testing.assert_allclose(_as_tuple(m.lf_valid.overall), want_lf["all"], rtol=1e-9)
    # evaluate() on explicit text gives the same numbers as the stored document
    again = evaluate(main, hf_test_extxyz=main.hf_test_extxyz)
    assert again.hf_test.overall == m.hf_test.overall


def test_ablations_side_by_side(trained):
    result, _ = trained
    rows = {r.model: r for r in result.comparison}
    assert list(rows) == ["main", "no_charge", "hf_only", "lf_only"]
    assert rows["hf_only"].lf_valid_energy_rmse is None and rows["hf_only"].hf_test_energy_rmse is not None
    assert result.models["lf_only"].prediction_head == "lf"
    # The LF head predicts HF with LF reference energies: off by the GFN1-GFN2 offset (~3 eV/atom)
    assert rows["lf_only"].hf_test_energy_rmse > 1000 > rows["main"].hf_test_energy_rmse
    # Without the charge, q = 0 and q = +1 at the same geometry get one energy: the q splitting (~0.4 eV/atom here)
    # stays in the error
    assert rows["no_charge"].lf_valid_energy_rmse > 100 and rows["no_charge"].lf_valid_energy_rmse > \
        rows["main"].lf_valid_energy_rmse
    # Descriptor PCA: charge states separate only with the embedding (identical geometries at both q)
    assert rows["no_charge"].pca_separation_ratio["0|+1"] < 1e-6
    assert rows["main"].pca_separation_ratio["0|+1"] > 0.3
    pca = result.metrics["main"].pca
    assert len(pca.explained_variance_ratio) == 2 and 0 < sum(pca.explained_variance_ratio) <= 1 + 1e-12
    assert set(pca.centroids) == {"0", "+1"}


def test_plots_written(trained):
    result, work = trained
    expected = {"parity_main", "pca_main", "parity_no_charge", "parity_hf_only", "parity_lf_only",
                "pca_charge_embedding"}
    assert expected <= set(result.plots)
    for key in expected:
        path = Path(result.plots[key])
        assert path.parent == work / "plots"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_verify_mode_refine_adds_hf_single_points_within_the_budget_and_keeps_the_lowest(trained, tmp_path,
                                                                                      monkeypatch):
    """verify.mode refine with the trained surrogate and real GFN2-xTB single points (the HF engine): each refine
    point is a check of its own (counted as an HF call), the cap holds, and the ground state is the lowest HF energy
    of the minimum and its refine points, with its HF max force and its distance from the surrogate minimum."""
    from defectflow.campaign import VerifySpec
    from defectflow.schemas import Minimum, SearchResult
    from defectflow.search import rmsd
    from defectflow.search.jobs import refine_leftover, verify_minima

    monkeypatch.chdir(tmp_path)
    result, _ = trained
    m = Minimum(energy=-1.0, structure=si_vac15(0.03, 7), labels=["Unperturbed"], energy_std=None)
    s = SearchResult(defect="v_Si", charge=0, model="mace:hf", n_starts=1, landscape={"Unperturbed": -1.0},
                     minima=[m], ground_state=m)
    # small steps: a tiny model's curvature is poor, and GFN2-xTB's SCF fails on strongly distorted cells
    spec = VerifySpec(mode="refine", top_k=1, uncertain_window=0, refine_points=3, fmax=0.01, refine_trust=0.03)
    gv = verify_minima.original(s, GFN2, GFN1, spec, model=result.models["main"])
    roles = [c.role for c in gv.checks]
    assert roles[0] == "rank 1" and 2 <= len(roles) <= 4 and all(r == f"refine {i}" for i, r in
                                                                 enumerate(roles[1:], 1)), roles
    assert gv.hf_calls == len(roles), roles
    # a failed HF single point ends the refinement; every other one has its forces
    assert all(c.hf_max_force is not None for c in gv.checks[:-1]), [(c.role, c.error) for c in gv.checks]
    assert gv.ground_state.hf_energy == min(c.hf_energy for c in gv.checks if c.hf_energy is not None)
    # every check is a real HF calculation in its own folder
    assert len([p for p in tmp_path.iterdir() if "_verify_" in p.name]) == len(roles)
    if gv.ground_state is not gv.checks[0]:
        assert gv.ground_state.rmsd_to_hf_relaxed > 0
    assert gv.checks[0].hf_max_force > spec.fmax  # a rattled cell is no GFN2 minimum: there was work to do
    # the campaign's HF budget: two calls in all, so one refine point
    capped = verify_minima.original(s, GFN2, GFN1, spec, model=result.models["main"], max_calls=2)
    assert [c.role for c in capped.checks] == ["rank 1", "refine 1"]
    # verify.refine_leftover: the round's unspent HF calls go on refining it (here 2 more under a cap of 5 with 1
    # call before the round), numbered on, never over the cap, its distance still from the surrogate's minimum
    assert capped.ground_state.hf_max_force > spec.fmax and capped.refine_exhausted  # 1 point of 0.03 Å: not done
    more_spec = spec.model_copy(update={"refine_leftover": True, "max_hf_calls": 5})
    more = refine_leftover.original([capped], GFN2, more_spec, result.models["main"], hf_calls_before=1)
    (gv2,) = more.verifications
    assert more.continued == ["v_Si +0"] and 1 <= more.hf_calls <= 2
    assert [c.role for c in gv2.checks] == ["rank 1", "refine 1", "refine 2", "refine 3"][:2 + more.hf_calls]
    assert gv2.ground_state.hf_energy == min(c.hf_energy for c in gv2.checks if c.hf_energy is not None)
    # the continuation goes on from where the first refinement stopped (its trust radius): it repeats no point
    assert capped.refine_radius is not None
    assert all(rmsd(new.structure, old.structure) > 1e-4 for new in gv2.checks[2:] for old in gv2.checks[:2])
    if gv2.ground_state is not gv2.checks[0]:
        assert gv2.ground_state.rmsd_to_hf_relaxed == pytest.approx(
            rmsd(gv2.checks[0].structure, gv2.ground_state.structure))
    # nothing left: nothing continued, no HF call
    none = refine_leftover.original([capped], GFN2, more_spec, result.models["main"], hf_calls_before=3)
    assert none.continued == [] and none.hf_calls == 0 and none.verifications[0].checks == capped.checks
    with pytest.raises(ValueError, match="refine needs the surrogate"):
        verify_minima.original(s, GFN2, GFN1, spec)


def test_delta_mode_trains_and_predicts_lf_plus_delta(delta, dataset):
    assert delta.kind == "delta" and [c.name for c in delta.components] == ["lf", "delta"]
    lf_run, d_run = delta.components
    assert "--heads" in d_run.command and '"delta"' in d_run.command
    # Δ targets: E_HF − E_LF of the same geometry (GFN2 − GFN1 ≈ +44 eV per 15-atom cell)
    d_frames = read_frames(Path(d_run.workdir) / "delta_train.xyz")
    hf_all = read_frames(dataset[1])
    lf_all = attach_lf_labels(hf_all, read_frames(dataset[0]))
    for a in d_frames:
        src = lf_all[a.info["source_index"]]
        assert a.info["REF_energy"] == pytest.approx(src.info["REF_energy"] - src.info["LF_energy"], abs=1e-9)
        np.testing.assert_allclose(a.arrays["REF_forces"], src.arrays["REF_forces"] - src.arrays["LF_forces"],
                                   atol=1e-9)
    calc = load_calculator(delta, "hf")
    assert isinstance(calc, DeltaCalculator)
    lf_calc = load_calculator(delta, "lf")
    from defectflow.train.surrogate import _mace_calc, model_path

    d_calc = _mace_calc(model_path(delta, "delta"), "delta", "cpu")
    for q in (0, 1):
        assert energy(calc, q) == pytest.approx(energy(lf_calc, q) + energy(d_calc, q), abs=1e-9)
    assert abs(energy(calc, 0) - energy(lf_calc, 0)) > 10  # the Δ model carries the GFN2−GFN1 offset
    assert abs(energy(calc, 1) - energy(calc, 0)) > 1e-2  # charge-dependent (DeltaCalculator sees info changes)
    m = evaluate(delta)
    assert m.hf_test.overall.n_frames == len(delta.split["hf_test"]) and m.hf_test.head == "hf"
    assert m.hf_test.overall.energy_rmse < 1000  # LF + Δ lands on the HF scale, unlike the LF model alone


def test_delta_needs_lf_labels_of_hf_frames(dataset):
    lf = read_frames(dataset[0])
    hf = read_frames(dataset[1])
    hf[0].positions[0] += 0.3  # no LF frame has this geometry
    with pytest.raises(ValueError, match="HF frame 0 .*no LF frame with the same geometry"):
        attach_lf_labels(hf, lf)


def test_train_job_keeps_model_bytes_in_data_store(dataset, tmp_path):
    from jobflow import run_locally

    from defectflow.store import embedded_store
    from defectflow.train import train_job

    lf, hf = dataset
    spec = MlipSpec(**{**TINY, "max_epochs": 2})
    j = train_job(lf, hf, spec, plot_dir=str(tmp_path / "plots"))
    store = embedded_store(tmp_path / "store")
    run_locally(j, store=store, create_folders=True, root_dir=str(tmp_path / "jobs"), log=False)
    store.connect()
    raw = store.query_one({"uuid": j.uuid}, load=False)["output"]
    stub = raw["models"]["main"]["model_files"]
    assert isinstance(stub, dict) and "blob_uuid" in stub and stub.get("store") == "data", stub  # not the bytes
    loaded = store.query_one({"uuid": j.uuid}, load=True)["output"]
    model = TrainedModel.model_validate(loaded["models"]["main"])
    assert model.model_bytes()[:2] == b"PK" and read_frames(model.hf_test_extxyz)
    e = energy(load_calculator(model, "hf"), 0)
    assert np.isfinite(e)
    assert Path(loaded["plots"]["parity_main"]).is_file()


def test_model_files_are_cached_inside_pytest_tmp(trained, tmp_path_factory):
    """load_calculator's model files go to the session's cache folder under pytest's basetemp (tests/conftest.py),
    never to the machine-wide default (<system tmp>/defectflow-models) that other runs share."""
    from defectflow.train.surrogate import model_path

    result, _ = trained
    path = model_path(result.main)
    assert path.is_file() and path.parent == Path(os.environ["DEFECTFLOW_MODEL_CACHE"])
    assert tmp_path_factory.getbasetemp() in path.parents
    import tempfile

    assert path.parent != Path(tempfile.gettempdir()) / "defectflow-models"


# ---------------------------------------------------------------------------------------------------------------
# recipes of the training study (issue #13): references, frame weights, fine-tuning from our own LF model
# ---------------------------------------------------------------------------------------------------------------
def test_charge_references_fit_every_charge_state_and_are_added_back(dataset):
    from ase.calculators.singlepoint import SinglePointCalculator

    from defectflow.train.data import fill_references, fit_references, subtract_references
    from defectflow.train.surrogate import ReferencedCalculator

    lf = read_frames(dataset[0])
    refs = fit_references(lf)
    assert set(refs["charge"]) == {"0", "+1"}
    resid = subtract_references(lf, refs)
    for q in (0, 1):  # least squares with a constant per q: the residuals of each q average to zero
        assert np.mean([a.info["REF_energy"] for a in resid if a.info["total_charge"] == q]) == pytest.approx(0,
                                                                                                        abs=1e-8)
    # HF frames with their LF energies: fitted through E_HF − E_LF on top of the LF references, so that per q the
    # HF residual equals the LF residual on average (the Δ between the codes is what the constants absorb)
    hf_lf = attach_lf_labels(read_frames(dataset[1]), lf)
    hf_refs = fit_references(hf_lf, baseline=refs)
    for q in (0, 1):
        d = [(a.info["REF_energy"] - hf_refs.energy(a)) - (a.info["LF_energy"] - refs.energy(a))
             for a in hf_lf if a.info["total_charge"] == q]
        assert np.mean(d) == pytest.approx(0, abs=1e-8)
    assert abs(hf_refs.energy(hf_lf[0]) - refs.energy(hf_lf[0])) > 10  # GFN2 − GFN1 ≈ 44 eV per cell
    # an HF fit that lacks q = +1 borrows it from the LF fit, shifted by the q = 0 difference
    hf0 = [a for a in read_frames(dataset[1]) if a.info["total_charge"] == 0]
    filled = fill_references(fit_references(hf0), refs)
    assert filled.energy(lf[1]) - filled.energy(lf[0]) == pytest.approx(refs.energy(lf[1]) - refs.energy(lf[0]))

    class Fixed(SinglePointCalculator):
        def __init__(self, atoms):
            super().__init__(atoms, energy=1.5, forces=np.zeros((len(atoms), 3)))

        def calculate(self, atoms=None, properties=("energy",), system_changes=()):
            self.atoms = atoms.copy()

    for q in (0, 1):
        a = same_geometry(q)
        a.calc = ReferencedCalculator(Fixed(a), refs)
        probe = a.copy()
        probe.info["total_charge"] = q
        assert a.get_potential_energy() == pytest.approx(1.5 + refs.energy(probe), abs=1e-9)


@pytest.fixture(scope="module")
def lf_model(dataset, tmp_path_factory):
    from defectflow.train.surrogate import train_kind

    return train_kind(dataset[0], "", MlipSpec(**TINY, charge_references=True), tmp_path_factory.mktemp("lfm"),
                      kind="lf_only", label="lf")


@pytest.mark.parametrize("kind", ["finetune", "replay"])
def test_finetuning_from_our_lf_model_beats_the_lf_model_on_hf_frames(kind, dataset, lf_model, tmp_path):
    from defectflow.train.surrogate import predict, train_kind

    spec = MlipSpec(**TINY, multi_fidelity=kind, finetune_epochs=4, hf_test_fraction=0.3)
    model = train_kind(dataset[0], dataset[1], spec, tmp_path, kind=kind, lf_model=lf_model)
    assert [c.name for c in model.components] == ["lf", "main"]
    ft = model.components[-1].command
    assert "--foundation_model" in ft and "--foundation_head lf" in ft and "--max_num_epochs 4" in ft
    assert ("--pt_train_file pt_train.xyz" in ft) == (kind == "replay")
    assert model.model_files["lf"] == lf_model.model_files["main"]  # reused, not retrained
    assert set(model.references) == {"lf", "hf"}
    # held-out HF frames: the fine-tuned HF prediction against the LF model's (GFN2 − GFN1 ≈ 44 eV per cell)
    test = read_frames(model.hf_test_extxyz)
    ref = np.array([a.info["REF_energy"] for a in test])
    e_hf, _ = predict(load_calculator(model, "hf"), test)
    e_lf, _ = predict(load_calculator(lf_model, "lf"), test)
    assert np.sqrt(np.mean((e_hf - ref) ** 2)) < 0.2 * np.sqrt(np.mean((e_lf - ref) ** 2))
    # the LF head still predicts LF energies (the references added back are the LF ones)
    lf_frames = read_frames(dataset[0])[:6]
    e, _ = predict(load_calculator(model, "lf"), lf_frames)
    assert np.sqrt(np.mean((e - np.array([a.info["REF_energy"] for a in lf_frames])) ** 2)) < 5.0


def test_lf_model_trained_without_references_is_refused_for_finetuning(dataset, tmp_path):
    from defectflow.train.surrogate import train_kind

    plain = TrainedModel.model_validate(lf_model_stub())
    with pytest.raises(ValueError, match="trained without reference energies"):
        train_kind(dataset[0], dataset[1], MlipSpec(**TINY, multi_fidelity="finetune"), tmp_path, kind="finetune",
                   lf_model=plain)


def lf_model_stub() -> dict:
    return {"label": "lf", "kind": "lf_only", "heads": ["lf"], "prediction_head": "lf", "charge_embedding": True,
            "embedding_readout": True, "model_files": {"main": ""}, "components": [], "device": "cpu",
            "r_max": 4.0, "split": {}, "spec": {}, "mace_version": "0", "wall_seconds": 0.0}


def test_frame_weights_reach_mace_training_files(dataset, tmp_path):
    from defectflow.train.surrogate import train_kind

    spec = MlipSpec(**{**TINY, "max_epochs": 1}, hf_weight=10.0, energy_weight_scale=0.05)
    model = train_kind(dataset[0], dataset[1], spec, tmp_path, kind="multihead")
    d = Path(model.components[0].workdir)
    lf_w = [a.info["config_weight"] for a in read_frames(d / "lf_train.xyz")]
    hf = read_frames(d / "hf_train.xyz")
    hf_w = [a.info["config_weight"] for a in hf]
    assert max(lf_w) == pytest.approx(1.0) and min(lf_w) >= 0.1 - 1e-12  # exp(-ΔE/scale), floored at 0.1
    assert max(hf_w) == pytest.approx(10.0)  # the lowest HF frame of each q: 10 × 1
    lowest = min(hf, key=lambda a: a.info["REF_energy"])
    assert lowest.info["config_weight"] == pytest.approx(10.0)


# ---------------------------------------------------------------------------------------------------------------
# batched surrogate search (torch-sim): the same physics as the one-at-a-time ASE loop
# ---------------------------------------------------------------------------------------------------------------
def _starts(n: int = 4):
    from defectflow.search import SearchStart

    return [SearchStart(label=f"r{i}", bond_distortion=None, structure=si_vac15(0.12, 300 + i)) for i in range(n)]


@pytest.mark.parametrize("which", ["multihead", "delta"])
def test_batched_relaxation_reports_the_calculators_energy_at_each_q_and_head(which, trained, delta):
    from defectflow.search.batched import batched_relax

    model = trained[0].models["main"] if which == "multihead" else delta
    structures = [s.structure for s in _starts(3)]
    for head in model.heads:
        calc = load_calculator(model, head)
        finals = {}
        for q in (0, 1):
            out = batched_relax(model, head, structures, q, fmax=0.05, max_steps=40)
            assert len(out) == 3
            for r in out:
                # total charge, head, Δ components and reference constants all reach the batched model: the
                # energy it reports is the ASE calculator's at that structure and q
                from defectflow.engines.base import structure_to_atoms

                atoms = structure_to_atoms(r.structure, q)
                atoms.calc = calc
                assert r.energy == pytest.approx(atoms.get_potential_energy(), abs=2e-4)
                assert r.converged == (r.fmax < 0.05)
                assert r.structure.charge == q
            finals[q] = np.array([r.energy for r in out])
        assert np.abs(finals[0] - finals[1]).min() > 1e-3  # the charge changes the prediction


def test_batched_fire_takes_ases_fire_steps_and_finds_the_same_minima(trained):
    from defectflow.search import rmsd, search_ground_state
    from defectflow.search.batched import batched_relax

    model = trained[0].models["main"]
    # the first 5 FIRE steps: torch-sim's ase_fire flavour moves the atoms as ASE's FIRE does
    starts = _starts(3)
    loop = search_ground_state("v_Si", 1, starts, lambda: load_calculator(model, "hf"), fmax=1e-4, max_steps=5,
                               energy_tolerance=0.0, min_distance_factor=0)
    out = batched_relax(model, "hf", [s.structure for s in starts], 1, fmax=1e-4, max_steps=5)
    by_label = {label: m.structure for m in loop.minima for label in m.labels}
    for s, r in zip(starts, out):
        assert rmsd(by_label[s.label], r.structure) < 1e-4
        assert rmsd(s.structure, r.structure) > 0.01  # it did move
    # whole relaxations from nearby starts (a tiny model's landscape is rough: far starts may part ways between
    # float summation orders): the same minimum per start, in float64 and float32
    starts = [s.model_copy(update={"structure": si_vac15(0.04, 400 + i)}) for i, s in enumerate(starts)]
    loop = search_ground_state("v_Si", 1, starts, lambda: load_calculator(model, "hf"), fmax=0.02, max_steps=300)
    for dtype, tol in (("float64", 0.002), ("float32", 0.01)):
        batch = search_ground_state("v_Si", 1, starts, relax_batch=lambda s, d=dtype: batched_relax(
            model, "hf", s, 1, fmax=0.02, max_steps=300, dtype=d), fmax=0.02, max_steps=300)
        assert batch.landscape.keys() == loop.landscape.keys()
        for label, e in loop.landscape.items():
            assert batch.landscape[label] == pytest.approx(e, abs=tol), (dtype, label)
    with pytest.raises(ValueError, match="exactly one"):
        search_ground_state("v_Si", 1, starts, fmax=0.02)
    # the paths kept for the top-up: every 3rd FIRE step of each relaxation, in order, until it converged; a
    # relaxation that converges before its first path frame has an empty path
    out = batched_relax(model, "hf", [s.structure for s in starts], 1, fmax=0.02, max_steps=300, path_every=3)
    for r in out:
        steps = [k for k, _ in r.path]
        assert steps and steps == sorted(steps) and all(k % 3 == 0 for k in steps) and steps[0] == 3
        assert all(len(st) == 15 and st.charge == 1 for _, st in r.path)
    assert all(r.path == [] for r in batched_relax(model, "hf", [s.structure for s in starts], 1, fmax=0.02,
                                                   max_steps=300, path_every=10_000))


def test_committee_members_train_at_once_where_cores_allow(dataset, monkeypatch, tmp_path):
    """``mlip.parallel``: members are separate training processes, run side by side. Each fake member waits at a
    barrier for the other: trained one after the other, the barrier would break and the run fail. A shared LF
    model (delta/finetune/replay) trains main first; the members then start from it."""
    import threading

    from defectflow.campaign import MlipSpec
    from defectflow.train import jobs

    lf, hf = dataset
    barrier = threading.Barrier(2, timeout=20)
    seen: list[tuple[str, int, bool]] = []

    def fake_train_kind(lf_extxyz, hf_extxyz, spec, workdir, kind, label, lf_model=None, **kw):
        seen.append((label, spec.seed, lf_model is not None))
        if label != "main" or kind == "multihead":
            barrier.wait()
        return label

    monkeypatch.setattr(jobs, "train_kind", fake_train_kind)
    class Trained(Exception):
        pass

    def stop(*a, **k):
        raise Trained("trained")

    monkeypatch.setattr(jobs, "evaluate", stop)
    spec = MlipSpec(committee=2, device="cpu", parallel=2, multi_fidelity="multihead")
    with pytest.raises(Trained):  # stop after training: these are not real models
        jobs.train_models(lf, hf, spec, tmp_path / "multihead")
    assert sorted(seen) == [("committee1", 2, False), ("main", 1, False)]

    seen.clear()
    barrier.reset()
    spec = MlipSpec(committee=3, device="cpu", parallel=2, multi_fidelity="delta")
    monkeypatch.setattr(jobs, "_lf_view", lambda model, name: f"lf of {model}")
    with pytest.raises(Trained):
        jobs.train_models(lf, hf, spec, tmp_path / "delta")
    assert seen[0] == ("main", 1, False)  # first, alone; then both others at once, from main's LF part
    assert sorted(seen[1:]) == [("committee1", 2, True), ("committee2", 3, True)]

    # the ablations are trained side by side with the committee, not after it
    seen.clear()
    barrier.reset()
    spec = MlipSpec(committee=1, device="cpu", parallel=2, ablations=["no_charge"], multi_fidelity="multihead")
    with pytest.raises(Trained):
        jobs.train_models(lf, hf, spec, tmp_path / "ablation")
    assert sorted(seen) == [("main", 1, False), ("no_charge", 1, False)]

    # how many at once: the setting, else cores over threads per process, never more than the models to train
    assert jobs.parallel_members(MlipSpec(committee=3, parallel=5)) == 3
    assert jobs.parallel_members(MlipSpec(committee=3, parallel=5), n_models=5) == 5
    monkeypatch.setattr(jobs.os, "cpu_count", lambda: 16)
    assert jobs.parallel_members(MlipSpec(committee=3, device="cpu", num_threads=4)) == 3
    assert jobs.parallel_members(MlipSpec(committee=8, device="cpu", num_threads=4)) == 4
    monkeypatch.setattr(jobs.os, "cpu_count", lambda: 2)
    assert jobs.parallel_members(MlipSpec(committee=3, device="cpu", num_threads=1)) == 2
    assert jobs.parallel_members(MlipSpec(committee=3, device="cuda")) == 1


def test_a_model_trained_on_one_hf_frame_warm_starts_on_two(dataset, tmp_path):
    """A lone HF frame both trains and validates (mace needs a validation set), so the first model's split lists
    it twice. The next round's warm start must count one frame already split and train on the new one (it refused
    with 'fewer than the 2 the previous model was split over')."""
    from defectflow.train.surrogate import train_kind, train_warm

    lf, hf = dataset
    frames = read_frames(hf)
    spec = MlipSpec(**TINY, hf_test_fraction=0.0, finetune_epochs=2)
    one = frames_to_text(frames[:1])
    first = train_kind(lf, one, spec, tmp_path / "first", kind="multihead", label="main")
    assert first.split["hf_train"] == first.split["hf_valid"] == [0]
    warm = train_warm(first, lf, frames_to_text(frames[:2]), spec, tmp_path / "warm", "main")
    component = (first.head_map or {"hf": [["main", "hf"]]})["hf"][-1][0]
    assert 1 in warm.split["hf_train"] and warm.warm_started_from == first.model_sha256(component)


def test_patience_stops_training_once_the_validation_loss_stalls(dataset, tmp_path):
    """mlip.patience: mace 0.3.16 ignores --patience in a single process (ACEsuit/mace#1384); the workaround in
    _run_mace makes it stop, before max_epochs, and still save the best-validation model."""
    spec = MlipSpec(**{**TINY, "max_epochs": 60, "lr": 0.05}, patience=2, multi_fidelity="multihead")
    model = train_surrogate(*dataset, spec, tmp_path)
    (run,) = model.components
    assert "--patience 2" in run.command and "defectflow.train.mace_patience" in run.command
    assert run.epochs < 60, run.epochs
    log = Path(run.log_file).read_text()
    assert "Stopping optimization after 2 epochs without improvement: training stopped here" in log
    assert "Saving model to" in log  # mace went on as after its last epoch: best-validation checkpoint saved
    # the weights kept are those of the last improvement: `patience` epochs before the last one trained
    assert f"Loaded Stage one model from epoch {run.epochs - 1 - 2} for evaluation" in log
    assert len(model.model_bytes()) > 10_000
