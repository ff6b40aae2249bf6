"""The frozen benchmark data (issue #12): the direct-HF ShakeNBreak search and each LF preset's relaxations,
computed once with the library and kept in ``benchmarks/data/`` so that nobody recomputes them.

    .venv/bin/python benchmarks/reference.py status              # what is frozen, what is missing, cost so far
    .venv/bin/python benchmarks/reference.py compute             # compute what is missing, in this order:
                                                                 #   bulk, hf, far, close, functional, pools
    .venv/bin/python benchmarks/reference.py compute --only hf --minutes 120   # one part, stop starting new work
                                                                 # after 120 min
    .venv/bin/python benchmarks/reference.py manifest            # (re)write manifest.json and the reference summary

What is computed, with which code:

* **generation** — step 1 of ``benchmarks/presets/reference.yaml`` (doped + ShakeNBreak, seed 42): the Si vacancy in
  a 16-site cell, q = 0, +1, +2, ShakeNBreak's default grid (−60 … +60 % in 10 % steps, Unperturbed, Dimer: 14
  starts per q). Frozen first (``generation.json.gz``); every later part reads the frozen starts.
* **bulk** — one HF single point of the pristine supercell (energy, VBM, CBM; eV).
* **hf** — the direct-HF search: every start relaxed with the HF engine by step 2's own job function
  (:func:`defectflow.relax.relax_structure`, with the reference's ``relax`` settings). Every ionic step is kept.
* **far, close, functional** — the same starts relaxed with each LF preset's ``fidelities.low``
  (``benchmarks/presets/<preset>.yaml``) and its ``relax`` settings.
* **pools** — per preset, HF single points on a pool of its LF frames: every LF relaxation's last frame plus
  farthest-point (SOAP) samples from the step-2 harvest (``select.strategy: fps``) up to ``POOL_SIZE`` frames,
  so that selection strategies and HF budgets can be compared offline without DFT.

Each relaxation is written as soon as it finishes (``<set>/<name>.extxyz.gz`` + a line in ``<set>/index.json``):
a run that is killed loses at most the relaxation in progress, and ``compute`` skips what is frozen, so the
computation can be spread over several sessions (commit ``benchmarks/data/`` as it grows). CPU-seconds are
measured per engine call with ``getrusage`` (this process + reaped children: ``mpirun`` and its ``pw.x`` ranks).

Frames (extxyz, one file per relaxation): ``REF_energy`` (eV), ``REF_forces`` (eV/Å), ``REF_stress`` (eV/Å³),
``total_charge`` (e), ``defect``, ``distortion`` (the ShakeNBreak start), ``step`` (ionic step index),
``relax_status`` (converged / unconverged / failed, of the whole relaxation), ``final`` (last frame),
``vbm``/``cbm``/``fermi_level`` (eV) and ``magnetization`` (μB) where the engine gives them, ``wall_seconds``,
and ``forces_suspect`` (True where the engine flagged the step's forces,
:attr:`defectflow.schemas.Frame.forces_suspect`: QE steps after an lsda restart that did not end the relaxation;
nothing trains or tests on them).
The **hf** frames are the held-out HF test set of the training study: nothing may train on them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import contextlib
import io
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frozen  # noqa: E402
from bench_utils import CLEAN_CORE_SHARE, core_share, cpu_seconds  # noqa: E402
from frozen import (  # noqa: E402
    DATA,
    LF_PRESETS,
    PRESET_DIR,
    SAME_MINIMUM_EV,
    load_campaign,
    read_frames_gz,
    read_json,
    relax_name,
    sha256,
    write_frames_gz,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_YAML = PRESET_DIR / "reference.yaml"
PARTS = ("bulk", "hf", *LF_PRESETS, "pools")
#: HF-labelled LF frames per preset (every LF minimum + farthest-point samples up to this many).
POOL_SIZE = 64

log = logging.getLogger("reference")


# ---------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------

def chdir(path: Path):
    """``contextlib.chdir`` into ``path``, created first."""
    path.mkdir(parents=True, exist_ok=True)
    return contextlib.chdir(path)


def work_root() -> Path:
    return ROOT / "runs" / "benchmarks" / "reference"


#: Where a developer who pauses this computation (SIGSTOP/SIGCONT of its process tree, e.g. to run the test suite
#: on the same cores without sharing them) logs "STOP <unix time>" / "CONT <unix time>" lines; the paused seconds
#: are taken out of each relaxation's wall time.
PAUSE_LOG = ROOT / "runs" / "benchmarks" / "pauses.log"


def paused_seconds(t0: float, t1: float) -> float:
    """Seconds of [t0, t1] (unix time) during which the computation was paused (``PAUSE_LOG``)."""
    if not PAUSE_LOG.is_file():
        return 0.0
    total, stopped = 0.0, None
    for line in PAUSE_LOG.read_text().splitlines():
        kind, _, when = line.partition(" ")
        if kind == "STOP":
            stopped = float(when)
        elif kind == "CONT" and stopped is not None:
            a, b = max(stopped, t0), min(float(when), t1)
            total += max(0.0, b - a)
            stopped = None
    return total


# ---------------------------------------------------------------------------------------------------------------
# campaigns and starts
# ---------------------------------------------------------------------------------------------------------------
def generation():
    """The frozen step-1 result (generated and frozen on first use)."""
    from defectflow.generate import generate

    path = DATA / "generation.json.gz"
    if path.is_file():
        return frozen.generation()
    log.info("step 1: doped + ShakeNBreak for %s", REFERENCE_YAML.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = generate(load_campaign("reference"))
    write_json(path, gen.model_dump(mode="json"))
    return gen


def starts(gen) -> list[tuple[Any, Any]]:
    """(distortion set, start) in the order the search runs them: q = 0, +2, +1 (the costly spin-polarised q last)."""
    order = sorted(gen.distortion_sets, key=lambda ds: (ds.charge % 2, ds.charge))
    return [(ds, st) for ds in order for st in ds.structures]


# ---------------------------------------------------------------------------------------------------------------
# frozen relaxations
# ---------------------------------------------------------------------------------------------------------------
def record_frames(record, ds) -> list:
    """A RelaxRecord's trajectory as ASE Atoms with the keys of the module docstring."""
    from defectflow.train.data import frame_to_atoms

    frames = record.trajectory.frames if record.trajectory else []
    out = []
    for i, f in enumerate(frames):
        if f.energy is None or f.forces is None:
            continue
        meta = {"defect": ds.defect, "distortion": record.distortion, "relax_status": record.status,
                "final": i == len(frames) - 1, "wall_seconds": round(f.wall_seconds, 3)}
        if f.forces_suspect:
            meta["forces_suspect"] = True
        for key in ("vbm", "cbm", "fermi_level", "magnetization"):
            if getattr(f, key) is not None:
                meta[key] = getattr(f, key)
        out.append(frame_to_atoms(f, head="hf" if record.fidelity == "high" else "lf", meta=meta))
    return out


