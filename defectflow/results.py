"""Results of campaigns, from any JobStore: the embedded store or MongoDB, whichever executor ran the jobs.

>>> from defectflow.results import Results
>>> r = Results.for_campaign("workflows/quickstart.yaml")       # the store named in the campaign   # doctest: +SKIP
>>> r.ground_states()          # per (defect, q): label, HF / surrogate energies (eV), verification error
>>> r.transition_levels()      # ε(q/q') in eV above the VBM
>>> r.model_metrics()          # held-out HF errors of the surrogate and its ablations
>>> r.cost()                   # jobs, reused jobs, wall and CPU seconds per step
>>> r.query({"metadata.defect": "v_Si", "metadata.charge": 0}, step="relax_lf")

Every job document carries ``name`` (its first word is the pipeline step), ``hosts`` (the run's flow uuid),
``metadata.campaign``, and, where they apply, ``metadata.defect`` / ``charge`` / ``distortion``, plus
``metadata.cost`` and ``metadata.cache_key`` for the tracked steps (see :mod:`defectflow.store.tracking`).
Only plain ``find`` filters and projections are used (no aggregation, no indexes), so the same queries run on the
embedded SQLite store and on MongoDB.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from jobflow import JobStore

from defectflow.campaign import Campaign
from defectflow.steps import HF_STEPS, step_of
from defectflow.store import open_store

__all__ = ["Results", "RunInfo", "list_runs", "write_json"]


class RunInfo(dict):
    """One run of a campaign: ``run`` (flow uuid), ``campaign``, ``started`` (first job completion time)."""


class Results:
    """Query the results of one run of a campaign (default: its newest run with a final result).

    Parameters
    ----------
    store
        A JobStore (:func:`defectflow.store.make_store`).
    campaign
        Campaign name (``metadata.campaign``); None: any campaign in the store.
    run
        A run's flow uuid; None: the newest run with a final result, else the newest run.
    """

    def __init__(self, store: JobStore, campaign: str | None = None, run: str | None = None):
        self.store = store
        self.store.connect()
        self.campaign = campaign
        self.run = run or self._default_run()

    @classmethod
    def for_campaign(cls, campaign, run: str | None = None) -> Results:
        """Results of a campaign (a :class:`~defectflow.campaign.Campaign` or a YAML path) from the store its
        ``execution`` section names. Creates nothing: :class:`~defectflow.store.StoreError` when the campaign has
        no store yet (it never ran) or its MongoDB server cannot be reached."""
        if not isinstance(campaign, Campaign):
            campaign = Campaign.from_yaml(campaign)
        return cls(open_store(campaign.execution.store, campaign.work_dir()), campaign.name, run)

    # -- runs -----------------------------------------------------------------------------------------------------
    def _campaign_filter(self) -> dict[str, Any]:
        return {"metadata.campaign": self.campaign} if self.campaign else {}

    def runs(self) -> list[RunInfo]:
        """Every run of the campaign in the store, newest first (see :func:`list_runs`)."""
        return list_runs(self.store, self.campaign)

    def _default_run(self) -> str | None:
        runs = self.runs()
        for r in runs:
            if r["finished"]:
                return r["run"]
        return runs[0]["run"] if runs else None

    def _scope(self) -> dict[str, Any]:
        if self.run is None:
            raise LookupError(f"no run of campaign {self.campaign!r} in this store" if self.campaign
                              else "no campaign run in this store")
        return {"hosts": self.run}

    def _final_doc(self, run: str) -> dict[str, Any] | None:
        return _final_doc(self.store, run)

    # -- queries ----------------------------------------------------------------------------------------------------
    def query(self, criteria: dict[str, Any] | None = None, step: str | None = None, defect: str | None = None,
              charge: int | None = None, properties: list[str] | None = None, all_runs: bool = False,
              load: bool = False) -> list[dict[str, Any]]:
        """Job documents of this run matching a Mongo-style filter (plus the shortcuts ``step``, ``defect``,
        ``charge``), in completion order. ``all_runs``: every run of the campaign. ``load``: resolve big data
        (trajectories, model files) from the data store."""
        crit: dict[str, Any] = dict(criteria or {})
        crit.update(self._campaign_filter() if all_runs else self._scope())
        if step:
            crit["name"] = {"$regex": f"^{re.escape(step)}( |$)"}
        if defect is not None:
            crit["metadata.defect"] = defect
        if charge is not None:
            crit["metadata.charge"] = int(charge)
        docs = list(self.store.query(crit, properties=properties, load=load))
        return sorted(docs, key=lambda d: d.get("completed_at", ""))

    def result(self) -> dict[str, Any] | None:
        """The final CampaignResult document (dict) of this run, or None (LF-only or unfinished run)."""
        doc = self._final_doc(self._scope()["hosts"])
        return doc["output"] if doc else None

    def lf_summaries(self) -> list[dict[str, Any]]:
        """ShakeNBreak summaries of the LF relaxations per (defect, q): energies (eV) per distortion, ground state."""
        return [d["output"] for d in self.query(step="summary", properties=["output", "completed_at"])]

    def ground_states(self) -> list[dict[str, Any]]:
        """Per (defect, q): ground-state label and structure, HF / surrogate energies (eV), verification error
        (meV/atom), RMSD to the HF-relaxed/refined structure (Å, verify.mode relax/refine), largest HF force there
        (``hf_max_force``, eV/Å), foundation-baseline RMSD (Å), the
        round it comes from, the committee's energy (eV) and force (eV/Å) σ there, and ``ground_state_source``
        ('verified minimum' or 'known HF frame', with ``reason``).
        Without a final result (LF-only or unfinished run): the LF ShakeNBreak ground states (``source='lf'``)."""
        final = self.result()
        if final:
            keys = ("defect", "charge", "ground_state_label", "hf_energy", "surrogate_energy",
                    "verification_error_mev_per_atom", "rmsd_to_hf_relaxed", "hf_max_force", "baseline_rmsd",
                    "n_minima",
                    "round", "energy_std", "force_std", "reason", "structure")
            rows = [{**{k: g.get(k) for k in keys}, "source": "surrogate+hf",
                     "ground_state_source": g.get("source", "verified minimum")} for g in final["ground_states"]]
        else:
            rows = []
            for s in self.lf_summaries():
                gs = s.get("ground_state")
                rows.append({"defect": s["defect"], "charge": s["charge"], "ground_state_label": gs,
                             "lf_energy": s["energies"].get(gs) if gs else None,
                             "energy_lowering": s.get("energy_lowering"), "source": "lf"})
        return sorted(rows, key=lambda r: (r["defect"], r["charge"]))

    def transition_levels(self) -> list[dict[str, Any]]:
        """Charge-transition levels: defect, q_from, q_to, level (eV above the VBM), in_gap; empty without levels."""
        final = self.result()
        levels = (final or {}).get("levels") or {}
        return [dict(t) for t in levels.get("transition_levels", [])]

    def rounds(self) -> list[dict[str, Any]]:
        """The verification / top-up rounds of the final result: per round the verified minima (label, role,
        surrogate and HF energies in eV, error in meV/atom, committee σ in eV), the ground states, which changed,
        the frames added before it and why, HF calls, wall and CPU seconds, and why the loop stopped."""
        return list((self.result() or {}).get("rounds") or [])

    def levels(self) -> dict[str, Any] | None:
        """The whole levels document: VBM, gap, corrections, formation energies at E_F = VBM (eV)."""
        return (self.result() or {}).get("levels")

    def model_metrics(self) -> list[dict[str, Any]]:
        """Held-out accuracy of the surrogate ('main') and its ablations, of the last training round: energies in
        meV/atom, forces in meV/Å, training wall seconds."""
        final = self.result()
        if final and final.get("model_comparison"):
            return list(final["model_comparison"])
        docs = self.query(step="train", properties=["name", "output.comparison", "completed_at"])
        return list(docs[-1]["output"]["comparison"]) if docs else []

    def cost(self, as_fresh: bool = False) -> list[dict[str, Any]]:
        """Per step: jobs, jobs reused from earlier runs, wall seconds and CPU seconds (this process + child
        processes such as ``mpirun pw.x``), HF calls (one per job of an HF step, or what the job recorded:
        verify and topup make several). Untracked steps count jobs only.

        ``as_fresh``: a reused job counts the cost and HF calls of the job it reused (looked up in the store by its
        uuid), i.e. what this run would have cost from scratch; by default it counts what reusing cost (nothing)."""
        rows: dict[str, dict[str, Any]] = defaultdict(lambda: {"jobs": 0, "reused": 0, "wall_s": 0.0, "cpu_s": 0.0,
                                                               "hf_calls": 0})
        for d in self.query(properties=["name", "metadata", "completed_at"]):
            step = step_of(d["name"]) or d["name"].split(" ", 1)[0]
            row = rows[step]
            row["jobs"] += 1
            meta = d.get("metadata") or {}
            if d["name"] == "store_inputs":
                # jobflow's bookkeeping job for a Response(replace=...): it carries a *copy* of the replaced job's
                # metadata (cost included), which must not be counted twice
                continue
            row["reused"] += bool(meta.get("reused_from"))
            if meta.get("reused_from") and as_fresh:
                meta = self._source_metadata(meta["reused_from"]) or meta
            if not meta.get("reused_from"):  # one HF call per job of an HF step unless the job says otherwise
                row["hf_calls"] += int(meta.get("hf_calls", 1))
            cost = meta.get("cost") or {}
            row["wall_s"] += cost.get("wall_s", 0.0)
            row["cpu_s"] += cost.get("cpu_s", 0.0) + cost.get("cpu_children_s", 0.0)
        out = []
        for step, row in rows.items():
            hf = step in HF_STEPS
            out.append({"step": step, **row, "wall_s": round(row["wall_s"], 2), "cpu_s": round(row["cpu_s"], 2),
                        "hf_calls": row["hf_calls"] if hf else 0})
        return sorted(out, key=lambda r: r["step"])

    def _source_metadata(self, uuid: str, depth: int = 10) -> dict[str, Any] | None:
        """Metadata of the job that actually ran, following ``reused_from`` (a reuse of a reuse) back."""
        for _ in range(depth):
            doc = self.store.query_one({"uuid": uuid}, properties=["metadata"])
            meta = (doc or {}).get("metadata")
            if not meta or not meta.get("reused_from"):
                return meta
            uuid = meta["reused_from"]
        return None

    def progress(self) -> list[dict[str, Any]]:
        """Per step: finished jobs of this run and how many of them reused earlier results."""
        return [{"step": r["step"], "finished": r["jobs"], "reused": r["reused"]} for r in self.cost()]


def _final_doc(store: JobStore, run: str) -> dict[str, Any] | None:
    """The last ``finalize round N`` document of a run that holds the CampaignResult, or None."""
    docs = [d for d in store.query({"hosts": run, "name": {"$regex": "^finalize round "}},
                                   properties=["name", "output"])
            if isinstance(d.get("output"), dict) and "ground_states" in d["output"]]
    return max(docs, key=lambda d: int(d["name"].rsplit(" ", 1)[-1])) if docs else None


def list_runs(store: JobStore, campaign: str | None = None) -> list[RunInfo]:
    """Every run of ``campaign`` (any campaign when None) in ``store``, newest first: one per ``generation`` job,
    with ``run`` (flow uuid), ``campaign``, ``started`` (ISO time) and ``finished`` (has a final result)."""
    store.connect()
    crit: dict[str, Any] = {"name": "generation", **({"metadata.campaign": campaign} if campaign else {})}
    runs = [RunInfo(run=d["hosts"][-1], campaign=(d.get("metadata") or {}).get("campaign"),
                    started=d["completed_at"])
            for d in store.query(crit, properties=["hosts", "metadata", "completed_at"]) if d.get("hosts")]
    for r in runs:
        r["finished"] = _final_doc(store, r["run"]) is not None
    return sorted(runs, key=lambda r: r["started"], reverse=True)


def write_json(data: Any, path: str | Path | None = None) -> str:
    """JSON text of query results (structures as pymatgen dicts); written to ``path`` when given."""
    import json

    from monty.json import jsanitize

    text = json.dumps(jsanitize(data, strict=False, allow_bson=False), indent=1, default=str)
    if path:
        Path(path).write_text(text)
    return text
