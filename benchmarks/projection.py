"""Cost projection to production scale (issue #14), worked out from measured counts.

    .venv/bin/python benchmarks/projection.py                  # every preset with an accuracy_cost JSON
    .venv/bin/python benchmarks/projection.py --show           # the tables of benchmarks/results/projection.json

Question: what HF cost would defectflow save on the paper's campaign (Sb2Se3 vacancies, HSE06 on VASP), against a
direct HSE06 ShakeNBreak search? Nothing here runs DFT. The inputs:

**Measured on this machine** (the frozen reference, ``benchmarks/data``):

* ionic steps per direct-HF relaxation, and HF CPU-s per ionic step, per q;
* HF CPU-s per *fresh* HF single point (the pools' labels: no wavefunction to start from), per q; so the cost of a
  single point in units of one ionic step (``sp_over_step``);
* per LF preset, the HF calls defectflow made per (defect, q) (``benchmarks/results/accuracy_cost_<preset>.json``:
  selection + verification + top-up rounds, without the one bulk single point).

**Counted** from ``workflows/sb2se3_vasp.yaml``: its (defect, q) groups and ShakeNBreak starts, by running step 1
(doped + ShakeNBreak, seed 42; about 30 s).

**Assumed** (not measurable here; each is a command-line option and printed with the result):

* ``--steps-per-relaxation``: ionic steps of a production HSE06 relaxation (default: the reference's measured mean,
  plus the table's 100 and 200 for a 159-atom cell at fmax 0.01 eV/Å);
* ``--sp-over-step``: a fresh HSE06 single point in units of one ionic step (default: the measured ratio here);
* ``--lf-step-cost``: one PBE ionic step in units of one HSE06 ionic step, for the total that counts the LF
  relaxations too (default 0.05, i.e. HSE06 20× PBE per step; printed beside 0.02 and 0.1).

HF cost is in HSE06-ionic-step units on both sides, so it does not depend on the cell's absolute cost. Output: a
table on stdout and ``benchmarks/results/projection.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frozen  # noqa: E402
from bench_utils import rounded, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PRODUCTION = ROOT / "workflows" / "sb2se3_vasp.yaml"


def measured_reference() -> dict[str, Any]:
    """Steps per relaxation, CPU-s per step and per fresh single point (per q and overall), from the frozen data."""
    steps, cpu, n = defaultdict(int), defaultdict(float), defaultdict(int)
    for row in frozen.relaxation_index("hf").values():
        q = str(row["charge"])
        steps[q] += row["n_steps"]
        cpu[q] += row["cpu_seconds"]
        n[q] += 1
    sp = defaultdict(list)
    for preset in frozen.LF_PRESETS:
        done = frozen.read_json(frozen.DATA / "lf" / preset / "pool_index.json", {}).get("done", {})
        for key, v in done.items():
            if v.get("cpu_seconds") and v.get("error") is None:
                q = key.split("__")[0].rsplit("_", 1)[-1]
                sp[str(int(q))].append(v["cpu_seconds"])
    per_q = {}
    for q in sorted(n, key=int):
        step_cost = cpu[q] / steps[q]
        sp_cost = sum(sp[q]) / len(sp[q]) if sp.get(q) else None
        per_q[q] = {"relaxations": n[q], "steps_per_relaxation": steps[q] / n[q], "cpu_s_per_step": step_cost,
                    "single_points": len(sp.get(q, [])), "cpu_s_per_single_point": sp_cost,
                    "sp_over_step": None if sp_cost is None else sp_cost / step_cost}
    all_steps, all_n = sum(steps.values()), sum(n.values())
    ratios = [v["sp_over_step"] for v in per_q.values() if v["sp_over_step"] is not None]
    return {"per_q": per_q, "steps_per_relaxation": all_steps / all_n,
            "sp_over_step": sum(ratios) / len(ratios) if ratios else None}


def measured_calls() -> dict[str, dict[str, Any]]:
    """Per preset with a v2 accuracy_cost JSON: defectflow's HF calls per (defect, q), without the bulk one."""
    out = {}
    for preset in frozen.LF_PRESETS:
        path = RESULTS / f"accuracy_cost_{preset}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        if r.get("version") != 2:
            continue
        by_step = {s["step"]: s for s in r["defectflow"]["cost"]["by_step"]}
        bulk = (by_step.get("bulk_hf") or {}).get("hf_calls", 0) or 0
        groups = len(r["reference"]["ground_states"])
        calls = r["defectflow"]["cost"]["hf_calls"] - bulk
        out[preset] = {"hf_calls": calls, "groups": groups, "calls_per_group": calls / groups,
                       "goals_met": [g["goal"] for g in r["goals"] if g["verdict"] == "met"]}
    return out