def relax_set(part: str, settings: dict[str, Any], fidelity: str, relax_spec, deadline: float,
              redo: set[str] = frozenset()) -> None:
    """Relax every start not yet frozen in ``DATA/<part>/`` (one file + one index entry per relaxation), and those
    named in ``redo`` again (e.g. one that shared the cores with another job: its CPU-seconds are not clean)."""
    from defectflow.relax import relax_structure

    gen = generation()
    folder = DATA / part
    index_path = folder / "index.json"
    index = read_json(index_path, {})
    todo = [(ds, st) for ds, st in starts(gen) if relax_name(ds, st.label) not in index]
    todo += [(ds, st) for ds, st in starts(gen) if relax_name(ds, st.label) in redo and (ds, st) not in todo]
    log.info("%s: %d of %d relaxations frozen, %d to do", part, len(index), len(index) + len(todo), len(todo))
    walls: dict[int, list[float]] = {}  # q -> wall seconds of this run's relaxations, for the time-left estimate
    for n, (ds, st) in enumerate(todo, 1):
        if time.time() > deadline:
            log.info("%s: time limit reached; %d left for the next run", part, len(todo) - n + 1)
            return
        name = relax_name(ds, st.label)
        c0, t0, u0, load0 = cpu_seconds(), time.perf_counter(), time.time(), os.getloadavg()[0]
        with chdir(work_root() / part), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = relax_structure.original(st.structure, ds.charge, settings, fidelity, defect=ds.defect,
                                           distortion=st.label, bond_distortion=st.bond_distortion,
                                           fmax=relax_spec.fmax, max_steps=relax_spec.max_steps)
        cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
        wall -= paused_seconds(u0, time.time())
        atoms = record_frames(rec, ds)
        if atoms:
            write_frames_gz(folder / f"{name}.extxyz.gz", atoms)
        index[name] = {"defect": ds.defect, "charge": ds.charge, "distortion": st.label,
                       "bond_distortion": st.bond_distortion, "status": rec.status, "error": rec.error,
                       "n_steps": rec.n_steps, "energy": rec.energy, "fmax": rec.fmax,
                       "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                       "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],
                       "engine": rec.engine, "settings_digest": rec.settings_digest,
                       "file": f"{name}.extxyz.gz" if atoms else None}
        write_json(index_path, index)
        e = "—" if rec.energy is None else f"{rec.energy:.4f} eV"
        walls.setdefault(ds.charge, []).append(wall)
        print(f"  [{part}] {n}/{len(todo)} {name}: {rec.status}, {rec.n_steps} steps, {e}, "
              f"{wall:.0f} s wall, {cpu:.0f} CPU-s; {time_left(walls, [d.charge for d, _ in todo[n:]])}",
              flush=True)


