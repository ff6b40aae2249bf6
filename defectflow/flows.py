"""The jobflow graph of a campaign.

:class:`DefectCampaignMaker` builds, from a :class:`~defectflow.campaign.Campaign`:

* ``generation``        the doped + ShakeNBreak output (one document),
* ``bulk_lf``, ``bulk_hf`` pristine-supercell single points, ``bulk_reference`` (energies, HF band edges),
* ``relax_lf …``        one job per distorted structure per (defect, q), low fidelity, every ionic step kept,
* ``summary …``         ShakeNBreak energy-vs-distortion summary and plot per (defect, q),
* ``harvest_lf``        the low-fidelity training set (extxyz),
* ``select``            frames for HF single points within the budget (``selection.strategy``),
* ``single_hf``         one HF single point per selected frame (dynamic: replaced once the selection is known),
* ``train round 0``     the charge-embedded multi-fidelity MACE surrogate (+ ablations, metrics, plots),
* ``baseline …``        optional foundation-model (CHGNet) search per (defect, q),
* ``start_search``      joins the above, then per (defect, q): ``search …`` (surrogate) → ``verify …`` (HF),
                        and ``finalize`` (top-up retraining while verification disagrees, then doped levels).

``steps="lf"`` stops after the harvest (steps 1-2 only).

Generation runs while the graph is built (doped + ShakeNBreak take seconds), so the graph is static and its size is
known before anything runs; pass ``generation=`` to reuse an earlier :func:`~defectflow.generate.generate` result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jobflow import Flow, Maker, job

from defectflow.campaign import Campaign
from defectflow.engines import get_engine
from defectflow.generate import GenerationResult, generate
from defectflow.label import bulk_reference, label_selected
from defectflow.label.jobs import single_point
from defectflow.levels import with_potentials
from defectflow.relax import HarvestFilter, harvest_training_set, relax_structure, summarize_distortions
from defectflow.search.jobs import (
    SearchContext,
    SearchGroup,
    baseline_search,
    shakenbreak_starts,
    start_search,
)
from defectflow.select import select_job
from defectflow.steps import name_job
from defectflow.train.jobs import train_job

__all__ = ["DefectCampaignMaker", "record_generation"]


@job(data="distortion_sets")
def record_generation(generation: GenerationResult | str) -> GenerationResult:
    """Store the generation result (defects, charges, distorted structures) with the campaign's outputs.

    Takes the document or its JSON (what the graph passes, so jobflow need not scan thousands of structures)."""
    if isinstance(generation, str):
        return GenerationResult.model_validate_json(generation)
    return generation


@dataclass
class DefectCampaignMaker(Maker):
    """Build the campaign graph (steps 1-2: generation, bulk references, LF relaxations, harvest).

    Parameters
    ----------
    name
        Flow name prefix.
    harvest_filter
        Thresholds for the training-set harvest (see :class:`~defectflow.relax.HarvestFilter`).
    min_e_diff
        ShakeNBreak's energy-lowering threshold in eV.
    check_engines
        Run each engine's set-up check (executables, pseudopotentials) while building, so a missing
        pseudopotential fails at once instead of in every job.
    steps
        "all" (default) or "lf" (stop after the low-fidelity harvest).
    """

    name: str = "defectflow"
    harvest_filter: HarvestFilter = field(default_factory=HarvestFilter)
    min_e_diff: float = 0.05
    check_engines: bool = True
    steps: str = "all"

    def make(self, campaign: Campaign, generation: GenerationResult | None = None) -> Flow:
        generation = generation or generate(campaign)
        low = campaign.fidelities.low.model_dump(mode="json")
        high = campaign.fidelities.high.model_dump(mode="json")
        # the bulk HF single point also records the electrostatic potential when levels.correction can use it
        # (eFNV/FNV; QE runs pp.x for it); the verification single points do the same (build_search_round)
        high_bulk = with_potentials(high, campaign.levels.correction)
        if self.check_engines:
            for fid, spec in (("low", campaign.fidelities.low), ("high", high_bulk)):
                get_engine(spec, fidelity=fid).check(generation.bulk_supercell)

        jobs: list = []
        gen_job = name_job(record_generation(generation.model_dump_json()), "generation")
        jobs.append(gen_job)

        # Structures enter jobs as JSON strings: jobflow scans every job argument for nested Jobs by serialising
        # it, which for Structure objects dominated graph construction (100 s for 4000 jobs; strings are skipped).
        bulk = generation.bulk_supercell.to_json()
        bulk_lf = name_job(single_point(bulk, 0, low, "low", tag="bulk_lf"), "bulk_lf")
        bulk_hf = name_job(single_point(bulk, 0, high_bulk, "high", tag="bulk_hf"), "bulk_hf")
        bulk_ref = name_job(bulk_reference(bulk_lf.output, bulk_hf.output), "bulk_reference")
        jobs += [bulk_lf, bulk_hf, bulk_ref]

        plot_dir = str(campaign.work_dir() / "plots" / "distortions")
        relax_outputs = []
        summaries = {}
        host_elements = {el.symbol for el in generation.bulk_supercell.composition}
        for ds in generation.distortion_sets:
            group = []
            for start in ds.structures:
                j = relax_structure(
                    start.structure.to_json(),
                    ds.charge,
                    low,
                    "low",
                    defect=ds.defect,
                    distortion=start.label,
                    bond_distortion=start.bond_distortion,
                    fmax=campaign.relax.fmax,
                    max_steps=campaign.relax.max_steps,
                )
                name_job(j, "relax_lf", ds.name, start.label, defect=ds.defect, charge=ds.charge,
                         distortion=start.label)
                jobs.append(j)
                group.append(j.output)
            neighbour = _neighbour_element(ds, host_elements)
            s = summarize_distortions(group, ds.defect, ds.charge, ds.num_distorted_neighbours, neighbour,
                                      plot_dir, self.min_e_diff)
            name_job(s, "summary", ds.name, defect=ds.defect, charge=ds.charge)
            jobs.append(s)
            summaries[ds.name] = s.output
            relax_outputs.extend(group)

        flt = self.harvest_filter.model_copy(update={"keep_every": campaign.relax.keep_every})
        harvest = harvest_training_set(relax_outputs, "low", "lf", flt.model_dump())
        name_job(harvest, "harvest_lf")
        jobs.append(harvest)
        output: dict[str, Any] = {
            "generation": gen_job.output,
            "bulk": bulk_ref.output,
            "summaries": summaries,
            "training_set_lf": harvest.output,
        }
        if self.steps == "all":
            output.update(self._steps_3_to_5(campaign, generation, jobs, relax_outputs, harvest, bulk_ref, high,
                                             bulk_hf.output))
        elif self.steps != "lf":
            raise ValueError(f"steps: expected 'all' or 'lf', got {self.steps!r}")
        flow = Flow(jobs, output=output, name=f"{self.name} {campaign.name}")
        # every job, dynamic ones included: the campaign name (for queries across runs and stores) and the store
        # exposed to the job (tracked jobs look up finished results with the same inputs there: resume)
        flow.update_metadata({"campaign": campaign.name}, dynamic=True)
        flow.update_config({"expose_store": True}, dynamic=True)
        return flow

    def _steps_3_to_5(self, campaign, generation, jobs, relax_outputs, harvest, bulk_ref, high,
                      bulk_hf) -> dict[str, Any]:
        plots = campaign.work_dir() / "plots"
        sel = name_job(select_job(relax_outputs, campaign.selection.model_dump(mode="json")), "select")
        # replaced at run time by the "single_hf …" jobs + collect_hf
        lab = name_job(label_selected(sel.output, high, "high"), "label_hf")
        train = name_job(train_job(harvest.output.extxyz, lab.output.extxyz, campaign.mlip, str(plots / "model")),
                         "train", "round", 0)
        jobs += [sel, lab, train]
        groups = [SearchGroup(defect=ds.defect, charge=ds.charge, starts=shakenbreak_starts(ds),
                              defect_entry=ds.defect_entry) for ds in generation.distortion_sets]
        baselines = []
        if campaign.search.foundation_baseline:
            for g in groups:
                b = name_job(baseline_search(g.defect, g.charge, g.starts, campaign.search,
                                             campaign.search.foundation_baseline, str(plots / "search")),
                             "baseline", g.key, defect=g.defect, charge=g.charge)
                jobs.append(b)
                baselines.append(b.output)
        context = SearchContext(
            campaign=campaign.name, search=campaign.search, verify=campaign.verify, mlip=campaign.mlip,
            levels=campaign.levels, fidelities=campaign.fidelities, seed=campaign.distortions.seed, groups=groups,
            bulk_structure=generation.bulk_supercell, plot_dir=str(plots / "search"),
            model_plot_dir=str(plots / "model"), hf_calls=1,  # the bulk HF single point
        )
        st = name_job(start_search(train.output, lab.output, harvest.output.extxyz, bulk_ref.output, baselines,
                                   context, bulk_hf=bulk_hf, training_uuid=train.uuid), "start_search")
        jobs.append(st)
        return {"selection": sel.output, "hf_labels": lab.output, "training": train.output, "result": st.output}


def _neighbour_element(ds, host_elements: set[str]) -> str | None:
    """Element of the distorted neighbours (for the plot label), when they are all the same."""
    if not ds.distorted_atoms or not ds.structures:
        return None
    s = ds.structures[0].structure
    els = {s[i].specie.symbol for i in ds.distorted_atoms if i < len(s)}
    return els.pop() if len(els) == 1 else None
