"""Query checks shared by the embedded-store and the MongoDB tests: the same calls must give consistent answers
whichever store holds a run (not a test module itself: imported by test_pipeline.py and test_submit.py)."""

from __future__ import annotations

import math

from defectflow.results import Results
from defectflow.steps import step_of


def check_results(r: Results, groups: set[tuple[str, int]], full: bool = True) -> None:
    """Assert that a finished run's results answer every query consistently. ``groups``: expected (defect, q)."""
    assert r.run in {x["run"] for x in r.runs()}

    gs = r.ground_states()
    assert {(g["defect"], g["charge"]) for g in gs} == groups
    for g in gs:
        assert g["ground_state_label"]
        if full:
            assert g["source"] == "surrogate+hf" and math.isfinite(g["hf_energy"])
            if g["ground_state_source"] == "known HF frame":  # a training frame beat every verified minimum
                assert g["reason"] and g["verification_error_mev_per_atom"] is None
            else:
                assert g["ground_state_source"] == "verified minimum" and g["verification_error_mev_per_atom"] >= 0
        else:
            assert g["source"] == "lf" and math.isfinite(g["lf_energy"])

    # per-(defect, q) filters: the shortcuts and the equivalent Mongo-style filters agree
    for defect, q in groups:
        by_shortcut = r.query(step="relax_lf", defect=defect, charge=q, properties=["name", "metadata"])
        by_filter = r.query({"metadata.defect": defect, "metadata.charge": {"$in": [q]},
                             "name": {"$regex": "^relax_lf "}}, properties=["name", "metadata"])
        assert by_shortcut and [d["name"] for d in by_shortcut] == [d["name"] for d in by_filter]
        assert all(d["metadata"]["charge"] == q and d["metadata"]["campaign"] == r.campaign for d in by_shortcut)
    none = r.query({"metadata.charge": 99})
    assert none == []

    # metadata.step (written by the tracked jobs) names steps the way the queries do
    # (jobflow's store_inputs jobs carry a copy of the metadata of the job they replace: not counted as cost)
    tracked_docs = r.query({"metadata.cost": {"$exists": True}, "name": {"$ne": "store_inputs"}},
                           properties=["name", "metadata"])
    assert tracked_docs and all(d["metadata"]["step"] == step_of(d["name"]) for d in tracked_docs)
    assert r.query(step="relax_lf", properties=["name"]) == r.query({"metadata.step": "relax_lf"}, properties=["name"])

    cost = {row["step"]: row for row in r.cost()}
    if "store_inputs" in cost:
        assert cost["store_inputs"]["cpu_s"] == 0 and cost["store_inputs"]["wall_s"] == 0
    n_relax = len(r.query(step="relax_lf", properties=["name"]))
    assert cost["relax_lf"]["jobs"] == n_relax and cost["relax_lf"]["cpu_s"] > 0
    assert cost["bulk_hf"]["jobs"] == 1
    if full:
        levels = r.levels()
        assert levels is not None and levels["band_gap"] > 0
        assert r.transition_levels() == levels["transition_levels"]
        metrics = r.model_metrics()
        assert metrics and metrics[0]["model"] == "main"
        n_hf = len(r.query(step="single_hf", properties=["name"]))
        assert cost["single_hf"]["jobs"] == n_hf > 0 and cost["train"]["cpu_s"] > 0
        assert cost["single_hf"]["hf_calls"] == n_hf - cost["single_hf"]["reused"]
    else:
        assert r.transition_levels() == [] and r.levels() is None
