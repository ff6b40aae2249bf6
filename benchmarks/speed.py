"""Benchmark: speed and memory — surrogate vs LF engine per structure, training time per epoch, peak memory per
step, graph construction for 50 defects × 5 charges × 15 distortions.

    .venv/bin/python benchmarks/speed.py            # default (56 min on 2 cores with the study's L = 1 model)
    .venv/bin/python benchmarks/speed.py --quick    # smoke run (2.5 min)
    .venv/bin/python benchmarks/speed.py --show     # print the tables of the last JSON again

Results and their discussion: docs/benchmarks.md.

Every step runs in its own Python subprocess (``OMP_NUM_THREADS=1``) so its peak memory is its own:
``ru_maxrss`` of that process (RUSAGE_SELF) and of its largest child (RUSAGE_CHILDREN: a pw.x rank,
mace_run_train; in the other steps the only children are short helpers forked from the step's own process, whose
figure repeats the parent's, so the table shows the child figure only where an engine runs). The campaign is the accuracy_cost benchmark's (Si vacancy, 15-atom cell; LF GFN1-xTB, HF QE PBE
18 Ry, 2×2×2 k-points, 2 MPI ranks).

Steps:

* ``generate`` — doped + ShakeNBreak for the campaign (step 1).
* ``lf_relax`` — one LF relaxation (q = 0, Bond_Distortion_-30%, the campaign's fmax and step limit) and the
  LF single points that label the training frames for ``train`` (Gaussian-rattled copies, 0.1 Å, q = 0 and +1).
* ``hf_single_point`` — one HF single point on the same start (step 3), and one on the 63-atom cell of
  ``per_structure``: the surrogate's speed-up against DFT per structure, next to the one against the LF stand-in.
* ``train`` — ``defectflow.train.train_kind`` (multi-head, charge-embedded, the benchmark's architecture) on N LF
  frames + N/10 HF-head frames (GFN1 labels reused: this measures time, not accuracy) for a few epochs: the
  median epoch time after the first (mace's log), scaled to 1000 frames (step 4).
* ``search`` — the surrogate's ground-state search over one charge state's starts (+ rattled extra starts), as
  the pipeline's search job runs it (step 5): one start at a time (ASE FIRE) and batched (torch-sim FIRE) in
  float64 and float32, at 15 and 63 atoms.
* ``dft_relax`` — QE PBE relaxations (Γ, 20 Ry, the quickstart's settings) of the −30 % start at 15 and 63 atoms:
  ``relaxation_speedup_vs_lf_dft`` = their wall time / the default CPU search's seconds per structure.
* ``per_structure`` — on the same 15-atom cell and charge: time per energy+forces call of the trained MACE model
  vs the LF engine (and the HF engine's call from ``hf_single_point``), and one whole relaxation of the same start
  with each (ASE BFGS, the same fmax and step limit): structures per second and the ratio. The per-call times
  are also taken on a 63-atom cell (2×2×2 conventional, one vacancy; positions nudged by 2 mÅ between calls).
* ``levels`` — doped thermodynamics on the generated entries (energies synthetic: memory and time only).
* ``graph`` — ``benchmarks/graph_construction.py``'s ``main`` for 50 × 5 × 15 (builds, does not run, the graph).

Output: a table on stdout and ``benchmarks/results/speed.json`` (``--json`` to change).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import machine, ratio, rounded, table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

SETTINGS = {
    "quick": {"n_frames": 40, "epochs": 3, "calls_mace": 20, "calls_lf": 5, "graph": [10, 5, 15], "loop_63": False},
    "default": {"n_frames": 200, "epochs": 5, "calls_mace": 100, "calls_lf": 20, "graph": [50, 5, 15],
                "loop_63": True},
}
STEPS = ("generate", "lf_relax", "hf_single_point", "train", "search", "dft_relax", "per_structure", "levels", "graph")


def _campaign(work: Path | None = None):
    """The ``far`` preset's campaign (LF GFN1-xTB, HF QE PBE 18 Ry 2×2×2 k, 16-site Si cell, q = 0, +1, +2) with
    the surrogate architecture of the training study (:data:`training.BASE`, which mlip's defaults follow)."""
    import frozen
    from training import BASE

    c = frozen.load_campaign("far", work or ROOT / "runs" / "benchmarks" / "speed")
    arch = {k: BASE[k] for k in ("hidden_irreps", "max_L", "num_interactions", "correlation", "r_max",
                                 "default_dtype", "batch_size")}
    return c.model_copy(update={"mlip": c.mlip.model_copy(update=arch)})


#: the DFT relaxation the surrogate's is compared with (issue #17): QE PBE at Γ with the quickstart's settings
#: (workflows/quickstart.yaml: fidelities.high), 2 MPI ranks, the quickstart's search fmax
DFT_RELAX = {"settings": {"engine": "qe", "xc": "PBE", "ecutwfc": 20.0, "kpts": [1, 1, 1], "mpi_procs": 2},
             "fmax": 0.05, "max_steps": 200}


def _generation(work: Path):
    from defectflow.generate import GenerationResult

    return GenerationResult.model_validate_json((work / "generation.json").read_text())


def _start(work: Path, charge: int = 0, label: str = "Bond_Distortion_-30.0%"):
    for ds in _generation(work).distortion_sets:
        if ds.charge == charge:
            for s in ds.structures:
                if s.label == label:
                    return ds, s.structure
    raise LookupError(f"no start {label} for q={charge}")


# ---------------------------------------------------------------------------------------------------------------
# steps (each runs in its own subprocess)
# ---------------------------------------------------------------------------------------------------------------
def step_generate(work: Path, cfg: dict) -> dict:
    from defectflow.generate import generate

    t0 = time.perf_counter()
    gen = generate(_campaign())
    wall = time.perf_counter() - t0
    (work / "generation.json").write_text(gen.model_dump_json())
    return {"wall": wall, "structures": gen.n_structures}


def step_lf_relax(work: Path, cfg: dict) -> dict:
    import numpy as np
    from pymatgen.core import Structure

    from defectflow.engines import get_engine
    from defectflow.train.data import frames_to_extxyz

    c = _campaign()
    _, st = _start(work)
    eng = get_engine(c.fidelities.low, fidelity="low")
    t0 = time.perf_counter()
    traj = eng.relax(st, 0, workdir=work / "lf_relax", fmax=c.relax.fmax, max_steps=c.relax.max_steps)
    wall = time.perf_counter() - t0
    # training frames for the timing run: rattled copies of the start, q = 0 and +1, labelled with the LF engine
    rng = np.random.default_rng(0)
    frames, t_label, failed = [], 0.0, 0
    base = _start(work, 0, "Unperturbed")[1]
    while len(frames) < cfg["n_frames"] * 1.1 + 2 and failed < 50:
        q = int(rng.integers(0, 2))
        s = Structure(base.lattice, base.species, base.cart_coords + rng.normal(0, 0.1, (len(base), 3)),
                      coords_are_cartesian=True, charge=q)
        t1 = time.perf_counter()
        f = eng.single_point(s, q, workdir=work / "lf_label")
        t_label += time.perf_counter() - t1
        if f.energy is None or not f.scf_converged:
            failed += 1
            continue
        frames.append((f, {"defect": "v_Si", "distortion": "rattled"}))
    (work / "frames.xyz").write_text(frames_to_extxyz(frames, "lf"))
    return {"wall": wall, "status": traj.status, "steps": traj.n_steps, "seconds_per_step": wall / max(1, traj.n_steps),
            "label_single_points": len(frames) + failed, "label_seconds_per_call": t_label / max(1, len(frames) + failed)}


def step_hf_single_point(work: Path, cfg: dict) -> dict:
    from defectflow.engines import get_engine

    c = _campaign()
    _, st = _start(work)
    eng = get_engine(c.fidelities.high, fidelity="high")
    t0 = time.perf_counter()
    f = eng.single_point(st, 0, workdir=work / "hf_sp")
    wall = time.perf_counter() - t0
    # the same DFT call on the 63-atom cell of per_structure: what a DFT LF/HF engine costs per structure there
    t0 = time.perf_counter()
    big = eng.single_point(_big_cell(), 0, workdir=work / "hf_sp_big")
    return {"wall": wall, "converged": f.scf_converged, "mpi_procs": c.fidelities.high.mpi_procs,
            "big_cell": {"natoms": len(big.structure), "wall": time.perf_counter() - t0,
                         "converged": big.scf_converged}}


def step_train(work: Path, cfg: dict) -> dict:
    from defectflow.train.data import frames_to_text, read_frames
    from defectflow.train.surrogate import train_kind

    c = _campaign()
    frames = read_frames(str(work / "frames.xyz"))
    n = cfg["n_frames"]
    lf, hf = frames[:n], frames[n:n + max(2, n // 10)]
    for a in hf:
        a.info["head"] = "hf"
    spec = c.mlip.model_copy(update={"max_epochs": cfg["epochs"], "ablations": []})
    t0 = time.perf_counter()
    model = train_kind(frames_to_text(lf), frames_to_text(hf), spec, work / "train", kind="multihead")
    wall = time.perf_counter() - t0
    (work / "model.json").write_text(model.model_dump_json())
    comp = model.components[0]
    n_train = sum(comp.n_train.values())
    return {"wall": wall, "epochs": comp.epochs, "n_train": n_train, "n_valid": sum(comp.n_valid.values()),
            "seconds_per_epoch": comp.seconds_per_epoch, "first_epoch_seconds": comp.first_epoch_seconds,
            "seconds_per_epoch_per_1000_frames": None if comp.seconds_per_epoch is None
            else comp.seconds_per_epoch * 1000 / n_train,
            "hidden_irreps": spec.hidden_irreps, "batch_size": comp.batch_size}


def _model(work: Path):
    from defectflow.train.surrogate import TrainedModel

    return TrainedModel.model_validate_json((work / "model.json").read_text())


def _search_model(work: Path):
    """The model the searches use: ``--model`` (a TrainedModel JSON, e.g. a training-study cell's), else ``train``'s."""
    import gzip

    from defectflow.train.surrogate import TrainedModel

    path = work / "search_model.json"
    if not path.is_file():
        return _model(work)
    raw = path.read_bytes()
    data = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    return TrainedModel.model_validate(data.get("model", data))  # training.py caches {"model": ..., seconds}


def _big_starts(n_extra: int, seed: int) -> list:
    """ShakeNBreak's default grid on the 63-atom cell: the vacancy's 4 neighbours distorted by −60 … +60 % in 10 %
    steps (0 % included) and rattled as ShakeNBreak rattles (``shakenbreak.distortions``, seed 42), plus
    Unperturbed, plus ``n_extra`` rattled copies of each (the search's extra starts)."""
    import numpy as np
    from shakenbreak.distortions import distort, rattle

    from defectflow.search import SearchStart, rattled_starts

    big = _big_cell()  # vacancy at fractional (0, 0, 0)
    starts = [SearchStart(label="Unperturbed", bond_distortion=None, structure=big)]
    for bd in np.round(np.arange(-0.6, 0.61, 0.1), 1):
        d = distort(big, num_nearest_neighbours=4, distortion_factor=1 + bd, frac_coords=np.zeros(3))
        st = rattle(d["distorted_structure"], seed=42)
        starts.append(SearchStart(label=f"Bond_Distortion_{100 * bd:.1f}%", bond_distortion=float(bd), structure=st))
    return starts + rattled_starts(starts, n_extra, 0.15, seed)


def step_search(work: Path, cfg: dict) -> dict:
    """The search of one charge state, three ways: one start at a time (ASE FIRE, float64: the search before the
    batched one) and all starts together (torch-sim FIRE) in float64 and float32; at 15 and 63 atoms."""
    import numpy as np

    from defectflow.search import search_ground_state
    from defectflow.search.batched import batched_relax
    from defectflow.search.jobs import search_starts, shakenbreak_starts
    from defectflow.train.surrogate import load_calculator, torch_threads

    c = _campaign()
    ds, _ = _start(work)
    model = _search_model(work)
    head = model.prediction_head
    sets = {"15": search_starts(shakenbreak_starts(ds), c.search, c.distortions.seed),
            "63": _big_starts(c.search.extra_starts, c.distortions.seed)}
    out: dict[str, Any] = {"model": model.label, "hidden_irreps": model.spec.get("hidden_irreps"),
                           "head": head, "fmax": c.search.fmax, "max_steps": c.search.max_steps,
                           "torch_threads": int(os.environ.get("OMP_NUM_THREADS", "1"))}
    for size, starts in sets.items():
        rows = {}
        for way in ("loop_float64", "batched_float64", "batched_float32"):
            batched, dtype = way.startswith("batched"), way.split("_")[1]
            if not batched and size == "63" and cfg["loop_63"] is False:
                continue
            kw = ({"relax_batch": lambda st, d=dtype: batched_relax(model, head, st, 0, fmax=c.search.fmax,
                                                                     max_steps=c.search.max_steps, dtype=d)}
                  if batched else {"calculator_factory": lambda: load_calculator(model, head)})
            with warnings.catch_warnings(), torch_threads():
                warnings.simplefilter("ignore")
                res = search_ground_state(ds.defect, 0, starts, fmax=c.search.fmax, max_steps=c.search.max_steps,
                                          **kw)
            n = len(res.landscape) + len(res.rejected)
            rows[way] = {"wall": res.wall_seconds, "starts": len(starts), "relaxed": n,
                         "structures_per_second": n / res.wall_seconds, "seconds_per_structure": res.wall_seconds / n,
                         "unconverged": len(res.unconverged), "failed": res.n_failed,
                         "ground_state_energy": res.ground_state.energy if res.ground_state else None,
                         "ground_state_label": res.ground_state_label,
                         "energies": [res.landscape.get(s.label) for s in starts]}
        e0 = np.array(rows["batched_float64"]["energies"], dtype=float)
        for r in rows.values():  # same minimum per start as batched float64? (|ΔE| per start, meV)
            e = np.array(r.pop("energies"), dtype=float)
            ok = np.isfinite(e) & np.isfinite(e0)
            r["max_abs_energy_difference_meV_vs_batched_float64"] = float(1000 * np.max(np.abs(e - e0)[ok]))
        out[size] = {"natoms": len(starts[0].structure), **rows}
    return out


def step_dft_relax(work: Path, cfg: dict) -> dict:
    """QE PBE relaxations (:data:`DFT_RELAX`: Γ, the quickstart's settings, 2 MPI ranks) of the Bond_Distortion
    −30 % start, 15 and 63 atoms: the DFT relaxation the surrogate's is compared with."""
    from defectflow.engines import get_engine

    eng = get_engine(DFT_RELAX["settings"], fidelity="low")
    big = next(s for s in _big_starts(0, 0) if s.label == "Bond_Distortion_-30.0%")
    out = {"settings": DFT_RELAX}
    for size, st in (("15", _start(work)[1]), ("63", big.structure)):
        t0 = time.perf_counter()
        traj = eng.relax(st, 0, workdir=work / f"dft_relax_{size}", fmax=DFT_RELAX["fmax"],
                         max_steps=DFT_RELAX["max_steps"])
        wall = time.perf_counter() - t0
        out[size] = {"natoms": len(st), "wall": wall, "steps": traj.n_steps, "status": traj.status,
                     "seconds_per_step": wall / max(1, traj.n_steps)}
    return out


def _time_calls(calc, structure, charge: int, n: int) -> float:
    """Seconds per energy+forces call (positions nudged each call so nothing is cached)."""
    import numpy as np

    from defectflow.engines.base import structure_to_atoms

    atoms = structure_to_atoms(structure, charge)
    atoms.calc = calc
    rng = np.random.default_rng(1)
    atoms.get_forces()  # warm-up (model load, first SCF set-up)
    t0 = time.perf_counter()
    for _ in range(n):
        atoms.positions += rng.normal(0, 0.002, atoms.positions.shape)
        atoms.get_potential_energy()
        atoms.get_forces()
    return (time.perf_counter() - t0) / n


def _relax(calc, structure, charge: int, fmax: float, steps: int) -> dict:
    """One BFGS relaxation through the library's relaxation driver (the ase engine around ``calc``)."""
    from defectflow.engines import CalculatorEngine

    t0 = time.perf_counter()
    traj = CalculatorEngine(calc, optimizer="BFGS").relax(structure, charge, workdir=None, fmax=fmax,
                                                           max_steps=steps, keep="last")
    wall = time.perf_counter() - t0
    return {"wall": wall, "steps": traj.frames[-1].step if traj.frames else 0,
            "converged": traj.status == "converged", "structures_per_second": 1 / wall if wall > 0 else None}


def _big_cell():
    import numpy as np
    from pymatgen.core import Lattice, Structure

    s = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]])
    s.make_supercell(2)
    # the vacancy at the origin (_big_starts distorts around it); site 0 of this supercell is at (¼, 0, ¼)
    s.remove_sites([next(i for i, site in enumerate(s) if np.allclose(site.frac_coords % 1.0, 0.0))])
    return s


