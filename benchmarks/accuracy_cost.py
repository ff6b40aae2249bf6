"""Benchmark v2: defectflow against the frozen direct high-fidelity ShakeNBreak search — accuracy and HF cost.

    .venv/bin/python benchmarks/accuracy_cost.py --preset close        # LF = QE PBE 12 Ry (≤ 30 min on 2 cores)
    .venv/bin/python benchmarks/accuracy_cost.py --preset functional   # LF = QE LDA 18 Ry
    .venv/bin/python benchmarks/accuracy_cost.py --preset far          # LF = GFN1-xTB
    .venv/bin/python benchmarks/accuracy_cost.py --preset close --show # print the tables of the last JSON again
    .venv/bin/python benchmarks/accuracy_cost.py --summary             # every preset and variant side by side

The **reference** is frozen in ``benchmarks/data/`` (``benchmarks/reference.py`` computed it once with the
library; ``manifest.json`` lists its files, digests, cost and code versions): the Si vacancy in a 16-site cell,
q = 0, +1, +2, every start of ShakeNBreak's default grid relaxed with the HF engine (QE PBE 18 Ry, 2×2×2 k),
ground state per q = the lowest-energy relaxation (ShakeNBreak's criterion), CTLs with doped. It is never
recomputed unless ``--recompute-reference`` is given.

The **defectflow** side is the preset's campaign (``benchmarks/presets/<preset>.yaml``) run as a user would run it
(:func:`defectflow.submit.run_campaign`) on the frozen starts. Its LF relaxations are deterministic inputs: they
are taken from the preset's frozen LF trajectories, which enter the campaign's store as finished ``relax_lf`` jobs
with the graph's own cache keys, so defectflow's resume reuses them; their measured cost is counted as if run.
Everything else (selection, HF single points, training, search, verification, levels) runs for real.

**Baselines** on the same starts, each with one HF single point at its ground-state structure per q (counted
apart, not in defectflow's cost): the ablations the pipeline trained (``no_charge``, ``hf_only``, ``lf_only``),
the CHGNet foundation-model baseline the pipeline ran, and **lf_snb**, "LF ShakeNBreak + one HF single point per
q" (its HF energies come from the frozen HF pool, which holds every LF minimum).

**Cost, counted the same way on both sides:** HF calls and HF CPU-seconds (``getrusage`` of this process and its
reaped children: ``mpirun`` + ``pw.x``) — the reference's from its manifest, defectflow's from
:meth:`defectflow.results.Results.cost` (steps that call the HF engine: ``bulk_hf``, ``single_hf``, ``verify``).

Output: tables on stdout and ``benchmarks/results/accuracy_cost_<preset>.json`` (keys ``goals``, ``methods``,
``ratios``, ``starts_per_charge_state``, ``reference`` with ``frozen: true`` and ``manifest_sha256``); work
directory ``runs/benchmarks/accuracy_cost-<preset>/`` (``--work-dir``; ``--resume`` reuses a finished run there).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch/tblite load: one thread each; QE uses its MPI ranks

import argparse
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frozen  # noqa: E402
from bench_utils import (CLEAN_CORE_SHARE, aligned_rmsd, contended_steps, cpu_seconds, level_errors, machine,  # noqa: E402
                         max_abs, ratio, rounded, table, verdict)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ABLATIONS = ("no_charge", "hf_only", "lf_only")
GOALS = {"ctl_error_eV": 0.02, "gs_rmsd_A": 0.05, "hf_cpu_ratio": 30.0}

log = logging.getLogger("accuracy_cost")



# ---------------------------------------------------------------------------------------------------------------
# the reference
# ---------------------------------------------------------------------------------------------------------------
def load_reference(preset: str | None, recompute: bool) -> dict[str, Any]:
    """The frozen reference (checked against its manifest; with ``preset``, that preset's LF data too); computed
    first with ``recompute``."""
    if recompute:
        import reference

        reference.compute(["bulk", "hf", preset, "pools"], None)
    bad = frozen.check_digests(["hf"] + ([f"lf/{preset}"] if preset else []))
    if bad:
        raise SystemExit("benchmarks/data does not match its manifest: " + "; ".join(bad[:5]))
    m = frozen.manifest()
    missing = [k for k in ("hf", preset) if k and not m["complete"].get(k)]
    if missing:
        raise SystemExit(f"the frozen data is incomplete ({', '.join(missing)}): run "
                         f"`.venv/bin/python benchmarks/reference.py compute` (or --recompute-reference)")
    summary = frozen.reference_summary()
    states = {}
    for gs in summary["ground_states"].values():
        from pymatgen.core import Structure

        key = f"v_Si {gs['charge']:+d}"
        states[key] = {"label": gs["ground_state"], "hf_energy": gs["energy"],
                       "structure": Structure.from_dict(gs["structure"]), "energy_lowering": gs["energy_lowering"]}
    return {"manifest": m, "summary": summary, "states": states,
            "manifest_sha256": frozen.sha256(frozen.DATA / "manifest.json"), "bulk": frozen.read_json(
                frozen.DATA / "bulk_hf.json")}


# ---------------------------------------------------------------------------------------------------------------
# defectflow
# ---------------------------------------------------------------------------------------------------------------
def with_overrides(campaign, overrides: list[str]):
    """The campaign with ``section.field=value`` overrides (values parsed as YAML), validated again."""
    import yaml

    from defectflow.campaign import Campaign

    doc = campaign.model_dump(mode="json")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {item!r}: expected section.field=value, e.g. verify.mode=refine")
        *path, last = key.split(".")
        node = doc
        for part in path:
            if not isinstance(node.get(part), dict):
                raise SystemExit(f"--set {item!r}: the campaign has no section {part!r}")
            node = node[part]
        if last not in node:
            raise SystemExit(f"--set {item!r}: section {'.'.join(path)!r} has no field {last!r}")
        node[last] = yaml.safe_load(value)
    return Campaign.model_validate(doc)


def run_defectflow(preset: str, work: Path, resume: bool, overrides: list[str] = (), reuse_from: Path | None = None):
    """The preset's campaign on the frozen starts, LF relaxations taken from the frozen data. Returns
    (campaign, Results, frozen LF cost, wall seconds of this run). ``overrides``: ``section.field=value`` changes
    of the preset; ``reuse_from``: a finished run's work directory whose store is copied first, so that every job
    whose inputs the overrides leave unchanged (selection, HF single points, training, ...) is reused."""
    from defectflow.results import Results
    from defectflow.store import make_store
    from defectflow.submit import run_campaign

    campaign = with_overrides(frozen.load_campaign(preset, work), list(overrides))
    gen = frozen.generation()
    marker = work / "benchmark_run.json"
    if resume and marker.is_file():
        log.info("reusing the finished run in %s", work)
        return campaign, Results.for_campaign(campaign), json.loads(marker.read_text())["lf_cost"], None
    if work.exists():
        shutil.rmtree(work)
    if reuse_from is not None:
        if not (reuse_from / "benchmark_run.json").is_file():
            raise SystemExit(f"--reuse-from {reuse_from}: no finished benchmark run there")
        shutil.copytree(reuse_from / "store", work / "store")
    lf_cost = frozen.seed_relaxations(make_store(campaign.execution.store, campaign.work_dir()), campaign, preset,
                                      gen)
    t0 = time.perf_counter()

    def progress(event, name, n_done, total):
        if event == "finished":
            print(f"  [{time.perf_counter() - t0:7.0f} s] {n_done}/{total} {name}", flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_campaign(campaign, progress=progress, generation=gen)
    if run.failed_jobs:
        log.warning("failed jobs: %s", run.failures)
    wall = time.perf_counter() - t0
    marker.write_text(json.dumps({"lf_cost": lf_cost, "wall_seconds": wall}))
    return campaign, Results.for_campaign(campaign), lf_cost, wall


def defectflow_states(results) -> dict[str, dict[str, Any]]:
    from defectflow.schemas import CampaignResult, group_key

    final = results.result()
    if final is None:
        raise SystemExit("the defectflow run has no final result (see its failures.log)")
    res = CampaignResult.model_validate(final)
    return {group_key(g.defect, g.charge): {"label": g.ground_state_label, "structure": g.structure,
                                             "hf_energy": g.hf_energy, "round": g.round,
                                             "verification_error_mev_per_atom": g.verification_error_mev_per_atom}
            for g in res.ground_states}


# ---------------------------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------------------------
def hf_label(states: dict[str, dict[str, Any]], hf_settings, workdir: Path) -> dict[str, float]:
    """One HF single point per ground state (``hf_energy`` set in place); returns their calls and CPU-s."""
    from defectflow.engines import get_engine

    engine = get_engine(hf_settings, fidelity="high")
    cost = {"calls": 0, "cpu_seconds": 0.0}
    for key, st in states.items():
        st["hf_energy"] = None
        if st.get("structure") is None:
            continue
        c0 = cpu_seconds()
        frame = engine.single_point(st["structure"], st["charge"], workdir=workdir / key.replace(" ", "_"))
        cost["cpu_seconds"] += cpu_seconds() - c0
        cost["calls"] += 1
        st["hf_energy"] = frame.energy if frame.scf_converged else None
    return cost


def ablation_states(results, campaign, gen) -> dict[str, dict[str, dict[str, Any]]]:
    """Each ablation model of the last training round searched over the pipeline's own starts."""
    from defectflow.schemas import TrainingResult, group_key
    from defectflow.search import search_ground_state
    from defectflow.search.jobs import search_starts, shakenbreak_starts
    from defectflow.train.surrogate import load_calculator

    trains = results.query(step="train", load=True, properties=["name", "output"])
    if not trains:
        return {}
    last = TrainingResult.model_validate(max(trains, key=lambda d: int(d["name"].rsplit(" ", 1)[-1]))["output"])
    out: dict[str, dict[str, dict[str, Any]]] = {}
    spec = campaign.search
    for name in ABLATIONS:
        model = last.models.get(name)
        if model is None:
            continue
        out[name] = {}
        for ds in gen.distortion_sets:
            starts = search_starts(shakenbreak_starts(ds), spec, campaign.distortions.seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = search_ground_state(ds.defect, ds.charge, starts,
                                          lambda m=model: load_calculator(m, head=m.prediction_head),
                                          model=f"mace:{name}", fmax=spec.fmax, max_steps=spec.max_steps,
                                          energy_tolerance=spec.energy_tolerance,
                                          min_distance_factor=spec.min_distance_factor)
            gs = res.ground_state
            out[name][group_key(ds.defect, ds.charge)] = {
                "label": res.ground_state_label, "charge": ds.charge,
                "structure": None if gs is None else gs.structure, "search_seconds": res.wall_seconds}
    return out


def chgnet_states(results) -> dict[str, dict[str, Any]]:
    from defectflow.schemas import SearchResult, group_key

    out = {}
    for d in results.query(step="baseline", load=True, properties=["output"]):
        res = SearchResult.model_validate(d["output"])
        out[group_key(res.defect, res.charge)] = {
            "label": res.ground_state_label, "charge": res.charge,
            "structure": None if res.ground_state is None else res.ground_state.structure}
    return out


# ---------------------------------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------------------------------
def levels_of(states: dict[str, dict[str, Any]], gen, bulk: dict[str, Any], campaign) -> dict[str, float] | None:
    """Formation energies at E_F = VBM (eV) from HF energies at given ground states: the one levels call of the
    pipeline (:func:`defectflow.levels.compute_levels`), with the frozen bulk reference."""
    import contextlib
    import io

    from defectflow.levels import compute_levels
    from defectflow.schemas import LevelEntry, group_key

    entries = []
    for ds in gen.distortion_sets:
        st = states.get(group_key(ds.defect, ds.charge)) or {}
        if st.get("hf_energy") is None or st.get("structure") is None:
            return None
        entries.append(LevelEntry(defect=ds.defect, charge=ds.charge, energy=st["hf_energy"],
                                  structure=st["structure"], defect_entry=ds.defect_entry))
    lv = campaign.levels
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        res = compute_levels(entries, gen.bulk_supercell, bulk["energy"], bulk["vbm"], bulk["band_gap"],
                             correction=lv.correction, dielectric=lv.dielectric,
                             chemical_potentials=lv.chemical_potentials, plot_dir=None)
    return res.formation_energies_vbm


def compare(states: dict[str, dict[str, Any]], ref: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per 'defect q': RMSD (Å, StructureMatcher-aligned) vs the reference ground state, E_HF − E_HF,ref (meV)."""
    out = {}
    for key, r in ref.items():
        st = states.get(key) or {}
        row: dict[str, Any] = {"label": st.get("label"), "rmsd": None, "dE_hf_meV": None}
        if st.get("structure") is not None:
            row["rmsd"] = aligned_rmsd(r["structure"], st["structure"])["rmsd"]
        if st.get("hf_energy") is not None:
            row["dE_hf_meV"] = 1000 * (st["hf_energy"] - r["hf_energy"])
        out[key] = row
    return out


def method_row(states, ref, ref_fe, gen, bulk, campaign, extra_hf=None) -> dict[str, Any]:
    comp = compare(states, ref["states"])
    fe = levels_of(states, gen, bulk, campaign)
    errs = level_errors(ref_fe, fe)
    rmsds = [r["rmsd"] for r in comp.values()]
    ctl = [e["error"] for e in errs]
    return {"ground_states": comp, "formation_energies_vbm": fe, "level_errors": errs,
            "max_rmsd": None if None in rmsds else max_abs(rmsds), "max_ctl_error": None if None in ctl or not ctl
            else max_abs(ctl), "extra_hf": extra_hf}


# ---------------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--summary", action="store_true",
                   help="print every preset's and variant's results side by side (benchmarks/results/"
                   "accuracy_cost_*.json) and exit")
    p.add_argument("--preset", choices=frozen.LF_PRESETS,
                   help="close: QE PBE 12 Ry; functional: QE LDA 18 Ry; far: GFN1-xTB (benchmarks/presets/)")
    p.add_argument("--work-dir", type=Path, default=None, help="default runs/benchmarks/accuracy_cost-<preset>")
    p.add_argument("--json", type=Path, default=None, help="default benchmarks/results/accuracy_cost_<preset>.json")
    p.add_argument("--resume", action="store_true", help="reuse a finished defectflow run in the work directory")
    p.add_argument("--recompute-reference", action="store_true",
                   help="compute the missing frozen data first (hours of DFT; resumable)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="change the preset, e.g. --set verify.mode=refine --set verify.max_rounds=0 (needs --tag)")
    p.add_argument("--tag", default=None,
                   help="a name for a changed preset: JSON accuracy_cost_<preset>_<tag>.json, work directory "
                   "accuracy_cost-<preset>-<tag>")
    p.add_argument("--reuse-from", type=Path, default=None, metavar="DIR",
                   help="copy the store of a finished run (e.g. runs/benchmarks/accuracy_cost-far) and reuse every "
                   "job the --set changes leave unchanged; costs are counted as if run (Results.cost(as_fresh))")
    p.add_argument("--no-baselines", action="store_true",
                   help="leave out the ablation and CHGNet searches and their HF single points (~20 min); the "
                   "lf_snb baseline (frozen data) stays")
    p.add_argument("--show", action="store_true", help="print the tables of the existing JSON and exit")
    p.add_argument("--refresh-reference", action="store_true",
                   help="after `reference.py compute --redo`: update every report's reference cost, ratios and goals "
                   "to the frozen data as it is now, without running anything (a report whose reference ground "
                   "state changed is left for a new run)")
    args = p.parse_args(argv)
    if args.refresh_reference:
        ref = load_reference(None, False)
        for path in sorted(RESULTS.glob("accuracy_cost_*.json")):
            print(refresh_reference(path, ref["manifest"], ref["manifest_sha256"], ref["states"]))
        return {}
    if not args.summary and args.preset is None:
        p.error("the following arguments are required: --preset (or --summary)")
    if args.set and not args.tag:
        p.error("--set changes the preset: give the variant a name with --tag")
    suffix = f"_{args.tag}" if args.tag else ""
    out_json = args.json or RESULTS / f"accuracy_cost_{args.preset}{suffix}.json"
    if args.summary:
        print(summary(sorted(RESULTS.glob("accuracy_cost_*.json"))))
        return {}
    if args.show:
        if not out_json.is_file():
            raise SystemExit(f"{out_json}: no results for preset {args.preset!r} yet (run without --show)")
        print(render(json.loads(out_json.read_text())))
        return {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("pymatgen", "doped", "shakenbreak", "jobflow", "defectflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work = args.work_dir or ROOT / "runs" / "benchmarks" / f"accuracy_cost-{args.preset}{suffix.replace('_', '-')}"
    t_start = time.perf_counter()

    print(f"[1/3] frozen reference ({frozen.DATA}) ...", flush=True)
    ref = load_reference(args.preset, args.recompute_reference)
    gen = frozen.generation()

    print(f"[2/3] defectflow, preset {args.preset} (LF relaxations from the frozen data) ...", flush=True)
    campaign, results, lf_cost, df_wall = run_defectflow(args.preset, work, args.resume, args.set, args.reuse_from)
    # reused jobs (--reuse-from) count what they cost when they ran: the cost of this campaign from scratch
    cost_rows = results.cost(as_fresh=True)
    from defectflow.steps import HF_STEPS

    hf_rows = [r for r in cost_rows if r["step"] in HF_STEPS]
    df_cost = {"hf_calls": sum(r["hf_calls"] for r in hf_rows), "hf_cpu_seconds": sum(r["cpu_s"] for r in hf_rows),
               "lf_relaxations_frozen": lf_cost, "by_step": cost_rows}
    by_step = {r["step"]: r for r in cost_rows}
    # the frozen LF relaxations stand in for a run's: their measured cost, not the lookup's
    by_step["relax_lf"] = {**by_step.get("relax_lf", {}), "cpu_s": lf_cost["cpu_seconds"],
                           "wall_s": lf_cost["wall_seconds"], "frozen": True}
    df_cost["by_step"] = sorted(by_step.values(), key=lambda r: r.get("step", ""))
    # HF jobs that shared the cores with other work cost more CPU-s than on a quiet machine (bench_utils). Checked on
    # the steps whose jobs are HF calls only: verify and refine jobs also run the surrogate on one core (share ~0.8)
    procs = getattr(campaign.fidelities.high, "mpi_procs", None) or 1
    df_cost["contended_hf_steps"] = contended_steps(cost_rows, set(HF_STEPS) - {"verify", "refine"}, procs)
    df_cost["total_cpu_seconds"] = sum(r.get("cpu_s", 0.0) for r in by_step.values()
                                       if r.get("step") != "baseline")

    print("[3/3] baselines: ablations, CHGNet, LF ShakeNBreak + 1 HF single point ...", flush=True)
    t0 = time.perf_counter()
    bulk, ref_fe = ref["bulk"], ref["summary"]["formation_energies_vbm"]
    hf_settings = campaign.fidelities.high
    methods = {"defectflow": method_row(defectflow_states(results), ref, ref_fe, gen, bulk, campaign)}
    for name, states in ({} if args.no_baselines else ablation_states(results, campaign, gen)).items():
        extra = hf_label(states, hf_settings, work / "extra_hf" / name)
        methods[name] = method_row(states, ref, ref_fe, gen, bulk, campaign, extra)
    chg = {} if args.no_baselines else chgnet_states(results)
    if chg:
        extra = hf_label(chg, hf_settings, work / "extra_hf" / "chgnet")
        methods["chgnet"] = method_row(chg, ref, ref_fe, gen, bulk, campaign, extra)
    lf = frozen.lf_snb_states(args.preset, gen)
    methods["lf_snb"] = method_row(lf, ref, ref_fe, gen, bulk, campaign, {"calls": len(lf), "from": "frozen pool"})
    baseline_seconds = time.perf_counter() - t0

    rm = ref["manifest"]
    ratios, goals = judge(rm["hf_calls"], rm["hf_cpu_seconds"], df_cost, methods)
    report = {
        "benchmark": "accuracy_cost", "version": 2, "preset": args.preset, "machine": machine(),
        "variant": {"tag": args.tag, "set": args.set,
                    "reused_from": None if args.reuse_from is None else str(args.reuse_from)},
        "campaign": f"benchmarks/presets/{args.preset}.yaml",
        "engines": {"lf": campaign.fidelities.low.model_dump(mode="json"), "hf": hf_settings.model_dump(mode="json")},
        "starts_per_charge_state": {str(k): v for k, v in rm["starts_per_charge"].items()},
        "reference": {"frozen": True, "manifest_sha256": ref["manifest_sha256"], "hf_calls": rm["hf_calls"],
                      "hf_cpu_seconds": rm["hf_cpu_seconds"], "frames": rm["frames"],
                      "ground_states": {k: {"label": v["label"], "hf_energy": v["hf_energy"],
                                            "energy_lowering": v["energy_lowering"]} for k, v in ref["states"].items()},
                      "formation_energies_vbm": ref_fe, "transition_levels": ref["summary"]["transition_levels"]},
        "defectflow": {"cost": df_cost, "wall_seconds": df_wall},
        "methods": methods, "ratios": ratios, "goals": goals,
        "wall_seconds": {"defectflow": df_wall, "baselines": baseline_seconds,
                         "this_invocation": time.perf_counter() - t_start},
    }
    report = rounded(json.loads(json.dumps(report, default=str)), 5)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=1) + "\n")
    print()
    print(render(report))
    print(f"\nJSON: {out_json}")
    return report


def judge(ref_calls: int, ref_cpu_s: float, df_cost: dict[str, Any],
          methods: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The cost ratios against the frozen direct-HF search (its HF calls and CPU-s) and issue #14's four goals."""
    ratios = {"hf_calls": ratio(ref_calls, df_cost["hf_calls"]),
              "hf_cpu": ratio(ref_cpu_s, df_cost["hf_cpu_seconds"])}
    main_m, base = methods["defectflow"], methods["lf_snb"]
    not_worse = (main_m["max_rmsd"] is not None and base["max_rmsd"] is not None
                 and main_m["max_rmsd"] <= base["max_rmsd"] + 1e-3
                 and main_m["max_ctl_error"] is not None and base["max_ctl_error"] is not None
                 and main_m["max_ctl_error"] <= base["max_ctl_error"] + 1e-3)
    goals = [
        {"goal": "CTL |error| ≤ 0.02 eV", "value": main_m["max_ctl_error"], "unit": "eV",
         "verdict": verdict(main_m["max_ctl_error"], GOALS["ctl_error_eV"])},
        {"goal": "ground-state RMSD ≤ 0.05 Å in every charge state", "value": main_m["max_rmsd"], "unit": "Å",
         "verdict": verdict(main_m["max_rmsd"], GOALS["gs_rmsd_A"])},
        {"goal": "≥ 30× fewer HF CPU-seconds than the direct-HF search", "value": ratios["hf_cpu"], "unit": "×",
         "verdict": verdict(ratios["hf_cpu"], GOALS["hf_cpu_ratio"], higher_is_better=True)},
        {"goal": "never less accurate than LF ShakeNBreak + 1 HF single point per q", "value": None, "unit": "",
         "verdict": "met" if not_worse else "MISSED"},
    ]
    return ratios, goals


def refresh_reference(path: Path, manifest: dict[str, Any], manifest_sha: str,
                      states: dict[str, dict[str, Any]]) -> str:
    """Bring a v2 report's reference cost (HF calls, CPU-s, frames), ratios and goals up to the current frozen data
    without running anything: for a reference whose relaxations were recomputed (``reference.py compute --redo``)
    with the same ground states. A changed ground state (label, or energy by more than 0.1 meV) changes every
    method's error: that report is left as it is and must be run again. Returns one line saying what happened."""
    r = json.loads(path.read_text())
    if r.get("version") != 2 or "preset" not in r:
        return f"{path.name}: not a v2 report, left as it is"
    old = r["reference"]
    changed = [k for k, g in old["ground_states"].items()
               if k not in states or states[k]["label"] != g["label"]
               or abs(states[k]["hf_energy"] - g["hf_energy"]) > 1e-4]
    if changed:
        return f"{path.name}: reference ground state changed for {', '.join(changed)}: run it again"
    before = (old["hf_cpu_seconds"], r["ratios"]["hf_cpu"])
    if (old["hf_calls"], old["hf_cpu_seconds"], old["frames"]) == (
            manifest["hf_calls"], round(manifest["hf_cpu_seconds"], 5), manifest["frames"]):
        return f"{path.name}: reference cost unchanged ({before[0]:.0f} HF CPU-s), left as it is"
    old.update({"manifest_sha256": manifest_sha, "hf_calls": manifest["hf_calls"],
                "hf_cpu_seconds": manifest["hf_cpu_seconds"], "frames": manifest["frames"]})
    r["ratios"], r["goals"] = judge(manifest["hf_calls"], manifest["hf_cpu_seconds"], r["defectflow"]["cost"],
                                    r["methods"])
    path.write_text(json.dumps(rounded(r, 5), indent=1) + "\n")
    return (f"{path.name}: reference {before[0]:.0f} -> {manifest['hf_cpu_seconds']:.0f} HF CPU-s, ratio "
            f"{before[1]:.1f}x -> {r['ratios']['hf_cpu']:.1f}x")


#: the steps that are not the defectflow side's wall time: the frozen LF relaxations (looked up) and the
#: foundation-model baseline searches
NOT_DEFECTFLOW_WALL = ("relax_lf", "baseline")


def defectflow_wall_minutes(r: dict[str, Any]) -> float:
    """The defectflow side's wall time as if run from scratch, min: the sum of its jobs' wall seconds (they run one
    after the other here), reused jobs at what they took when they ran, without the frozen LF relaxations and the
    baseline searches."""
    return sum(row.get("wall_s", 0.0) for row in r["defectflow"]["cost"]["by_step"]
               if row.get("step") not in NOT_DEFECTFLOW_WALL) / 60


def summary(paths: list[Path]) -> str:
    """Every v2 result side by side (one row per preset and variant): the issue's goals per q and the cost; under
    each preset's own run (no variant tag) the baseline "LF ShakeNBreak + 1 HF single point per q" of that run, on
    the same starts, whose accuracy the fourth goal compares with."""
    rows = []

    def cells(m: dict[str, Any], keys: list[str]) -> list[str]:
        gs = [m["ground_states"][k] for k in keys]
        return [" / ".join("—" if g["rmsd"] is None else f"{g['rmsd']:.3f}" for g in gs),
                " / ".join("—" if g["dE_hf_meV"] is None else f"{g['dE_hf_meV']:+.0f}" for g in gs),
                ", ".join("—" if e["error"] is None else f"{e['error']:+.3f}"
                          for e in sorted(m["level_errors"], key=lambda e: (e["defect"], e["q_to"])))]

    for path in paths:
        r = json.loads(path.read_text())
        if r.get("version") != 2 or "preset" not in r:
            continue  # a v1 report
        keys = sorted(r["reference"]["ground_states"], key=lambda k: int(k.rsplit(" ", 1)[1]))
        tag = (r.get("variant") or {}).get("tag")
        verdict = {g["goal"].split()[0]: g["verdict"] for g in r["goals"]}
        rows.append([
            f"{r['preset']}" + (f" ({tag})" if tag else ""),
            *cells(r["methods"]["defectflow"], keys),
            f"{r['defectflow']['cost']['hf_calls']} / {r['defectflow']['cost']['hf_cpu_seconds']:.0f}",
            f"{r['ratios']['hf_cpu']:.1f}×",
            f"{defectflow_wall_minutes(r):.1f}",
            " / ".join(verdict.get(k, "?") for k in ("ground-state", "CTL", "≥", "never")),
        ])
        if not tag and "lf_snb" in r["methods"]:
            rows.append([f"{r['preset']}: LF SnB + 1 HF SP", *cells(r["methods"]["lf_snb"], keys),
                         f"{len(keys)} + the LF search", "", "", ""])
    heads = ["preset (variant)", "GS RMSD per q, Å", "E_HF − E_HF,ref per q, meV", "ε(q+1/q) errors, eV",
             "HF calls / CPU-s", "HF CPU ratio", "defectflow wall, min", "goals RMSD / CTL / 30× / ≥ LF SnB"]
    return ("Every v2 result (q in increasing order, so ε(+1/0) first; wall: the "
            "defectflow side from scratch, frozen LF relaxations and baselines excluded)\n" + table(heads, rows))


def render(r: dict[str, Any]) -> str:
    """The printed (and docs/benchmarks.md) tables from a report."""
    var = r.get("variant") or {}
    tag = ""
    if var.get("tag"):
        reused = f"; jobs reused from {var['reused_from']}" if var.get("reused_from") else ""
        tag = f", variant `{var['tag']}` ({', '.join(var.get('set') or [])}{reused})"
    out = [f"## accuracy_cost, preset `{r['preset']}` ({r['engines']['lf'].get('xc')} LF){tag}: v_Si, starts per q "
           f"{r['starts_per_charge_state']}", ""]
    methods = list(r["methods"])
    keys = list(r["reference"]["ground_states"])
    rows = []
    for k in keys:
        row = [k, r["reference"]["ground_states"][k]["label"]]
        for m in methods:
            g = r["methods"][m]["ground_states"][k]
            cell = "—" if g["rmsd"] is None else f"{g['rmsd']:.3f}"
            cell += "" if g["dE_hf_meV"] is None else f" ({g['dE_hf_meV']:+.0f})"
            row.append(cell)
        rows.append(row)
    out.append("Ground-state RMSD vs the frozen direct-HF search, Å (E_HF − E_HF,ref in meV)")
    out.append(table(["defect q", "reference GS", *methods], rows))
    out.append("")
    rows = []
    for i, e in enumerate(r["methods"]["defectflow"]["level_errors"]):
        row = [f"{e['defect']} ε({e['q_from']:+d}/{e['q_to']:+d})", e["reference"]]
        for m in methods:
            x = r["methods"][m]["level_errors"][i]
            row.append("—" if x["error"] is None else f"{x['level']:.3f} ({x['error']:+.3f})")
        rows.append(row)
    out.append("Charge-transition levels, eV above the VBM (error vs the reference)")
    out.append(table(["level", "reference", *methods], rows))
    out.append("")
    d, ref = r["defectflow"]["cost"], r["reference"]
    out.append("HF cost (CPU-s: getrusage of the HF engine's processes, the same way on both sides)")
    out.append(table(["", "HF calls", "HF CPU-s"], [
        ["frozen direct-HF search", ref["hf_calls"], ref["hf_cpu_seconds"]],
        ["defectflow", d["hf_calls"], d["hf_cpu_seconds"]],
        ["ratio", r["ratios"]["hf_calls"], r["ratios"]["hf_cpu"]]], digits=1))
    for step, share in (d.get("contended_hf_steps") or {}).items():
        out.append(f"contended: {step} ran at {share:.2f} of its cores (< {CLEAN_CORE_SHARE}): its CPU-s are inflated")
    out.append("")
    out.append("defectflow cost per step (relax_lf: the frozen LF relaxations' measured cost)")
    out.append(table(["step", "jobs", "reused", "CPU-s", "wall-s", "HF calls"],
                     [[s.get("step"), s.get("jobs"), s.get("reused"), s.get("cpu_s"), s.get("wall_s"),
                       s.get("hf_calls")] for s in d["by_step"]], digits=1))
    out.append("")
    out.append(table(["method", "max RMSD Å", "max |CTL error| eV", "extra HF calls"],
                     [[m, x["max_rmsd"], x["max_ctl_error"], (x.get("extra_hf") or {}).get("calls")]
                      for m, x in r["methods"].items()]))
    out.append("")
    out.append(table(["goal", "measured", "verdict"],
                     [[g["goal"], None if g["value"] is None else f"{g['value']:.3f} {g['unit']}", g["verdict"]]
                      for g in r["goals"]]))
    w = r["wall_seconds"]
    out.append("")
    out.append("Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in w.items() if v is not None))
    return "\n".join(out)


if __name__ == "__main__":
    main()
