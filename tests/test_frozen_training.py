"""Training on a small subset of the frozen benchmark data (issue #13's tests): real QE labels of the Si vacancy
(``benchmarks/data``), the `close` preset's LF (QE PBE 12 Ry) relaxations and HF pool, the direct-HF search (QE PBE
18 Ry) as the held-out test set. A small model of the library's recipe (MlipSpec defaults, shrunk to train in under
a minute on one core): its LF head fits LF frames of relaxations it never saw, its HF prediction beats the LF-only
model on direct-HF frames, its charge embedding separates q = 0 from q = +2, and a frame without a charge is refused.

The thresholds are stated here, with the figures measured when the test was written (session 12, 2 cores):
LF head on held-out LF frames 38–40 meV/atom and 141–203 meV/Å (two orders of the same training frames: the force
error of so small a model moves with the shuffle), against 798 meV/Å for a model that predicts no force; on the
held-out direct-HF frames the HF head is off by 29.7 meV/atom, the LF-only model by 150.9; E(q = 0) − E(q = +2) at
a held-out geometry 11.2 eV against 10.3 eV for the unrelaxed vacancy in HF."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import frozen  # noqa: E402

pytest.importorskip("mace")

from defectflow.campaign import MlipSpec  # noqa: E402
from defectflow.relax import harvest_training_set  # noqa: E402
from defectflow.train import load_calculator, train_models, train_surrogate  # noqa: E402
from defectflow.train.data import ENERGY_KEY, FORCES_KEY, frames_to_text, read_frames  # noqa: E402
from defectflow.train.surrogate import predict  # noqa: E402

PRESET = "close"
CHARGES = ("0", "+2")
TRAIN_STARTS = ("Unperturbed", "Bond_Distortion_-40.0_", "Bond_Distortion_40.0_", "Dimer")
HELD_OUT_STARTS = ("Bond_Distortion_-20.0_", "Bond_Distortion_20.0_")
#: thresholds (see the module docstring for what was measured)
LF_E_MAX, LF_F_MAX = 60.0, 300.0  # meV/atom, meV/Å: LF head on LF frames of held-out relaxations
HF_E_MAX = 45.0  # meV/atom: HF prediction on the held-out direct-HF frames
#: the library's recipe, smaller: one member, L = 0, 16 channels, 30 epochs, float32 with EMA (the study's settings)
SMALL = dict(hidden_irreps="16x0e", max_L=0, num_interactions=2, correlation=2, r_max=4.5, max_epochs=30,
             batch_size=4, committee=1, hf_test_fraction=0.0, default_dtype="float32", ema_decay=0.99, device="cpu")


def names(starts) -> list[str]:
    return [f"v_Si_{q}__{s}" for q in CHARGES for s in starts]


def rmse(calc, frames) -> tuple[float, float]:
    """Energy RMSE (meV/atom) and force-component RMSE (meV/Å) of ``calc`` on extxyz frames (q from total_charge)."""
    e, f = predict(calc, frames)
    ref = np.array([float(a.info[ENERGY_KEY]) for a in frames])
    n = np.array([len(a) for a in frames])
    df = np.concatenate([(p - np.asarray(a.arrays[FORCES_KEY])).ravel() for p, a in zip(f, frames)])
    return 1000 * float(np.sqrt(np.mean(((e - ref) / n) ** 2))), 1000 * float(np.sqrt(np.mean(df**2)))


@pytest.fixture(scope="module")
def data():
    """LF: every 3rd step of 8 frozen `close` relaxations (4 starts × q = 0, +2), as step 4 harvests them; HF: 8
    frames of the `close` pool at those relaxations' LF geometries; held out: the LF frames of two other starts and
    every direct-HF frame of those two starts (never trained on)."""
    train = [frozen.relaxation_record(PRESET, n) for n in names(TRAIN_STARTS)]
    held = [frozen.relaxation_record(PRESET, n) for n in names(HELD_OUT_STARTS)]
    lf = harvest_training_set.original(train, harvest_filter={"keep_every": 3})
    lf_held = read_frames(harvest_training_set.original(held, harvest_filter={"keep_every": 1}).extxyz)
    pool = [a for a in frozen.pool_frames(PRESET) if a.info["lf_relaxation"] in set(names(TRAIN_STARTS))]
    assert len(pool) >= 8
    from ase.io import write

    buf = io.StringIO()
    write(buf, pool[:: len(pool) // 8][:8], format="extxyz")
    index = frozen.relaxation_index("hf")
    hf_test = [a for n in names(HELD_OUT_STARTS)
               for a in frozen.read_frames_gz(frozen.set_dir("hf") / index[n]["file"])]
    assert not {a.info.get("lf_relaxation") for a in pool} & set(names(HELD_OUT_STARTS))
    return lf.extxyz, buf.getvalue(), lf_held, hf_test


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lf, hf, _, _ = data
        spec = MlipSpec(**SMALL, ablations=["lf_only"])
        yield train_models(lf, hf, spec, tmp_path_factory.mktemp("frozen_training"))
    finally:
        torch.set_num_threads(old)


def test_the_lf_head_fits_lf_frames_of_relaxations_it_never_saw(data, trained):
    _, _, lf_held, _ = data
    e, f = rmse(load_calculator(trained.main, "lf"), lf_held)
    # a model that knew only q would be off by the spread of these energies about their q's mean
    by_q = {}
    for a in lf_held:
        by_q.setdefault(int(a.info["total_charge"]), []).append(float(a.info[ENERGY_KEY]) / len(a))
    spread = 1000 * float(np.sqrt(np.mean(np.concatenate([(np.array(v) - np.mean(v)) ** 2 for v in by_q.values()]))))
    # and one that predicted no forces would be off by their RMS
    f_rms = 1000 * float(np.sqrt(np.mean(np.concatenate([np.ravel(a.arrays[FORCES_KEY]) for a in lf_held]) ** 2)))
    assert e <= LF_E_MAX and f <= LF_F_MAX, (e, f)
    assert e < spread / 2 and f < 0.4 * f_rms, (e, spread, f, f_rms)


def test_the_hf_prediction_beats_the_lf_only_model_on_held_out_direct_hf_frames(data, trained):
    _, _, _, hf_test = data
    e_hf, _ = rmse(load_calculator(trained.main, "hf"), hf_test)
    e_lf, _ = rmse(load_calculator(trained.models["lf_only"], "lf"), hf_test)
    # most of the LF-only error is the constant HF − LF offset (−128 meV/atom on this pool), so also an absolute bound
    assert e_hf < e_lf / 2 and e_hf <= HF_E_MAX, (e_hf, e_lf)


def test_q0_and_q2_predictions_differ_at_the_same_geometry_as_hf_says(data, trained):
    """At a held-out geometry the q = 0 and q = +2 cells differ by the charging energy. HF puts the unrelaxed
    vacancy's q = 0 cell 10.3 eV above its q = +2 cell (both frozen step 0 of Unperturbed, the same geometry); it
    depends on the geometry only through the defect level, so the prediction at another geometry is within 25 %."""
    _, _, _, hf_test = data
    index = frozen.relaxation_index("hf")
    (a0,), (a2,) = ([frozen.read_frames_gz(frozen.set_dir("hf") / index[f"v_Si_{q}__Unperturbed"]["file"])[0]]
                    for q in CHARGES)
    assert np.allclose(a0.positions, a2.positions)
    de_hf = float(a0.info[ENERGY_KEY]) - float(a2.info[ENERGY_KEY])
    calc = load_calculator(trained.main, "hf")
    geometry = next(a for a in hf_test if int(a.info["total_charge"]) == 0).copy()
    energies = {}
    for q in (0, 2):
        geometry.info["charge"] = q
        geometry.calc = calc
        energies[q] = geometry.get_potential_energy()
        geometry.calc = None
    de = energies[0] - energies[2]
    assert de_hf > 5.0 and abs(de - de_hf) < 0.25 * de_hf, (de, de_hf)


def test_a_frozen_frame_without_its_charge_is_refused(data, tmp_path):
    lf, hf, _, _ = data
    frames = read_frames(hf)
    del frames[3].info["total_charge"]
    with pytest.raises(ValueError, match=r"frame 3: extxyz lacks the total charge 'total_charge'"):
        train_surrogate(lf, frames_to_text(frames), MlipSpec(**SMALL), tmp_path)
    assert not list(tmp_path.glob("**/*.model"))