def production_starts(path: Path = PRODUCTION) -> dict[str, int]:
    """'defect q' → ShakeNBreak starts of the production campaign (step 1 run for real)."""
    from defectflow.campaign import Campaign
    from defectflow.generate import generate
    from defectflow.schemas import group_key

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = generate(Campaign.from_yaml(path))
    return {group_key(ds.defect, ds.charge): len(ds.structures) for ds in gen.distortion_sets}


def project(starts: dict[str, int], steps_per_relaxation: float, calls_per_group: float, sp_over_step: float,
            lf_step_cost: float) -> dict[str, float]:
    """HF cost of both sides in HF-ionic-step units, and their ratios.

    direct = Σ starts × steps; defectflow HF = groups × calls × sp_over_step; defectflow total adds the LF
    relaxations of every start (same step count) at ``lf_step_cost`` HF steps per LF step.
    """
    n_starts, groups = sum(starts.values()), len(starts)
    direct = n_starts * steps_per_relaxation
    hf = groups * calls_per_group * sp_over_step
    lf = n_starts * steps_per_relaxation * lf_step_cost
    return {"direct_hf_steps": direct, "defectflow_hf_steps": hf, "defectflow_lf_steps_in_hf_units": lf,
            "hf_ratio": direct / hf if hf > 0 else float("inf"),
            "total_ratio": direct / (hf + lf) if hf + lf > 0 else float("inf")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--steps-per-relaxation", type=float, nargs="+", default=None,
                   help="production HSE06 ionic steps per relaxation (default: measured mean, 100, 200)")
    p.add_argument("--sp-over-step", type=float, default=None,
                   help="a fresh HF single point in ionic steps (default: measured here)")
    p.add_argument("--lf-step-cost", type=float, nargs="+", default=[0.02, 0.05, 0.1],
                   help="PBE ionic step in HSE06 ionic steps (assumed; default 0.02 0.05 0.1)")
    p.add_argument("--json", type=Path, default=RESULTS / "projection.json")
    p.add_argument("--show", action="store_true", help="print the tables of the existing JSON and exit")
    a = p.parse_args(argv)
    if a.show:
        data = json.loads(a.json.read_text())
        print(render(data))
        return data
    ref = measured_reference()
    calls = measured_calls()
    starts = production_starts()
    steps = a.steps_per_relaxation or [round(ref["steps_per_relaxation"], 1), 100.0, 200.0]
    sp_over = a.sp_over_step or ref["sp_over_step"]
    rows = []
    for preset, c in calls.items():
        for s in steps:
            for lf in a.lf_step_cost:
                rows.append({"preset": preset, "calls_per_group": c["calls_per_group"], "steps_per_relaxation": s,
                             "sp_over_step": sp_over, "lf_step_cost": lf,
                             **project(starts, s, c["calls_per_group"], sp_over, lf)})
    data = rounded({"benchmark": "projection", "measured": ref, "defectflow_calls": calls,
                    "production": {"campaign": str(PRODUCTION.relative_to(ROOT)), "groups": len(starts),
                                   "starts": sum(starts.values()), "starts_per_group": starts},
                    "rows": rows}, 5)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(data, indent=1) + "\n")
    print(render(data))
    return data


def render(d: dict[str, Any]) -> str:
    m, prod = d["measured"], d["production"]
    out = ["Measured on the frozen reference (v_Si, 15 atoms, QE PBE 18 Ry, 2 cores)",
           table(["q", "relaxations", "steps / relaxation", "CPU-s / step", "single points", "CPU-s / single point",
                  "single point / step"],
                 [[q, v["relaxations"], v["steps_per_relaxation"], v["cpu_s_per_step"], v["single_points"],
                   v["cpu_s_per_single_point"], v["sp_over_step"]] for q, v in m["per_q"].items()], digits=2),
           "", f"Production campaign {prod['campaign']}: {prod['groups']} (defect, q), {prod['starts']} "
           "ShakeNBreak starts (step 1 run here)", ""]
    if not d["rows"]:
        out.append("No defectflow HF calls measured yet: run benchmarks/accuracy_cost.py --preset NAME first.")
        return "\n".join(out)
    out.append("Projected HF cost, in HSE06 ionic steps (direct: every start relaxed with HSE06; defectflow: its "
               "measured HF calls per (defect, q) as fresh single points)")
    out.append(table(["preset", "HF calls / (defect, q)", "steps / relaxation", "LF step cost (assumed)",
                      "direct HF", "defectflow HF", "HF ratio", "ratio incl. LF"],
                     [[r["preset"], r["calls_per_group"], r["steps_per_relaxation"], f"{r['lf_step_cost']:g}",
                       r["direct_hf_steps"], r["defectflow_hf_steps"], r["hf_ratio"], r["total_ratio"]]
                      for r in d["rows"]], digits=1))
    return "\n".join(out)


if __name__ == "__main__":
    main()
