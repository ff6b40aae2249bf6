"""The one table of steps (defectflow.steps): every job the graph makes belongs to a step of the table, and the
step every consumer reads (results, submit, campaign resources) comes from it."""

from __future__ import annotations

import typing

from conftest import si_vacancy_campaign

from defectflow.campaign import Campaign, ExecutionSpec
from defectflow.flows import DefectCampaignMaker
from defectflow.steps import HF_STEPS, RESOURCE_STEPS, STEPS, job_name, name_job, step_of
from defectflow.submit.common import STEP_NAME_FILTERS


def test_every_job_of_the_graph_is_named_after_a_step_and_records_it(tmp_path):
    campaign = Campaign.from_dict(si_vacancy_campaign("steps", tmp_path, search={"foundation_baseline": "chgnet"}))
    flow = DefectCampaignMaker(check_engines=False).make(campaign)
    seen = set()
    for j in flow.jobs:
        step = step_of(j.name)
        assert step in STEPS, j.name
        assert j.metadata["step"] == step, j.name
        seen.add(step)
    assert {"generation", "bulk_lf", "bulk_hf", "bulk_reference", "relax_lf", "summary", "harvest_lf", "select",
            "label_hf", "train", "baseline", "start_search"} <= seen


def test_consumers_read_the_table():
    assert set(STEP_NAME_FILTERS) == set(RESOURCE_STEPS) == {"relax_lf", "single_hf", "train", "search", "verify",
                                                             "refine", "topup"}
    resource_keys = typing.get_args(typing.get_args(ExecutionSpec.model_fields["resources"].annotation)[0])
    assert set(resource_keys) == set(RESOURCE_STEPS)
    assert set(HF_STEPS) == {"bulk_hf", "single_hf", "verify", "refine", "topup"}


def test_names_and_unknown_steps():
    assert job_name("search", "v_Si +1", "round", 0) == "search v_Si +1 round 0"
    assert step_of("search v_Si +1 round 0") == "search" and step_of("researcher") is None and step_of(None) is None

    class _Job:
        name, metadata = "", {}

    j = name_job(_Job(), "verify", "v_Si 0", charge=0)
    assert (j.name, j.metadata) == ("verify v_Si 0", {"step": "verify", "charge": 0})
    try:
        job_name("relax", "x")
    except KeyError:
        pass
    else:
        raise AssertionError("an unknown step must raise")
