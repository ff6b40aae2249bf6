"""Benchmark: store bookkeeping per job of a local run as campaigns grow (500 → 5000 LF jobs).

    nice -n 19 .venv/bin/python benchmarks/store_scale.py                  # 500, 2000 and 5000 jobs
    nice -n 19 .venv/bin/python benchmarks/store_scale.py --jobs 500 2000  # pick the sizes
    .venv/bin/python benchmarks/store_scale.py --jobs 500 --backend montydb   # the pre-0.2 embedded store

Each size is a real ``run_campaign(..., steps="lf")`` of GaAs (v_Ga, v_As, Ga_As, As_Ga, q = -2…+2, in a
64-atom cell) with as many ShakeNBreak bond distortions per (defect, q) as the size needs. The LF engine is ASE's
Lennard-Jones calculator with two ionic steps, so the engine's own work is milliseconds and what is left is
defectflow's and jobflow's bookkeeping: resolving job inputs from the store, writing job documents and big data,
the resume (cache-key) lookups, folders, summaries and the final queries.

Measured per size: the graph build (doped + ShakeNBreak, not counted as bookkeeping), the run phase (first job
started → ``run_campaign`` returned), the engine seconds (wall and CPU seconds spent inside the ASE engine's
``relax`` / ``single_point``, timed in-process), and

    bookkeeping_s_per_job     = (run phase − engine seconds) / jobs      (wall clock)
    bookkeeping_share         = (run phase − engine seconds) / whole wall time
    bookkeeping_cpu_s_per_job = (CPU of the run phase − engine CPU) / jobs (what other programs on the machine
                                                                          cannot inflate)

Goals (issue): ≤ 0.2 s per job at 4000 jobs and ≤ 20 % growth per job from 500 to 5000 jobs. Writes
``benchmarks/results/store_scale.json`` (a list of records, one per size; ``--json`` for another path).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFECTS = ["v_Ga", "v_As", "Ga_As", "As_Ga"]
CHARGES = [-2, -1, 0, 1, 2]
#: Lennard-Jones with its minimum at the GaAs bond length (2.45 Å = 2^(1/6) σ)
LJ = {"engine": "ase", "calculator": "ase.calculators.lj.LennardJones", "xc": "LJ",
      "kwargs": {"sigma": 2.18, "epsilon": 0.1, "rc": 5.0}, "spin": "off"}


def gaas_poscar(path: Path) -> Path:
    """Conventional zinc-blende GaAs (a = 5.653 Å, 8 atoms) as a POSCAR."""
    from pymatgen.core import Lattice, Structure

    s = Structure.from_spacegroup("F-43m", Lattice.cubic(5.653), ["Ga", "As"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    s.to(filename=str(path), fmt="poscar")
    return path


def campaign_for(n_jobs: int, work: Path, poscar: Path) -> dict:
    """A campaign of about ``n_jobs`` LF relaxations: 4 defects × 5 charges × (bond distortions + Unperturbed)."""
    groups = len(DEFECTS) * len(CHARGES)
    per_group = max(2, math.ceil(n_jobs / groups))
    n_dist = per_group - 1  # + Unperturbed
    # evenly spread in [-0.6, 0.6], 0 left out (that is the Unperturbed start), distinct at ShakeNBreak's 0.1 %
    grid = [round(-0.6 + 1.2 * k / max(n_dist, 1), 4) for k in range(n_dist + 1)]
    grid = sorted({x for x in grid if abs(x) > 5e-4})[:n_dist]
    return {
        "name": f"store-scale-{n_jobs}",
        "host": {"structure": str(poscar), "supercell": {"matrix": [[2, 0, 0], [0, 2, 0], [0, 0, 2]]},
                 "oxidation_states": {"Ga": 3, "As": -3}},
        "defects": {"include": DEFECTS},
        "charges": CHARGES,
        "distortions": {"bond_distortions": grid, "dimer": False},
        "fidelities": {"low": LJ, "high": LJ},
        "relax": {"fmax": 0.01, "max_steps": 2},
        "execution": {"work_dir": str(work)},
    }


class _EngineClock:
    """Wall and CPU seconds spent inside the ASE engine's relax / single_point (the engine's own work), summed."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        from defectflow.engines.ase import AseEngine

        self._saved = {name: getattr(AseEngine, name) for name in ("relax", "single_point")}
        clock = self

        def timed(fn):
            def wrapper(*args, **kwargs):
                w, c = time.perf_counter(), time.process_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    clock.wall += time.perf_counter() - w
                    clock.cpu += time.process_time() - c
            return wrapper

        for name, fn in self._saved.items():
            setattr(AseEngine, name, timed(fn))
        return self

    def __exit__(self, *exc):
        from defectflow.engines.ase import AseEngine

        for name, fn in self._saved.items():
            setattr(AseEngine, name, fn)
        return False


