"""Selection of LF frames for HF single points: real tblite GFN1-xTB trajectories and synthetic ones with known answers."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import GFN1, si_vac15
from pymatgen.core import Structure

from defectflow.campaign import SelectionSpec
from defectflow.relax import RelaxRecord
from defectflow.schemas import Frame, RelaxTrajectory
from defectflow.select import (
    STRATEGIES,
    GreedyStrategy,
    Selection,
    collect_candidates,
    register_strategy,
    select_frames,
    select_job,
)

BUILTIN = ("minima", "fps", "stratified")



# ---------------------------------------------------------------------------------------------------------------
# real GFN1-xTB relaxations: v_Si q = 0 and +1, two rattled starts each, a few steps (≈ 16 single points)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xtb_records(tmp_path_factory):
    pytest.importorskip("tblite")
    from defectflow.relax import relax_structure

    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("relax"))
    try:
        records = []
        for q in (0, 1):
            for label, seed in (("Unperturbed", 1), ("Bond_Distortion_-30.0%", 2)):
                records.append(relax_structure.original(si_vac15(rattle=0.08, seed=seed), q, GFN1, "low", "v_Si",
                                                        label, None, 0.3, 3))
    finally:
        os.chdir(here)
    assert all(r.status != "failed" and r.n_steps >= 2 for r in records), [r.error for r in records]
    return records


def check_rules(sel: Selection, spec: SelectionSpec, groups: dict[str, int]):
    """Budget, per-group min/max, coverage of every group, reasons, no frame twice."""
    assert sel.n_chosen == len(sel.chosen) <= spec.budget
    assert set(sel.per_group) == set(groups)
    for g, n_cand in groups.items():
        n = sum(c.group == g for c in sel.chosen)
        assert n == sel.per_group[g]
        assert n >= min(spec.per_group_min, n_cand), g
        if spec.per_group_max is not None:
            assert n <= spec.per_group_max
    assert len(set(sel.keys())) == len(sel.chosen)
    assert all(c.reason and len(c.reason) > 10 for c in sel.chosen)
    assert all(c.frame.energy is not None and c.frame.forces is not None for c in sel.chosen)
    assert [c.order for c in sel.chosen] == list(range(len(sel.chosen)))


@pytest.mark.parametrize("strategy", BUILTIN)
@pytest.mark.parametrize("budget,pmin,pmax", [(2, 1, None), (5, 2, 3), (40, 1, 4)])
def test_rules_hold_on_real_trajectories(xtb_records, strategy, budget, pmin, pmax):
    spec = SelectionSpec(strategy=strategy, budget=budget, per_group_min=pmin, per_group_max=pmax, seed=3)
    sel = select_frames(xtb_records, spec)
    n_frames = sum(len(r.trajectory.frames) for r in xtb_records)
    assert sel.strategy == strategy and sel.budget == budget and sel.seed == 3
    assert sel.n_candidates == n_frames
    check_rules(sel, spec, sel.per_group_candidates)
    assert set(sel.per_group_candidates) == {"v_Si +0", "v_Si +1"}
    assert all(c.frame.charge == c.charge for c in sel.chosen)
    if strategy != "minima" and pmax is not None:  # these fill the budget up to the caps
        assert sel.n_chosen == min(budget, 2 * pmax)


@pytest.mark.parametrize("strategy", BUILTIN)
def test_same_seed_same_selection_and_input_order_does_not_matter(xtb_records, strategy):
    spec = SelectionSpec(strategy=strategy, budget=6, per_group_max=4, seed=7)
    a = select_frames(xtb_records, spec)
    b = select_frames(list(reversed(xtb_records)), spec)
    c = select_frames(list(xtb_records), spec.model_dump())
    assert a.keys() == b.keys() == c.keys()
    assert [x.reason for x in a.chosen] == [x.reason for x in b.chosen]


def test_stratified_depends_on_the_seed(xtb_records):
    picks = {tuple(select_frames(xtb_records, SelectionSpec(strategy="stratified", budget=4, seed=s)).keys())
             for s in range(8)}
    assert len(picks) > 1


def test_minima_on_real_trajectories_takes_end_points_lowest_first(xtb_records):
    sel = select_frames(xtb_records, SelectionSpec(strategy="minima", budget=2))
    for c in sel.chosen:
        ends = [r.trajectory.final.energy for r in xtb_records if r.charge == c.charge]
        assert c.is_final and c.frame.energy == pytest.approx(min(ends))
        assert "#1 of v_Si" in c.reason


def test_fps_starts_at_the_lowest_energy_and_reports_distances(xtb_records):
    sel = select_frames(xtb_records, SelectionSpec(strategy="fps", budget=6, per_group_max=3))
    for g in ("v_Si +0", "v_Si +1"):
        mine = [c for c in sel.chosen if c.group == g]
        q = mine[0].charge
        lowest = min(f.energy for r in xtb_records if r.charge == q for f in r.trajectory.frames)
        assert mine[0].frame.energy == lowest and "start" in mine[0].reason
        dist = [float(c.reason.split("distance ")[1].split()[0]) for c in mine[1:]]
        assert all(d > 0 for d in dist) and dist == sorted(dist, reverse=True)  # greedy max-min decreases


def test_budget_too_small_is_one_clear_error(xtb_records):
    for strategy in BUILTIN:
        with pytest.raises(ValueError, match=r"selection\.budget = 3 is too small.*at least 4"):
            select_frames(xtb_records, SelectionSpec(strategy=strategy, budget=3, per_group_min=2))


def test_job_runs_in_jobflow_and_stores_frames_in_data_store(xtb_records):
    from jobflow import JobStore, run_locally
    from maggma.stores import MemoryStore

    store = JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})
    j = select_job(list(xtb_records), {"strategy": "fps", "budget": 3})
    run_locally(j, store=store, log=False)
    out = Selection.model_validate(store.query_one({"uuid": j.uuid}, load=True)["output"])
    assert out.n_chosen == 3 and sorted(out.per_group.values()) == [1, 2]
    raw = store.query_one({"uuid": j.uuid}, load=False)["output"]
    assert "blob_uuid" in raw["chosen"]  # big frames live in the additional store


# ---------------------------------------------------------------------------------------------------------------
# synthetic trajectories with known answers
# ---------------------------------------------------------------------------------------------------------------
BASE = si_vac15()


def moved(site: int = 3, d: float = 0.0, noise: float = 0.0, seed: int = 0) -> Structure:
    s = BASE.copy()
    if d:
        s.translate_sites([site], [d, 0, 0], frac_coords=False)
    if noise:
        rng = np.random.default_rng(seed)
        s = Structure(s.lattice, s.species, s.cart_coords + rng.normal(0, noise, (len(s), 3)),
                      coords_are_cartesian=True)
    return s


def record(label, energies, structures=None, q=0, defect="v_Si", status="converged", bad_steps=()):
    structures = structures or [BASE] * len(energies)
    frames = []
    for i, (e, s) in enumerate(zip(energies, structures)):
        frames.append(Frame(structure=s, energy=e, forces=np.zeros((len(s), 3)).tolist(), charge=q, engine="ase",
                            settings_digest="x", step=i, scf_converged=i not in bad_steps))
    traj = RelaxTrajectory(frames=frames, status=status, charge=q, engine="ase", settings_digest="x",
                           fmax_target=0.05)
    return RelaxRecord(defect=defect, charge=q, distortion=label, status=status, n_steps=len(frames),
                       energy=energies[-1], engine="ase", fidelity="low", settings_digest="x", trajectory=traj)


def test_minima_groups_identical_minima_and_keeps_distinct_ones():
    a = record("Unperturbed", [-9.0, -9.8, -10.000], [moved(d=0.5), moved(d=0.2), moved()])
    b = record("Bond_Distortion_-30.0%", [-8.5, -9.9, -10.003], [moved(d=-0.6), moved(d=-0.1), moved(noise=0.01)])
    c = record("Bond_Distortion_30.0%", [-8.0, -9.2, -9.500], [moved(d=1.5), moved(d=1.0), moved(d=0.9)])
    d = record("Dimer", [-9.0, -10.2], [moved(d=0.7), moved(site=5, d=0.8)], status="unconverged")
    e = record("Rattled", [-8.0, -9.495], [moved(d=1.2), moved(d=0.9, noise=0.005)])  # same as c
    sel = select_frames([a, b, c, d, e], SelectionSpec(strategy="minima", budget=10))
    assert [(x.distortion, x.step) for x in sel.chosen] == [
        ("Bond_Distortion_-30.0%", 2),  # lowest of the {a, b} minimum, 3 meV apart and matching
        ("Bond_Distortion_30.0%", 2),  # the {c, e} minimum
        ("Dimer", 1),  # lower, but unconverged: after the converged minima
    ]
    assert "#1" in sel.chosen[0].reason and "2 relaxations end here" in sel.chosen[0].reason
    assert "unconverged" in sel.chosen[2].reason and "#3" in sel.chosen[2].reason
    assert any("left unused" in w for w in sel.warnings)  # only 3 distinct minima for a budget of 10
    # energy tolerance 0 splits a and b; a strict StructureMatcher too
    assert select_frames([a, b], SelectionSpec(strategy="minima", budget=5, energy_tolerance=0.0)).n_chosen == 2
    assert select_frames([a, b], SelectionSpec(strategy="minima", budget=5, match_stol=0.001)).n_chosen == 2
    # a 10 meV tolerance but different structures (c vs a moved by 0.9 Å) stay apart
    f = record("Other", [-8.0, -10.005], [moved(d=1.2), moved(d=0.9)])
    assert select_frames([a, f], SelectionSpec(strategy="minima", budget=5)).n_chosen == 2


def test_minima_fill_goes_rank_by_rank_across_groups_and_coverage_falls_back():
    g0 = [record("A", [-5, -10.0]), record("B", [-5, -9.0], [BASE, moved(d=0.9)]),
          record("C", [-5, -8.0], [BASE, moved(d=-0.9)])]
    g1 = [record("A", [-5, -20.0], q=1), record("B", [-5, -19.5], [BASE, moved(d=0.9)], q=1)]
    g2 = [record("A", [-3.0, -4.0, -4.5, -5.0], q=-1)]  # one minimum only
    sel = select_frames(g0 + g1 + g2, SelectionSpec(strategy="minima", budget=4, per_group_min=1))
    assert [(x.charge, x.distortion) for x in sel.chosen] == [(-1, "A"), (0, "A"), (1, "A"), (1, "B")]
    # rank #2: v_Si +1's is 0.5 eV above its minimum, v_Si +0's 1.0 eV → +1 first
    sel = select_frames(g2, SelectionSpec(strategy="minima", budget=3, per_group_min=3))
    assert [x.step for x in sel.chosen] == [3, 0, 1]  # minimum, then energies farthest from the chosen
    assert "only 1 distinct minimum" in sel.chosen[1].reason


def test_failed_and_unconverged_scf_frames_are_not_candidates():
    r = record("A", [-1.0, -2.0, -3.0, -4.0], bad_steps=(1,))
    r.trajectory.frames[2].energy = None
    cands, _ = collect_candidates([r])
    assert [c.step for c in cands] == [0, 3]
    failed = RelaxRecord(defect="v_Si", charge=0, distortion="X", status="failed", engine="ase", fidelity="low",
                         settings_digest="x", trajectory=None)
    sel = select_frames([r, failed], SelectionSpec(strategy="stratified", budget=5))
    assert sel.n_candidates == 2 and sel.n_chosen == 2
    empty = select_frames([failed], SelectionSpec(strategy="fps"))
    assert empty.n_chosen == 0 and empty.per_group == {} and empty.warnings


def test_energy_and_force_windows_drop_frames_the_lf_training_set_drops():
    n = len(BASE)  # eV/atom above the group's lowest frame: (E − E_min) / n
    r = record("A", [-1.0 + 2.0 * n, -1.0 + 0.5 * n, -1.0], q=0)
    r.trajectory.frames[1].forces = (np.full((n, 3), 30.0)).tolist()  # a 52 eV/Å atomic force
    other = record("B", [5.0 + 2.0 * n, 5.0], q=1)  # each q has its own minimum
    cands, warns = collect_candidates([r, other], max_energy_above_min=1.0)
    assert [(c.charge, c.step) for c in cands] == [(0, 1), (0, 2), (1, 1)]
    assert [c.index for c in cands] == [0, 1, 2] and any("not candidates" in w for w in warns)
    cands, _ = collect_candidates([r, other], max_energy_above_min=1.0, max_force=20.0)
    assert [(c.charge, c.step) for c in cands] == [(0, 2), (1, 1)]
    sel = select_frames([r, other], SelectionSpec(strategy="fps", budget=4, max_energy_above_min=1.0,
                                                   max_force=20.0))
    assert sorted((x.charge, x.step) for x in sel.chosen) == [(0, 2), (1, 1)]
    assert len(collect_candidates([r, other])[0]) == 5  # no window: every frame (the default)


def test_stratified_picks_one_frame_per_energy_bin():
    # energies in three known 1-eV bins between -3 and 0 eV
    e1, e2 = [-3.0, -2.95, -2.9, -2.2], [-1.9, -1.5, -1.1]
    e3 = [-0.9, -0.5, -0.3, 0.0]
    recs = [record("A", e1 + e3), record("B", e2)]
    for seed in range(6):
        sel = select_frames(recs, SelectionSpec(strategy="stratified", budget=3, seed=seed))
        bins = sorted(int(np.floor(c.lf_energy + 3.0)) if c.lf_energy < 0 else 2 for c in sel.chosen)
        assert bins == [0, 1, 2], (seed, [c.lf_energy for c in sel.chosen])
        assert [c.reason.split(" of ")[0] for c in sel.chosen] == [f"energy stratum {k}/3" for k in (1, 2, 3)]
    # with `strata` fixed and a budget of one: the lowest stratum
    sel = select_frames(recs, SelectionSpec(strategy="stratified", budget=1, strata=3))
    assert sel.chosen[0].lf_energy <= -2.0
    # an empty middle bin: one frame per non-empty bin, the extra from the fullest bin
    sel = select_frames([record("A", [-3.0, -2.9, -2.8, 0.0])], SelectionSpec(strategy="stratified", budget=3))
    assert sum(c.lf_energy < -2 for c in sel.chosen) == 2 and any("extra draw" in c.reason for c in sel.chosen)


def test_stratified_shares_the_budget_equally_between_groups():
    recs = [record("A", list(np.linspace(-2, 0, 10)), q=0), record("A", list(np.linspace(-5, -1, 6)), q=1),
            record("A", [-1.0, -2.0], q=-1)]
    sel = select_frames(recs, SelectionSpec(strategy="stratified", budget=9, per_group_max=4))
    assert sel.per_group == {"v_Si -1": 2, "v_Si +0": 4, "v_Si +1": 3}


def test_fps_prefers_the_new_structure_over_a_near_duplicate():
    structures = [moved(), moved(noise=0.005, seed=1), moved(d=1.0), moved(noise=0.005, seed=2)]
    recs = [record("A", [-10.0, -9.99, -9.0, -9.98], structures)]
    sel = select_frames(recs, SelectionSpec(strategy="fps", budget=2, soap_r_cut=4.0))
    assert [c.step for c in sel.chosen] == [0, 2]
    assert "farthest point, distance" in sel.chosen[1].reason


def test_fps_within_group_treats_other_charges_as_new():
    structures = [moved(), moved(d=1.0)]
    recs = [record("A", [-10.0, -9.0], structures, q=0), record("A", [-5.0, -4.0], structures, q=1)]
    sel = select_frames(recs, SelectionSpec(strategy="fps", budget=2))
    assert sel.per_group == {"v_Si +0": 1, "v_Si +1": 1}
    assert [c.step for c in sel.chosen] == [0, 0]  # both groups start at their own lowest frame


def test_custom_strategy_can_be_registered():
    class Highest(GreedyStrategy):
        name = "highest"

        def coverage_pick(self, group, state):
            c = max(state.free(group), key=lambda c: c.energy)
            return c, f"highest LF energy of {group}"

        def fill_pick(self, open_groups, state):
            free = [c for g in open_groups for c in state.free(g)]
            return (max(free, key=lambda c: c.energy), "highest LF energy left") if free else None

    register_strategy("highest", Highest)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_strategy("highest", Highest)
        sel = select_frames([record("A", [-1.0, -3.0, -2.0])], SelectionSpec(budget=2), strategy="highest")
        assert sel.strategy == "highest" and [c.step for c in sel.chosen] == [0, 2]
    finally:
        STRATEGIES.pop("highest")
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        select_frames([record("A", [-1.0])], SelectionSpec(), strategy="nope")


def test_selection_round_trips_through_json(xtb_records):
    sel = select_frames(xtb_records, SelectionSpec(strategy="minima", budget=4))
    again = Selection.model_validate_json(sel.model_dump_json())
    assert again.keys() == sel.keys()
    assert again.chosen[0].frame.structure == sel.chosen[0].frame.structure