def time_left(walls: dict[int, list[float]], charges: list[int]) -> str:
    """'~N min left' for relaxations of the given charges still to do, each at the mean wall time of this run's
    relaxations of its q (the mean over every q where none of its q is done yet: q = +1 costs about twice q = 0)."""
    if not charges:
        return "done"
    every = [w for ws in walls.values() for w in ws]
    if not every:
        return f"{len(charges)} left"
    est = sum(sum(walls[q]) / len(walls[q]) if walls.get(q) else sum(every) / len(every) for q in charges)
    return f"~{est / 60:.0f} min left ({len(charges)} relaxations, at this run's mean wall time per q)"


def bulk(deadline: float) -> None:
    """The pristine supercell's HF single point (energy, VBM, CBM), frozen as ``bulk_hf.json``."""
    from defectflow.engines import get_engine

    path = DATA / "bulk_hf.json"
    if path.is_file() or time.time() > deadline:
        return
    camp = load_campaign("reference")
    gen = generation()
    hf = camp.fidelities.high.model_dump(mode="json")
    engine = get_engine(hf, fidelity="high")
    c0 = cpu_seconds()
    with chdir(work_root() / "bulk"):
        frame = engine.single_point(gen.bulk_supercell, 0, workdir=Path.cwd())
    cpu = cpu_seconds() - c0
    if frame.energy is None:
        raise RuntimeError(f"bulk HF single point failed: {frame.error}")
    write_json(path, {"natoms": len(gen.bulk_supercell), "energy": frame.energy, "vbm": frame.vbm, "cbm": frame.cbm,
                      "band_gap": frame.band_gap, "fermi_level": frame.fermi_level,
                      "wall_seconds": round(frame.wall_seconds, 2), "cpu_seconds": round(cpu, 2),
                      "settings_digest": frame.settings_digest, "structure": gen.bulk_supercell.as_dict()})
    print(f"  [bulk] E = {frame.energy:.4f} eV, gap {frame.band_gap:.3f} eV, {cpu:.0f} CPU-s", flush=True)


def hf_engine_settings() -> dict[str, Any]:
    return load_campaign("reference").fidelities.high.model_dump(mode="json")


def _redo_of(part: str, redo: set[str]) -> set[str]:
    """The ``--redo`` names of one part: ``<part>:<name>``, or a bare ``<name>`` for the direct-HF search."""
    return {r.split(":", 1)[1] for r in redo if r.startswith(f"{part}:")} | (
        {r for r in redo if ":" not in r} if part == "hf" else set())


def compute(only: list[str], minutes: float | None, redo: set[str] = frozenset()) -> None:
    deadline = time.time() + 60 * minutes if minutes else float("inf")
    ref = load_campaign("reference")
    generation()
    for part in only:
        if part == "bulk":
            bulk(deadline)
        elif part == "hf":
            relax_set("hf", hf_engine_settings(), "high", ref.relax, deadline, _redo_of("hf", redo))
        elif part in LF_PRESETS:
            camp = load_campaign(part)
            relax_set(f"lf/{part}", camp.fidelities.low.model_dump(mode="json"), "low", camp.relax, deadline,
                      _redo_of(part, redo))
        elif part == "pools":
            for preset in LF_PRESETS:
                pool(preset, deadline)
    write_manifest()


