"""Benchmark: time to build (not run) the campaign graph for N defects × Q charges × D distortions.

    .venv/bin/python benchmarks/graph_construction.py            # 50 × 5 × 15 (the issue's target: seconds)
    .venv/bin/python benchmarks/graph_construction.py --defects 10 --json out.json

Generation (doped + ShakeNBreak) is not part of this figure: a synthetic GenerationResult with 63-atom cells is
built first, then DefectCampaignMaker.make() is timed. Prints a table and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from pymatgen.core import Lattice, Structure

from defectflow.campaign import Campaign
from defectflow.flows import DefectCampaignMaker
from defectflow.generate import DistortedStructure, DistortionSet, GenerationResult


def synthetic_generation(n_defects: int, n_charges: int, n_distortions: int) -> GenerationResult:
    bulk = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]])
    bulk.make_supercell(2)
    defect = bulk.copy()
    defect.remove_sites([0])
    sets = []
    charges = list(range(-(n_charges // 2), n_charges - n_charges // 2))
    for d in range(n_defects):
        for q in charges:
            starts = [DistortedStructure(label=f"Bond_Distortion_{10 * k:.1f}%", bond_distortion=k / 10,
                                         structure=Structure(defect.lattice, defect.species, defect.frac_coords,
                                                             charge=q))
                      for k in range(n_distortions)]
            sets.append(DistortionSet(defect=f"v_Si_{d}", charge=q, defect_type="vacancy",
                                      num_distorted_neighbours=4, structures=starts))
    return GenerationResult(campaign="bench", host_formula="Si", bulk_supercell=bulk,
                            charges={f"v_Si_{d}": charges for d in range(n_defects)},
                            charge_source={f"v_Si_{d}": "campaign" for d in range(n_defects)},
                            distortion_sets=sets)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--defects", type=int, default=50)
    p.add_argument("--charges", type=int, default=5)
    p.add_argument("--distortions", type=int, default=15)
    p.add_argument("--steps", choices=["all", "lf"], default="all", help="whole graph, or steps 1-2 only")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    a = p.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    campaign = Campaign.from_dict({"name": "bench", "host": {"structure": str(root / "workflows/structures/Si.POSCAR")},
                                   "fidelities": {"low": {"engine": "ase", "calculator": "ase.calculators.emt.EMT"},
                                                  "high": {"engine": "ase", "calculator": "ase.calculators.emt.EMT"}}})
    t0 = time.perf_counter()
    gen = synthetic_generation(a.defects, a.charges, a.distortions)
    t_gen = time.perf_counter() - t0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    flow = DefectCampaignMaker(check_engines=False, steps=a.steps).make(campaign, gen)
    t_build = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_jobs = len(flow.jobs)
    result = {
        "defects": a.defects, "charges": a.charges, "distortions": a.distortions, "steps": a.steps,
        "structures": gen.n_structures, "jobs": n_jobs,
        "synthetic_generation_s": round(t_gen, 3), "graph_build_s": round(t_build, 3),
        "ms_per_job": round(1000 * t_build / n_jobs, 3), "peak_rss_MB": round(rss1 / 1024, 1), "rss_growth_MB": round((rss1 - rss0) / 1024, 1),
    }
    width = max(map(len, result))
    print("graph construction (DefectCampaignMaker.make, no execution)")
    for k, v in result.items():
        print(f"  {k:<{width}}  {v}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
