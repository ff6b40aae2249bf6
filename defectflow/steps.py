"""The one table of pipeline steps.

Every job of a campaign graph is named ``"<step> <details>"`` (``relax_lf v_Si_0 Unperturbed``, ``train round 0``,
``bulk_hf``) and records ``metadata.step``. Everything that needs to know about steps reads this table: the
results API (``Results.cost``, ``defectflow query --step``), submission (per-step resources and workers), ``status``,
progress, and the benchmarks. Add a step here and nowhere else.

====================  ====  ==  ========  =======================================================================
step                  part  HF  resource  what the job does
====================  ====  ==  ========  =======================================================================
``generation``        1                   doped + ShakeNBreak output (computed while the graph is built)
``bulk_lf``           bulk                pristine supercell, LF single point
``bulk_hf``           bulk  ✓             pristine supercell, HF single point (VBM, gap, reference energy)
``bulk_reference``    bulk                the two bulk single points as one document
``relax_lf``          2         ✓         one LF relaxation of one start (every ionic step kept)
``summary``           2                   ShakeNBreak energy-vs-distortion summary of one (defect, q)
``harvest_lf``        2                   every LF ionic step → training extxyz
``select``            3                   frames for HF single points (within the budget)
``label_hf``          3                   fan-out: replaced by one ``single_hf`` job per selected frame
``single_hf``         3     ✓   ✓         one HF single point of one selected frame
``collect_hf``        3                   the HF frames → training extxyz
``train``             4         ✓         one training round of the surrogate (+ ablations, metrics, plots)
``baseline``          5                   foundation-model (CHGNet) search of one (defect, q)
``start_search``      5                   join after training: starts round 0 of the search
``search``            5         ✓         surrogate search of one (defect, q) in one round
``verify``            5     ✓   ✓         HF check of the lowest surrogate minima of one (defect, q)
``refine``            5     ✓   ✓         verify.refine_leftover: more refine points where a (defect, q) ran out
``plot``              5                   the landscape of one (defect, q) with its HF-verified minima
``topup``             5     ✓   ✓         HF single points at the most uncertain path frames (active learning)
``finalize``          5                   next round (top-up, warm-started training) or levels + the result
``store_inputs``      —                   jobflow's own bookkeeping job of a dynamic replacement
====================  ====  ==  ========  =======================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Step", "STEPS", "RESOURCE_STEPS", "HF_STEPS", "step_of", "job_name", "name_job", "label_of"]


@dataclass(frozen=True)
class Step:
    """One pipeline step: its name (also the first word of its jobs' names), the pipeline part it belongs to, whether
    its jobs call the high-fidelity engine, and whether ``execution.resources`` may name it."""

    name: str
    part: str
    hf: bool = False
    resource: bool = False
    description: str = ""

    @property
    def label(self) -> str:
        """Human-readable group for tables: ``'2 relax_lf'``, ``'bulk bulk_hf'``."""
        return f"{self.part} {self.name}"


STEPS: dict[str, Step] = {s.name: s for s in (
    Step("generation", "1", description="doped + ShakeNBreak output"),
    Step("bulk_lf", "bulk", description="pristine supercell, LF single point"),
    Step("bulk_hf", "bulk", hf=True, description="pristine supercell, HF single point"),
    Step("bulk_reference", "bulk", description="bulk energies and HF band edges"),
    Step("relax_lf", "2", resource=True, description="LF relaxation of one start"),
    Step("summary", "2", description="ShakeNBreak summary of one (defect, q)"),
    Step("harvest_lf", "2", description="LF training set"),
    Step("select", "3", description="frames for HF single points"),
    Step("label_hf", "3", description="fan-out into single_hf jobs"),
    Step("single_hf", "3", hf=True, resource=True, description="HF single point of one selected frame"),
    Step("collect_hf", "3", description="HF training set"),
    Step("train", "4", resource=True, description="surrogate training round"),
    Step("baseline", "5", description="foundation-model search (not defectflow's cost)"),
    Step("start_search", "5", description="join after training"),
    Step("search", "5", resource=True, description="surrogate search of one (defect, q)"),
    Step("verify", "5", hf=True, resource=True, description="HF check of the lowest minima of one (defect, q)"),
    Step("refine", "5", hf=True, resource=True, description="more refine points with the HF calls left"),
    Step("plot", "5", description="landscape with the HF-verified minima"),
    Step("topup", "5", hf=True, resource=True, description="HF single points at uncertain path frames"),
    Step("finalize", "5", description="next round or levels"),
    Step("store_inputs", "-", description="jobflow bookkeeping"),
)}

#: Steps ``execution.resources`` and ``submit`` may configure.
RESOURCE_STEPS: tuple[str, ...] = tuple(s.name for s in STEPS.values() if s.resource)
#: Steps whose jobs call the high-fidelity engine.
HF_STEPS: tuple[str, ...] = tuple(s.name for s in STEPS.values() if s.hf)


def step_of(job_name: str | None) -> str | None:
    """The step of a job name (its first word), or None when that word names no step."""
    if not job_name:
        return None
    first = job_name.split(" ", 1)[0]
    return first if first in STEPS else None


def job_name(step: str, *details: object) -> str:
    """``"<step> <details>"``: how every job is named (raises KeyError for an unknown step)."""
    STEPS[step]
    return " ".join([step, *(str(d) for d in details if d != "")])


def name_job(job, step: str, *details: object, **metadata):
    """Name a jobflow Job ``"<step> <details>"`` and record ``metadata.step`` (+ ``metadata``); returns the job."""
    job.name = job_name(step, *details)
    job.metadata.update(step=step, **metadata)
    return job


def label_of(job_name: str | None) -> str:
    """The table label (``'2 relax_lf'``) of a job name; ``'(other)'`` for names of no step."""
    step = step_of(job_name)
    return STEPS[step].label if step else "(other)"