def measure(n_jobs: int, scratch: Path, backend: str | None) -> dict:
    from defectflow.campaign import Campaign
    from defectflow.submit import run_campaign

    if backend:
        os.environ["DEFECTFLOW_EMBEDDED_BACKEND"] = backend
    work = scratch / f"run-{n_jobs}"
    shutil.rmtree(work, ignore_errors=True)
    campaign = Campaign.from_dict(campaign_for(n_jobs, work, gaas_poscar(scratch / "GaAs.POSCAR")))
    marks: dict[str, float] = {}
    engine = _EngineClock()

    def progress(event, name, done, total):
        if "first_start" not in marks:
            marks["first_start"], marks["first_cpu"] = time.perf_counter(), time.process_time()
        if done and done % max(1, total // 10) == 0 and event == "finished":
            marks[f"done_{done}"] = time.perf_counter()

    t0, c0 = time.perf_counter(), time.process_time()
    with engine:
        result = run_campaign(campaign, progress=progress, steps="lf")
    t_end, c_end = time.perf_counter(), time.process_time()
    wall = t_end - t0
    build = marks.get("first_start", t_end) - t0
    run_phase = t_end - marks.get("first_start", t0)

    from defectflow.results import Results
    from defectflow.store import make_store

    r = Results(make_store(campaign.execution.store, work), campaign.name, run=result.flow_uuid)
    n_relax = len(r.query(step="relax_lf", properties=["name"]))
    engine_s = engine.wall
    bookkeeping = max(run_phase - engine_s, 0.0)
    # CPU seconds of this process in the run phase minus the engine's: the figure that does not grow when other
    # programs share the cores
    bookkeeping_cpu = max(c_end - marks.get("first_cpu", c0) - engine.cpu, 0.0)
    rec = {
        "jobs": result.n_jobs,
        "relaxations": n_relax,
        "failed": len(result.failed_jobs),
        "backend": os.environ.get("DEFECTFLOW_EMBEDDED_BACKEND", "sqlite"),
        "graph_build_s": round(build, 2),
        "run_phase_s": round(run_phase, 2),
        "engine_s": round(engine_s, 2),
        "engine_cpu_s": round(engine.cpu, 2),
        "wall_s": round(wall, 2),
        "bookkeeping_s_per_job": round(bookkeeping / max(result.n_jobs, 1), 4),
        "bookkeeping_share": round(bookkeeping / wall, 3) if wall else None,
        "bookkeeping_cpu_s_per_job": round(bookkeeping_cpu / max(result.n_jobs, 1), 4),
        "store_mb": round(sum(f.stat().st_size for f in (work / "store").rglob("*") if f.is_file()) / 1e6, 1)
        if (work / "store").is_dir() else None,
    }
    return rec


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, nargs="+", default=[500, 2000, 5000], help="campaign sizes (LF jobs)")
    p.add_argument("--backend", choices=["sqlite", "montydb"],
                   help="embedded store backend (default: defectflow's default; montydb = the pre-0.2 store)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "store_scale.json")
    p.add_argument("--keep", type=Path, help="keep the run folders here (default: a temporary folder, removed)")
    a = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=r"(?s).*contextlib\.chdir")  # monty's cd, once per job
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    scratch = a.keep or Path(tempfile.mkdtemp(prefix="store-scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    records = []
    try:
        for n in a.jobs:
            rec = measure(n, scratch, a.backend)
            records.append(rec)
            print(f"{rec['jobs']:>6} jobs  backend {rec['backend']:<8} build {rec['graph_build_s']:7.1f} s  "
                  f"run {rec['run_phase_s']:8.1f} s  engine {rec['engine_s']:6.1f} s  "
                  f"bookkeeping {rec['bookkeeping_s_per_job']:.4f} s/job ({100 * rec['bookkeeping_share']:.0f} % "
                  f"of wall; CPU {rec['bookkeeping_cpu_s_per_job']:.4f} s/job)", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    if len(records) > 1:
        lo, hi = records[0], records[-1]
        for key, what in (("bookkeeping_s_per_job", "wall"), ("bookkeeping_cpu_s_per_job", "CPU")):
            growth = hi[key] / lo[key] - 1 if lo[key] else None
            print(f"growth of bookkeeping {what} seconds per job, {lo['jobs']} → {hi['jobs']} jobs: "
                  f"{'-' if growth is None else f'{100 * growth:+.0f} %'} (goal ≤ +20 %)")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {a.json}")
    return records


if __name__ == "__main__":
    main()
