"""The frozen benchmark data (benchmarks/data/, issue #12): it loads, every file matches its manifest digest, a stored
HF frame recomputed with real QE reproduces its energy and forces, and a campaign reuses frozen relaxations
through defectflow's own resume instead of recomputing them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import frozen  # noqa: E402


def test_manifest_digests_and_contents():
    m = frozen.manifest()
    assert frozen.check_digests() == []
    assert m["charges"] == [0, 1, 2]
    gen = frozen.generation()
    # ShakeNBreak's default grid for a vacancy: -60 … +60 % in 10 % steps (0 % = rattle only), Unperturbed, Dimer
    assert m["starts_per_charge"] == {str(ds.charge): len(ds.structures) for ds in gen.distortion_sets}
    assert all(n >= 14 for n in m["starts_per_charge"].values())
    for key in ("system", "hf", "frames", "hf_calls", "hf_cpu_seconds", "versions", "files"):
        assert key in m, key
    index = frozen.relaxation_index("hf")
    assert m["frames"] == sum(r["n_steps"] for r in index.values() if r.get("file"))
    assert m["hf"]["settings_digest"] == next(iter(index.values()))["settings_digest"]


def test_a_frozen_relaxation_reads_back_as_step_2_made_it():
    index = frozen.relaxation_index("hf")
    name, row = next(iter(sorted(index.items())))
    rec = frozen.relaxation_record("hf", name)
    assert (rec.status, rec.n_steps, rec.charge) == (row["status"], row["n_steps"], row["charge"])
    assert rec.energy == pytest.approx(row["energy"], abs=1e-6)
    assert rec.trajectory.frames[0].step == 0 and rec.trajectory.frames[-1].step == row["n_steps"] - 1
    assert all(f.forces is not None and len(f.forces) == len(f.structure) == 15 for f in rec.trajectory.frames)


@pytest.mark.slow
def test_a_stored_hf_frame_is_reproduced_by_qe(tmp_path):
    """One ionic step of the direct-HF search recomputed now with the HF engine's frozen settings: within 1 meV and
    5 meV/Å of what was stored (the step in the middle of the first converged q = 0 relaxation: a distorted,
    low-symmetry cell). Known exception, not tested here (docs/benchmarks.md, issue #12): in the stalled q = +1
    −60 % relaxation, the steps after pw.x's repeated lsda restarts differ from a fresh single point at the same
    geometry by up to 2.7 eV/Å while the energy agrees; those steps carry ``forces_suspect``."""
    from defectflow.engines import get_engine

    m = frozen.manifest()
    index = frozen.relaxation_index("hf")
    name = next(n for n in sorted(index) if index[n]["charge"] == 0 and index[n]["status"] == "converged")
    frames = frozen.relaxation_record("hf", name).trajectory.frames
    stored = frames[len(frames) // 2]
    new = get_engine(m["hf"]["settings"], fidelity="high").single_point(stored.structure, stored.charge, tmp_path)
    assert new.settings_digest == m["hf"]["settings_digest"]
    assert abs(new.energy - stored.energy) < 1e-3, (new.energy, stored.energy)
    assert np.abs(new.forces_array - stored.forces_array).max() < 5e-3


def test_a_campaign_reuses_the_frozen_relaxations(tmp_path):
    """The benchmark's defectflow side takes its LF relaxations from the frozen data: seeded into the campaign's
    store as finished relax_lf jobs, a run finds them by its own cache keys and reuses every one (no engine run;
    here the reference campaign itself, whose low fidelity is the HF engine, on the frozen q = 0 starts)."""
    from defectflow.results import Results
    from defectflow.store import make_store
    from defectflow.submit import run_campaign

    gen = frozen.generation()
    index = frozen.relaxation_index("hf")
    ds = next(d for d in gen.distortion_sets if d.charge == 0)
    done = [s for s in ds.structures if frozen.relax_name(ds, s.label) in index][:2]
    assert done, "no frozen q = 0 relaxation"
    sub = gen.model_copy(update={"distortion_sets": [ds.model_copy(update={"structures": done})],
                                 "charges": {"v_Si": [0]}})
    campaign = frozen.load_campaign("reference", tmp_path / "run")
    lf_cost = frozen.seed_relaxations(make_store("embedded", campaign.work_dir()), campaign, "hf", sub)
    assert lf_cost["relaxations"] == len(done) and lf_cost["cpu_seconds"] > 0
    run = run_campaign(campaign, steps="lf", generation=sub)
    assert not run.failed_jobs, run.failures
    rows = {r["step"]: r for r in Results.for_campaign(campaign).cost()}
    assert rows["relax_lf"]["jobs"] == rows["relax_lf"]["reused"] == len(done)
    summary = Results.for_campaign(campaign).lf_summaries()[0]
    for s in done:
        assert summary["energies"][s.label] == pytest.approx(index[frozen.relax_name(ds, s.label)]["energy"])


def test_near_minimum_reads_every_converged_relaxation_and_grows_with_the_distance():
    """reference.py near-minimum on the frozen direct-HF relaxations: one row per RMSD threshold over every
    converged relaxation; a larger threshold is met earlier along a relaxation, so more steps are left and the
    structure lies higher in HF energy."""
    import reference

    rows = reference.near_minimum()
    converged = sum(r["status"] == "converged" for r in frozen.relaxation_index("hf").values())
    assert [r["rmsd_a"] for r in rows] == list(reference.NEAR_MINIMUM_RMSD)
    assert converged >= 40 and all(r["relaxations"] == converged for r in rows)
    steps = [r["steps_left_median"] for r in rows]
    energies = [r["energy_above_min_mev_median"] for r in rows]
    assert steps == sorted(steps) and energies == sorted(energies) and energies[0] >= 0