# ---------------------------------------------------------------------------------------------------------------
# HF pools of LF frames
# ---------------------------------------------------------------------------------------------------------------
def pool_choice(preset: str) -> list[list]:
    """The preset's pool as ``[relaxation name, ionic step]`` pairs: ``select.strategy: fps`` with budget
    ``POOL_SIZE`` over every frozen LF frame (the selection step itself), plus every relaxation's last frame."""
    from defectflow.campaign import SelectionSpec
    from defectflow.select import select_frames

    index = frozen.relaxation_index(preset)
    records = {name: frozen.relaxation_record(preset, name) for name in sorted(index)}
    names = {(r.defect, r.charge, r.distortion): n for n, r in records.items()}
    sel = select_frames(list(records.values()), SelectionSpec(strategy="fps", budget=POOL_SIZE))
    chosen = [[names[(c.defect, c.charge, c.distortion)], c.step] for c in sel.chosen]
    for name, rec in records.items():
        if rec.trajectory and rec.trajectory.frames:
            last = [name, rec.trajectory.frames[-1].step]
            if last not in chosen:
                chosen.append(last)
    return chosen


def pool(preset: str, deadline: float) -> None:
    """HF single points on the preset's pool (:func:`pool_choice`), frozen one frame at a time."""
    from defectflow.engines import get_engine
    from defectflow.train.data import frame_to_atoms

    folder = DATA / "lf" / preset
    n_starts = sum(len(ds.structures) for ds in generation().distortion_sets)
    if len(frozen.relaxation_index(preset)) < n_starts:
        log.info("pool %s: LF relaxations not all frozen yet", preset)
        return
    index_path = folder / "pool_index.json"
    index = read_json(index_path, {})
    if not index.get("chosen"):
        index["chosen"] = pool_choice(preset)
        write_json(index_path, index)
    done = index.setdefault("done", {})
    engine = get_engine(hf_engine_settings(), fidelity="high")
    pool_path = folder / "pool_hf.extxyz.gz"
    labelled = read_frames_gz(pool_path) if pool_path.is_file() else []
    records: dict[str, Any] = {}
    pool_walls: dict[int, list[float]] = {}  # q -> wall seconds of this run's single points
    lf_index = frozen.relaxation_index(preset)
    for n, (name, step) in enumerate(index["chosen"], 1):
        key = f"{name}@{step}"
        if key in done:
            continue
        if time.time() > deadline:
            log.info("pool %s: time limit reached", preset)
            break
        rec = records.setdefault(name, frozen.relaxation_record(preset, name))
        lf = next(f for f in rec.trajectory.frames if f.step == step)
        c0, u0 = cpu_seconds(), time.time()
        with chdir(work_root() / "pools" / preset):
            hf = engine.single_point(lf.structure, lf.charge, workdir=Path.cwd() / key.replace("@", "_step"))
        cpu = cpu_seconds() - c0
        wall = hf.wall_seconds - paused_seconds(u0, time.time())  # pauses (pause log) are not compute time
        done[key] = {"energy": hf.energy, "cpu_seconds": round(cpu, 2), "wall_seconds": round(wall, 2),
                     "error": hf.error}
        if hf.energy is not None:
            from defectflow.train.data import LF_ENERGY_KEY, LF_FORCES_KEY

            h = frame_to_atoms(hf, head="hf", meta={"defect": rec.defect, "distortion": rec.distortion,
                                                     "lf_relaxation": name, "lf_step": step})
            h.info[LF_ENERGY_KEY] = lf.energy
            h.arrays[LF_FORCES_KEY] = lf.forces_array
            labelled.append(h)
            write_frames_gz(pool_path, labelled)
        write_json(index_path, index)
        pool_walls.setdefault(lf.charge, []).append(wall)
        left = [lf_index[nm]["charge"] for nm, st in index["chosen"][n:] if f"{nm}@{st}" not in done]
        print(f"  [pool {preset}] {n}/{len(index['chosen'])} {key} q={lf.charge:+d}: "
              f"{'failed' if hf.energy is None else f'{hf.energy:.4f} eV'}, {cpu:.0f} CPU-s; "
              f"{time_left(pool_walls, left).replace('relaxations', 'single points')}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# manifest and reference summary
# ---------------------------------------------------------------------------------------------------------------
def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("defectflow", "doped", "shakenbreak", "pymatgen", "ase", "tblite"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["quantum_espresso"] = qe_version()
    return out


def qe_version() -> str | None:
    """QE version from the newest pw.out under the work folder (pw.x prints it in its header)."""
    import re

    for out in sorted(work_root().rglob("pw.out"), key=lambda p: p.stat().st_mtime, reverse=True)[:1]:
        m = re.search(r"Program PWSCF v\.(\S+)", out.read_text(errors="replace")[:4000])
        if m:
            return m.group(1)
    return None


def set_summary(folder: Path) -> dict[str, Any]:
    index = read_json(folder / "index.json", {})
    return {"relaxations": len(index), "frames": sum(r["n_steps"] for r in index.values() if r.get("file")),
            "cpu_seconds": round(sum(r["cpu_seconds"] for r in index.values()), 1),
            "wall_seconds": round(sum(r["wall_seconds"] for r in index.values()), 1),
            "status": {s: sum(r["status"] == s for r in index.values()) for s in ("converged", "unconverged",
                                                                                    "failed")}}


def write_manifest() -> dict[str, Any]:
    """``manifest.json``: what the data is, what it cost, code versions and a sha256 per file."""
    from defectflow.engines import get_engine

    gen = generation()
    ref = load_campaign("reference")
    hf = hf_engine_settings()
    hf_index = read_json(DATA / "hf" / "index.json", {})
    bulk_doc = read_json(DATA / "bulk_hf.json", {})
    old = read_json(DATA / "manifest.json", {})
    qe = qe_version() or (old.get("versions") or {}).get("quantum_espresso")
    manifest = {
        "system": {"defect": "v_Si", "host": "Si (diamond)", "cell": "2x2x2 primitive supercell, 16 sites",
                   "n_atoms_defect_cell": len(gen.distortion_sets[0].structures[0].structure),
                   "campaign": str(REFERENCE_YAML.relative_to(ROOT)), "seed": ref.distortions.seed},
        "hf": {"settings": hf, "settings_digest": get_engine(hf).digest,
               "relax": ref.relax.model_dump(mode="json")},
        "charges": sorted(ds.charge for ds in gen.distortion_sets),
        "starts_per_charge": {str(ds.charge): len(ds.structures) for ds in gen.distortion_sets},
        "frames": sum(r["n_steps"] for r in hf_index.values() if r.get("file")),
        "hf_calls": sum(r["n_steps"] for r in hf_index.values()) + (1 if bulk_doc else 0),
        "hf_cpu_seconds": round(sum(r["cpu_seconds"] for r in hf_index.values())
                                + bulk_doc.get("cpu_seconds", 0.0), 1),
        "hf_wall_seconds": round(sum(r["wall_seconds"] for r in hf_index.values())
                                 + bulk_doc.get("wall_seconds", 0.0), 1),
        "complete": {"hf": len(hf_index) == sum(len(ds.structures) for ds in gen.distortion_sets)
                     and bool(bulk_doc)},
        "lf_presets": {},
        "versions": {**versions(), "quantum_espresso": qe},
        "files": {},
    }
    n_starts = sum(len(ds.structures) for ds in gen.distortion_sets)
    for preset in LF_PRESETS:
        folder = DATA / "lf" / preset
        camp = load_campaign(preset)
        entry = {"campaign": f"benchmarks/presets/{preset}.yaml", "lf": camp.fidelities.low.model_dump(mode="json"),
                 **set_summary(folder)}
        pidx = read_json(folder / "pool_index.json", {})
        entry["pool"] = {"chosen": len(pidx.get("chosen", [])), "labelled": sum(
            1 for d in pidx.get("done", {}).values() if d.get("energy") is not None),
            "hf_cpu_seconds": round(sum(d["cpu_seconds"] for d in pidx.get("done", {}).values()), 1)}
        entry["complete"] = entry["relaxations"] == n_starts
        manifest["lf_presets"][preset] = entry
        manifest["complete"][preset] = entry["complete"]
    summary = reference_summary()
    if summary is not None:
        write_json(DATA / "reference.json", summary)
    for path in sorted(DATA.rglob("*")):
        if path.is_file() and path.name != "manifest.json" and not path.name.endswith(".tmp"):
            manifest["files"][str(path.relative_to(DATA))] = sha256(path)
    write_json(DATA / "manifest.json", manifest)
    return manifest


def reference_summary() -> dict[str, Any] | None:
    """Ground state per q (ShakeNBreak's lowest-energy start), formation energies and CTLs of the direct-HF search,
    once every HF relaxation and the bulk are frozen; None before."""
    hf_index = read_json(DATA / "hf" / "index.json", {})
    bulk_doc = read_json(DATA / "bulk_hf.json")
    gen = generation()
    if bulk_doc is None or len(hf_index) < sum(len(ds.structures) for ds in gen.distortion_sets):
        return None
    from defectflow.levels import LevelEntry, compute_levels

    ref = load_campaign("reference")
    states, entries = {}, []
    for ds in gen.distortion_sets:
        rows = {n: r for n, r in hf_index.items() if r["charge"] == ds.charge and r["energy"] is not None
                and r["status"] != "failed"}
        best = min(rows, key=lambda n: rows[n]["energy"])
        final = read_frames_gz(DATA / "hf" / rows[best]["file"])[-1]
        from defectflow.engines.base import atoms_to_structure

        structure = atoms_to_structure(final, ds.charge)
        unperturbed = next((r["energy"] for r in rows.values() if r["distortion"] == "Unperturbed"), None)
        states[ds.name] = {"charge": ds.charge, "ground_state": rows[best]["distortion"],
                           "energy": rows[best]["energy"],
                           "energy_lowering": None if unperturbed is None else rows[best]["energy"] - unperturbed,
                           "structure": structure.as_dict()}
        entries.append(LevelEntry(defect=ds.defect, charge=ds.charge, energy=rows[best]["energy"],
                                  structure=structure, defect_entry=ds.defect_entry))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        lv = compute_levels(entries, gen.bulk_supercell, bulk_doc["energy"], bulk_doc["vbm"], bulk_doc["band_gap"],
                            correction=ref.levels.correction, dielectric=ref.levels.dielectric,
                            chemical_potentials=ref.levels.chemical_potentials, plot_dir=None)
    return {"ground_states": states, "formation_energies_vbm": lv.formation_energies_vbm,
            "transition_levels": [t.model_dump(mode="json") for t in lv.transition_levels],
            "band_gap": bulk_doc["band_gap"], "vbm": bulk_doc["vbm"], "bulk_energy": bulk_doc["energy"],
            "correction": lv.correction_scheme}


def lf_vs_hf() -> list[dict[str, Any]]:
    """Does LF ShakeNBreak alone find the HF ground state? Per LF preset and q (where the direct-HF search of that
    q and the preset's relaxations of it are frozen): the LF ground state (lowest LF relaxation), the direct-HF
    minimum nearest to it (RMSD after StructureMatcher alignment, among the 15 HF-relaxed structures of that q),
    and its HF single point from the preset's pool. It "finds" the HF ground state when that nearest HF minimum is
    the ground state (within :data:`SAME_MINIMUM_EV` in HF energy)."""
    from bench_utils import aligned_rmsd

    from defectflow.engines.base import atoms_to_structure

    gen = generation()
    hf_index = read_json(DATA / "hf" / "index.json", {})
    rows = []
    for ds in gen.distortion_sets:
        hf = {n: r for n, r in hf_index.items() if r["charge"] == ds.charge}
        if len(hf) < len(ds.structures):
            continue
        finals = {n: (r["energy"], atoms_to_structure(read_frames_gz(DATA / "hf" / r["file"])[-1], ds.charge))
                  for n, r in hf.items() if r["energy"] is not None and r["status"] != "failed"}
        gs = min(finals, key=lambda n: finals[n][0])
        for preset in LF_PRESETS:
            lf = {n: r for n, r in frozen.relaxation_index(preset).items() if r["charge"] == ds.charge}
            if len(lf) < len(ds.structures):
                continue
            lf_gs = next(iter(frozen.lf_snb_states(preset, gen, {ds.charge}).values()))
            dist = {n: aligned_rmsd(f[1], lf_gs["structure"])["rmsd"] for n, f in finals.items()}
            near = min(dist, key=lambda n: dist[n] if dist[n] is not None else 1e9)
            e_hf = lf_gs["hf_energy"]
            rows.append({"preset": preset, "charge": ds.charge, "hf_ground_state": hf[gs]["distortion"],
                         "lf_ground_state": lf_gs["label"], "nearest_hf_minimum": hf[near]["distortion"],
                         "rmsd_to_hf_gs_a": dist[gs], "rmsd_to_nearest_a": dist[near],
                         "nearest_above_gs_mev": 1000 * (finals[near][0] - finals[gs][0]),
                         "hf_sp_above_gs_mev": None if e_hf is None else 1000 * (e_hf - finals[gs][0]),
                         "finds_hf_gs": finals[near][0] - finals[gs][0] <= SAME_MINIMUM_EV})
    return rows


#: RMSD thresholds (Å) of :func:`near_minimum`: the ground-state goal of issue #14 (0.05 Å) and coarser ones.
NEAR_MINIMUM_RMSD = (0.02, 0.05, 0.1, 0.2, 0.3)


def near_minimum() -> list[dict[str, Any]]:
    """What a structure near an HF minimum is worth, from the frozen direct-HF relaxations (converged ones only):
    for each RMSD threshold r, the first ionic step of each relaxation that lies within r of its own final structure
    (same atom order, minimum-image distances), its HF energy above that final structure (meV per cell) and the
    ionic steps still left to converge. It says what energy error a ground-state structure at RMSD r carries into a
    CTL, and what an HF relaxation from such a structure costs (``verify.mode: relax``)."""
    import numpy as np
    from ase.geometry import find_mic

    from defectflow.train.data import ENERGY_KEY

    rows_by_r: dict[float, list[tuple[int, float]]] = {r: [] for r in NEAR_MINIMUM_RMSD}
    for row in read_json(DATA / "hf" / "index.json", {}).values():
        if row["status"] != "converged" or not row.get("file"):
            continue
        frames = read_frames_gz(DATA / "hf" / row["file"])
        last = frames[-1]
        rmsds = [float(np.sqrt(np.mean(find_mic(a.positions - last.positions, last.cell, pbc=True)[1] ** 2)))
                 for a in frames]
        for r in NEAR_MINIMUM_RMSD:
            i = next(k for k, x in enumerate(rmsds) if x < r)  # the last frame itself is at 0
            de = 1000 * (float(frames[i].info[ENERGY_KEY]) - float(last.info[ENERGY_KEY]))
            rows_by_r[r].append((len(frames) - 1 - i, de))
    out = []
    for r, rows in rows_by_r.items():
        steps = np.array([s for s, _ in rows], dtype=float)
        de = np.array([e for _, e in rows], dtype=float)
        out.append({"rmsd_a": r, "relaxations": len(rows),
                    "steps_left_median": float(np.median(steps)), "steps_left_mean": float(steps.mean()),
                    "steps_left_p90": float(np.percentile(steps, 90)),
                    "energy_above_min_mev_median": float(np.median(de)), "energy_above_min_mev_p90":
                    float(np.percentile(de, 90)), "energy_above_min_mev_max": float(de.max())})
    return out


def status() -> None:
    gen = generation()
    n = sum(len(ds.structures) for ds in gen.distortion_sets)
    print(f"starts: {n} ({', '.join(f'q={ds.charge:+d}: {len(ds.structures)}' for ds in gen.distortion_sets)})")
    print(f"bulk: {'frozen' if (DATA / 'bulk_hf.json').is_file() else 'missing'}")
    for part in ("hf", *(f"lf/{p}" for p in LF_PRESETS)):
        s = set_summary(DATA / part)
        print(f"{part:14s} {s['relaxations']:3d}/{n} relaxations, {s['frames']:5d} frames, "
              f"{s['cpu_seconds']:8.0f} CPU-s, {s['wall_seconds']:7.0f} wall-s, {s['status']}")
    for preset in LF_PRESETS:
        pidx = read_json(DATA / "lf" / preset / "pool_index.json", {})
        print(f"pool {preset:9s} {len(pidx.get('done', {}))}/{len(pidx.get('chosen', [])) or POOL_SIZE} HF frames")
    shared = contended_relaxations()
    if shared:
        print(f"shared the cores (core share < {CLEAN_CORE_SHARE}; CPU-s inflated, candidates for --redo): "
              + ", ".join(f"{name} ({share:.2f})" for name, share in shared.items()))


def contended_relaxations(min_wall_s: float = 20.0) -> dict[str, float]:
    """``--redo`` name → core share (CPU-s / (wall-s × processes); QE runs 2 MPI ranks, tblite one thread) of every
    frozen relaxation that ran below :data:`bench_utils.CLEAN_CORE_SHARE` for at least ``min_wall_s`` s: it shared
    the cores with other work, so its CPU-seconds are inflated (MPI ranks spin while they wait)."""
    out = {}
    for part in ("hf", *(f"lf/{p}" for p in LF_PRESETS)):
        prefix = "" if part == "hf" else part.split("/", 1)[1] + ":"
        for name, row in read_json(DATA / part / "index.json", {}).items():
            wall = row.get("wall_seconds") or 0.0
            share = core_share(row.get("cpu_seconds"), wall, 2 if row.get("engine") == "qe" else 1)
            if share is not None and wall >= min_wall_s and share < CLEAN_CORE_SHARE:
                out[prefix + name] = round(share, 2)
    return out


def flag_suspect_forces() -> list[str]:
    """Set ``forces_suspect`` on the frozen QE frames the QE engine would flag now
    (:func:`defectflow.engines.qe.outputs.suspect_forces`), read again from each relaxation's ``pw.out`` in the work
    folder: for relaxations frozen before the flag existed. Returns what changed, one line per relaxation."""
    from defectflow.engines.base import safe_name
    from defectflow.engines.qe.outputs import parse_pw_output, suspect_forces

    changed = []
    for part in ("hf", *(f"lf/{p}" for p in LF_PRESETS)):
        folder = DATA / part
        for name, row in read_json(folder / "index.json", {}).items():
            if not row.get("file") or row.get("engine") != "qe":
                continue
            folder_name = safe_name(f"{row['defect']}_{row['charge']:+d}_{row['distortion']}")
            out = work_root() / part / folder_name / "pw.out"
            if not out.exists():
                log.warning("%s/%s: no %s, left as it is", part, name, out)
                continue
            atoms = read_frames_gz(folder / row["file"])
            result = parse_pw_output(out, hybrid=False)
            if len(result.atoms) != len(atoms):
                log.warning("%s/%s: %d steps in pw.out, %d frozen: left as it is", part, name, len(result.atoms),
                            len(atoms))
                continue
            flags = suspect_forces(result, len(atoms), row["status"] == "converged")
            if all(bool(a.info.get("forces_suspect", False)) == f for a, f in zip(atoms, flags)):
                continue
            for a, f in zip(atoms, flags):
                a.info.pop("forces_suspect", None)
                if f:
                    a.info["forces_suspect"] = True
            write_frames_gz(folder / row["file"], atoms)
            changed.append(f"{part}/{name}: {sum(flags)} of {len(flags)} steps flagged")
    return changed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("status", "compute", "manifest", "lf-vs-hf", "near-minimum", "flag-suspect"),
                    help="lf-vs-hf: does each preset's LF ShakeNBreak search find the HF ground state (per q)? "
                    "near-minimum: HF energy above the minimum and HF steps left, at RMSD r from it (direct-HF "
                    "relaxations). "
                    "flag-suspect: mark frozen QE steps whose forces the QE engine now flags (Frame.forces_suspect), "
                    "read from the work folder's pw.out")
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                    help="parts to compute, in the order given (default: all, cheapest first after the HF search)")
    ap.add_argument("--redo", nargs="+", default=[], metavar="NAME",
                    help="relax these again even if frozen (names as in <set>/index.json; bare names are the "
                    "direct-HF search's, e.g. 'v_Si_0__Bond_Distortion_-50.0_', an LF preset's are prefixed, e.g. "
                    "'close:v_Si_0__Unperturbed'): one that shared the cores with other work")
    ap.add_argument("--minutes", type=float, default=None,
                    help="start no new relaxation after this many minutes (the running one finishes)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("pymatgen", "doped", "shakenbreak", "jobflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.path.insert(0, str(ROOT))
    if args.action == "status":
        status()
    elif args.action == "lf-vs-hf":
        from bench_utils import table

        rows = lf_vs_hf()
        print(table(["preset", "q", "HF ground state", "LF ground state", "nearest HF minimum", "RMSD to HF GS Å",
                     "RMSD to nearest Å", "nearest above HF GS meV", "HF SP at LF GS above HF GS meV",
                     "LF finds HF GS"],
                    [[r["preset"], f"{r['charge']:+d}", r["hf_ground_state"], r["lf_ground_state"],
                      r["nearest_hf_minimum"], r["rmsd_to_hf_gs_a"], r["rmsd_to_nearest_a"],
                      r["nearest_above_gs_mev"], r["hf_sp_above_gs_mev"], "yes" if r["finds_hf_gs"] else "NO"]
                     for r in rows], digits=3))
    elif args.action == "near-minimum":
        from bench_utils import table

        rows = near_minimum()
        print(table(["RMSD to own minimum <, Å", "relaxations", "HF steps left median / mean / p90",
                     "HF energy above minimum meV median / p90 / max"],
                    [[r["rmsd_a"], r["relaxations"],
                      f"{r['steps_left_median']:.0f} / {r['steps_left_mean']:.1f} / {r['steps_left_p90']:.0f}",
                      f"{r['energy_above_min_mev_median']:.0f} / {r['energy_above_min_mev_p90']:.0f} / "
                      f"{r['energy_above_min_mev_max']:.0f}"] for r in rows], digits=3))
    elif args.action == "flag-suspect":
        for line in flag_suspect_forces() or ["no frozen file changed"]:
            print(line)
    elif args.action == "compute":
        compute(args.only, args.minutes, set(args.redo))
    else:
        m = write_manifest()
        print(json.dumps({k: m[k] for k in ("charges", "starts_per_charge", "frames", "hf_calls", "hf_cpu_seconds",
                                            "complete")}, indent=1))


if __name__ == "__main__":
    main()