def step_per_structure(work: Path, cfg: dict) -> dict:
    from defectflow.engines import get_engine
    from defectflow.train.surrogate import load_calculator

    c = _campaign()
    _, st = _start(work)
    model = _model(work)
    mace = load_calculator(model, head="hf")
    lf_engine = get_engine(c.fidelities.low, fidelity="low")
    from defectflow.engines.base import structure_to_atoms

    lf_calc = lf_engine.make_calculator(structure_to_atoms(st, 0), 0, work / "lf_calls")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_mace = _time_calls(mace, st, 0, cfg["calls_mace"])
        t_lf = _time_calls(lf_calc, st, 0, cfg["calls_lf"])
        r_mace = _relax(load_calculator(model, head="hf"), st, 0, c.relax.fmax, c.relax.max_steps)
        r_lf = _relax(lf_engine.make_calculator(structure_to_atoms(st, 0), 0, work / "lf_relax2"), st, 0,
                      c.relax.fmax, c.relax.max_steps)
        # a bigger cell (63 atoms: 2×2×2 conventional cell, one vacancy): MACE ∝ N, xTB ∝ N^3 asymptotically
        big = _big_cell()
        t_mace_big = _time_calls(mace, big, 0, max(5, cfg["calls_mace"] // 4))
        t_lf_big = _time_calls(lf_engine.make_calculator(structure_to_atoms(big, 0), 0, work / "lf_calls_big"), big,
                               0, max(2, cfg["calls_lf"] // 4))
    return {"natoms": len(st), "charge": 0, "mace_seconds_per_call": t_mace, "lf_seconds_per_call": t_lf,
            "speedup_per_call": ratio(t_lf, t_mace),
            "big_cell": {"natoms": len(big), "mace_seconds_per_call": t_mace_big, "lf_seconds_per_call": t_lf_big,
                         "speedup_per_call": ratio(t_lf_big, t_mace_big)},
            "relax_mace": r_mace, "relax_lf": r_lf,
            "speedup_per_relaxation": ratio(r_lf["wall"], r_mace["wall"]), "calls_mace": cfg["calls_mace"],
            "calls_lf": cfg["calls_lf"]}


def step_levels(work: Path, cfg: dict) -> dict:
    from defectflow.levels import LevelEntry, compute_levels

    gen = _generation(work)
    e_bulk = -108.0 * len(gen.bulk_supercell)  # synthetic: this step is timed for memory and speed only
    entries = [LevelEntry(defect=ds.defect, charge=ds.charge, energy=e_bulk * 15 / 16 + 3.5 - 0.3 * ds.charge,
                          structure=ds.structures[0].structure, defect_entry=ds.defect_entry)
               for ds in gen.distortion_sets]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lv = compute_levels(entries, gen.bulk_supercell, e_bulk, 0.0, 1.0, dielectric=11.7, plot_dir=work / "plots")
    return {"wall": time.perf_counter() - t0, "levels": len(lv.transition_levels)}


def step_graph(work: Path, cfg: dict) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("graph_construction", ROOT / "benchmarks" / "graph_construction.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    d, q, n = cfg["graph"]
    return mod.main(["--defects", str(d), "--charges", str(q), "--distortions", str(n)])


# ---------------------------------------------------------------------------------------------------------------
def _child(step: str, work: Path, quick: bool) -> None:
    cfg = SETTINGS["quick" if quick else "default"]
    out = globals()[f"step_{step}"](work, cfg)
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["peak_rss_MB"] = me.ru_maxrss / 1024  # KiB on Linux
    out["peak_rss_child_MB"] = ch.ru_maxrss / 1024
    print("RESULT " + json.dumps(out, default=str), flush=True)


def run_step(step: str, work: Path, quick: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_step", step, "--_work", str(work)]
    if quick:
        cmd.append("--quick")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise SystemExit(f"step {step} failed (exit {proc.returncode}):\n{tail}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["process_wall"] = wall
    return res


def render_search(r: dict[str, Any]) -> list[str]:
    """The search table (one charge state: loop vs batched, float64 vs float32) and the DFT-relaxation ratio."""
    s = r["steps"]
    se, dft = s["search"], s.get("dft_relax")
    if dft is None or "15" not in se:  # a JSON written before the batched search (issue #17): its one figure
        return [(f"Surrogate search (one charge state, {se.get('starts')} starts, one at a time): "
                 f"{se.get('structures_per_second', 0):.2f} structures/s.")]
    title = (f"### Surrogate search, one charge state ({se['model']}, {se['hidden_irreps']}, head {se['head']}, "
             f"fmax {se['fmax']} eV/Å, {se['torch_threads']} torch thread(s))")
    out = [title, ""]
    rows = []
    for size in ("15", "63"):
        for way in ("loop_float64", "batched_float64", "batched_float32"):
            x = se[size].get(way)
            if x:
                rows.append([f"{se[size]['natoms']} atoms", way.replace("_", ", "), x["relaxed"], x["wall"],
                             x["structures_per_second"], x["seconds_per_structure"],
                             x["unconverged"], x["max_abs_energy_difference_meV_vs_batched_float64"]])
    out.append(table(["cell", "search", "starts", "wall s", "structures/s", "s per structure", "unconverged",
                      "max |ΔE| per start vs batched float64, meV"], rows, digits=3))
    out.append("")
    goal = r.get("relaxation_speedup_vs_lf_dft") or speedups(s)
    rows = []
    for size in ("15", "63"):
        d = dft[size]
        rows.append([f"{d['natoms']} atoms", d["wall"], d["steps"], d["status"], goal.get(size),
                     ratio(d["wall"], se[size].get("batched_float64", {}).get("seconds_per_structure"))])
    out.append(table(["QE PBE relaxation (Γ, 20 Ry, 2 MPI ranks), Bond_Distortion −30 %", "wall s", "ionic steps",
                      "status", "speed-up: the default search on CPU (one at a time, float64), per structure",
                      "speed-up: batched float64 search"], rows, digits=1))
    g63 = goal.get("63")
    out.append(f"Goal (issue #17): ≥ 1000× at 63 atoms — {'met' if g63 and g63 >= 1000 else 'missed'} "
               f"({g63:.0f}×)." if g63 else "Goal (issue #17): ≥ 1000× at 63 atoms — not measured.")
    return out


def speedups(steps: dict[str, Any], way: str | None = None) -> dict[str, float | None]:
    """QE PBE relaxation wall (``dft_relax``) / surrogate seconds per relaxed structure in the search, per cell size
    ("15", "63"). ``way``: the search as the pipeline runs it by default (batched, ``search.precision``'s default)."""
    from defectflow.campaign import SearchSpec
    from defectflow.search.jobs import use_batched

    spec = SearchSpec(device="cpu")  # this benchmark's machine: 2 CPU cores
    way = way or (f"batched_{spec.precision}" if use_batched(spec) else f"loop_{spec.precision}")
    out = {}
    for size in ("15", "63"):
        dft, search = steps["dft_relax"].get(size), steps["search"].get(size, {}).get(way)
        out[size] = ratio(dft["wall"], search["seconds_per_structure"]) if dft and search else None
    return out


def render(r: dict[str, Any]) -> str:
    s = r["steps"]
    ps = s["per_structure"]
    out = [(f"## speed ({r['preset']} preset): v_Si, {ps['natoms']}-atom cell, q = 0, 1 thread each "
            "(QE: 2 MPI ranks)"), ""]
    hf = s["hf_single_point"]
    hf_big = (hf.get("big_cell") or {}).get("wall")

    def vs_dft(dft, mace):
        return f"{dft / mace:.0f}×" if dft and mace else None

    out.append(table(["per structure", "MACE surrogate", "LF GFN1-xTB", "HF QE PBE (DFT)", "surrogate speed-up vs LF",
                      "surrogate speed-up vs DFT"], [
        ["energy + forces call, s", ps["mace_seconds_per_call"], ps["lf_seconds_per_call"],
         hf["wall"], f"{ps['speedup_per_call']:.0f}×", vs_dft(hf["wall"], ps["mace_seconds_per_call"])],
        [f"energy + forces call, {ps['big_cell']['natoms']} atoms, s", ps["big_cell"]["mace_seconds_per_call"],
         ps["big_cell"]["lf_seconds_per_call"], hf_big, f"{ps['big_cell']['speedup_per_call']:.0f}×",
         vs_dft(hf_big, ps["big_cell"]["mace_seconds_per_call"])],
        ["relaxation (BFGS, same fmax), s", ps["relax_mace"]["wall"], ps["relax_lf"]["wall"], None,
         f"{ps['speedup_per_relaxation']:.0f}×", None],
        ["relaxation ionic steps", ps["relax_mace"]["steps"], ps["relax_lf"]["steps"], None, None, None],
        ["structures (relaxations) per second", ps["relax_mace"]["structures_per_second"],
         ps["relax_lf"]["structures_per_second"], None, None, None],
    ], digits=4))
    out.append("HF QE PBE: one SCF from scratch (energy, forces, stress) with the campaign's settings, 2 MPI ranks, "
               "wall time. The 63-atom cell is the unrelaxed vacancy: QE uses its symmetry to reduce the k-points, which a "
               "distorted structure would not allow, so that DFT figure is a lower bound.")
    out.append("")
    out += render_search(r)
    out.append("")
    t = s["train"]
    out.append(table(["training", "value"], [
        ["frames trained on (LF + HF heads)", t["n_train"]], ["epochs", t["epochs"]],
        ["median s/epoch (after the first)", t["seconds_per_epoch"]],
        ["s/epoch per 1000 frames", t["seconds_per_epoch_per_1000_frames"]],
        ["first epoch incl. warm-up, s", t["first_epoch_seconds"]], ["whole training run, s", t["wall"]],
    ], digits=2))
    out.append("")
    g = s["graph"]
    out.append(f"Graph construction {g['defects']} × {g['charges']} × {g['distortions']}: {g['jobs']} jobs in "
               f"{g['graph_build_s']:.1f} s ({g['ms_per_job']:.2f} ms/job), peak RSS {g['peak_rss_MB']:.0f} MB.")
    out.append("")
    engine_child = {"hf_single_point": "pw.x (one of 2 MPI ranks)", "train": "mace_run_train"}
    rows = [[k, v.get("process_wall"), v.get("peak_rss_MB"),
             f"{v.get('peak_rss_child_MB', 0):.0f} ({engine_child[k]})" if k in engine_child else None]
            for k, v in s.items()]
    out.append(table(["step (own process)", "wall s", "peak RSS MB (Python)", "engine subprocess peak RSS MB"],
                     rows, digits=1))
    return "\n".join(out)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke-run sizes (fewer frames, epochs and calls)")
    p.add_argument("--json", type=Path, default=None,
                   help="JSON output (default: benchmarks/results/speed.json; speed_quick.json for --quick)")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch (default: runs/benchmarks/speed-<preset>)")
    p.add_argument("--show", action="store_true", help="print the tables of the existing JSON and exit (no runs)")
    p.add_argument("--model", type=Path, default=None,
                   help="TrainedModel JSON(.gz) the searches use (e.g. a cached training-study cell: "
                        "runs/benchmarks/training/far/lf_only/n0/model.json.gz); default: the train step's model")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=None,
                   help="run only these steps; the others are kept from the work directory's finished steps "
                        "(steps_done.json) or else from the existing JSON")
    p.add_argument("--_step", choices=STEPS, help=argparse.SUPPRESS)
    p.add_argument("--_work", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.show:
        path = a.json or RESULTS / ("speed_quick.json" if a.quick else "speed.json")
        print(render(json.loads(path.read_text())))
        return {}
    if a._step:
        _child(a._step, a._work, a.quick)
        return {}
    name = "quick" if a.quick else "default"
    work = (a.work_dir or ROOT / "runs" / "benchmarks" / f"speed-{name}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    out_json = a.json or RESULTS / ("speed_quick.json" if a.quick else "speed.json")
    if a.model is not None:
        (work / "search_model.json").write_bytes(a.model.read_bytes())
    elif (work / "search_model.json").exists() and (a.steps is None or "search" in a.steps):
        (work / "search_model.json").unlink()
    t0 = time.perf_counter()
    old = json.loads(out_json.read_text()) if a.steps and out_json.is_file() else {}
    steps = dict(old.get("steps", {}))
    done_path = work / "steps_done.json"  # this work dir's finished steps: a failed step loses none of them
    kept = json.loads(done_path.read_text()) if a.steps and done_path.is_file() else {}
    steps.update(kept)
    done = {}
    for step in a.steps or STEPS:
        print(f"  {step} ...", flush=True)
        try:
            steps[step] = done[step] = run_step(step, work, a.quick)
        except SystemExit as err:
            rest = [st for st in (a.steps or STEPS) if st not in done]
            raise SystemExit(f"{err}\nfinished steps kept in {done_path}; run the rest with "
                             f"--steps {' '.join(rest)}") from None
        done_path.write_text(json.dumps({**kept, **done}))
    missing = [st for st in STEPS if st not in steps]
    if missing:
        raise SystemExit(f"steps {', '.join(missing)} have no results yet: run them (--steps) or run all steps")
    report = rounded({"benchmark": "speed", "preset": name, "settings": SETTINGS[name], "machine": machine(),
                      "steps": steps, "relaxation_speedup_vs_lf_dft": speedups(steps),
                      "wall_seconds": time.perf_counter() - t0 + (old.get("wall_seconds", 0) if a.steps else 0)}, 5)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=1) + "\n")
    print()
    print(render(report))
    print(f"\nJSON: {out_json}  (wall {report['wall_seconds'] / 60:.1f} min)")
    return report


if __name__ == "__main__":
    main()
