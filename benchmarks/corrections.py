"""Benchmark: finite-size corrections of the benchmark's Si vacancy, image charge (Makov–Payne) next to doped's FNV
and eFNV, for q = +1 and +2.

    .venv/bin/python benchmarks/corrections.py            # 3 QE single points + pp.x (~1-3 min each on 2 cores)
    .venv/bin/python benchmarks/corrections.py --show     # print the table of the last JSON again

The cell and the engine are the frozen reference's (``benchmarks/presets/reference.yaml``; ``benchmarks/data``):
the 16-site Si cell (15 atoms with the vacancy), HF = QE PBE 18 Ry, 2×2×2 k-points, ``levels.dielectric`` 11.7.
Structures: the bulk supercell of ``bulk_hf.json`` and, per q, the frozen direct-HF ground state (the
lowest-energy finished HF relaxation in ``benchmarks/data/hf``); a q with no finished relaxation yet takes its
Unperturbed ShakeNBreak start, and the output says so. Each gets one HF single point with
``electrostatic_potential`` on (pw.x, then pp.x ``plot_num = 11``: what a campaign runs for the levels step); its
energy is checked against the frozen one. The corrections then come from :func:`defectflow.levels.compute_levels`,
once per scheme, on those energies and potentials.

Output: a table on stdout and ``benchmarks/results/corrections.json`` (``--json`` to change): per q, each scheme's
correction (eV) with its point-charge and alignment terms and doped's error estimate, and the CTLs between the
charges computed, per scheme.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import contextlib
import io
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frozen  # noqa: E402
from bench_utils import cpu_seconds, machine, rounded, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCHEMES = ("image_charge", "fnv", "efnv")


def ground_state(distortion_set) -> tuple[Any, str, float | None]:
    """(structure, where it comes from, frozen HF energy in eV or None) of one charge state: the lowest-energy
    finished direct-HF relaxation, else the Unperturbed start."""
    from defectflow.engines.base import atoms_to_structure

    q = distortion_set.charge
    rows = {n: r for n, r in frozen.relaxation_index("hf").items()
            if r["charge"] == q and r.get("energy") is not None and r["status"] != "failed" and r.get("file")}
    if rows:
        best = min(rows, key=lambda n: rows[n]["energy"])
        final = frozen.read_frames_gz(frozen.set_dir("hf") / rows[best]["file"])[-1]
        source = f"frozen HF ground state ({rows[best]['distortion']}, {rows[best]['status']})"
        return atoms_to_structure(final, q), source, rows[best]["energy"]
    start = next(s for s in distortion_set.structures if s.label == "Unperturbed")
    return start.structure, "Unperturbed start (no finished HF relaxation frozen for this q yet)", None


def compute(charges: list[int], work: Path, mpi_procs: int | None) -> dict[str, Any]:
    from pymatgen.core import Structure

    from defectflow.engines import get_engine
    from defectflow.levels import LevelEntry, compute_levels, with_potentials
    from defectflow.schemas import group_key

    campaign = frozen.load_campaign("reference")
    gen = frozen.generation()
    bulk_doc = frozen.read_json(frozen.DATA / "bulk_hf.json")
    if bulk_doc is None:
        raise SystemExit(f"{frozen.DATA / 'bulk_hf.json'}: no frozen bulk (benchmarks/reference.py compute)")
    settings = with_potentials(campaign.fidelities.high, "fnv")
    if mpi_procs:
        settings["mpi_procs"] = mpi_procs
    engine = get_engine(settings, fidelity="high")
    bulk = Structure.from_dict(bulk_doc["structure"])
    t0, cpu0 = time.perf_counter(), cpu_seconds()

    def single_point(structure, q: int, name: str):
        print(f"QE single point + pp.x: {name} (q = {q:+d}, {len(structure)} atoms) ...".replace("+0", "0"),
              flush=True)
        frame = engine.single_point(structure, q, work / name)
        if frame.energy is None or frame.potential is None:
            raise SystemExit(f"{name}: {frame.error or 'pp.x wrote no potential'} (see {work / name})")
        print(f"  {frame.energy:.4f} eV in {frame.wall_seconds:.0f} s", flush=True)
        return frame

    bulk_frame = single_point(bulk, 0, "bulk")
    sets = {ds.charge: ds for ds in gen.distortion_sets}
    missing = [q for q in charges if q not in sets]
    if missing:
        raise SystemExit(f"--charges: {missing} not in the frozen generation (charges {sorted(sets)})")
    entries, out_q = [], {}
    for q in charges:
        ds = sets[q]
        structure, source, frozen_energy = ground_state(ds)
        frame = single_point(structure, q, f"{ds.name}")
        entries.append(LevelEntry(defect=ds.defect, charge=q, energy=frame.energy, structure=structure,
                                  defect_entry=ds.defect_entry, potential=frame.potential))
        out_q[f"{q:+d}"] = {"structure": source, "energy": frame.energy, "frozen_energy": frozen_energy,
                            "wall_seconds": frame.wall_seconds, "potential_file": frame.potential.file}
    per_scheme = {}
    for scheme in SCHEMES:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            per_scheme[scheme] = compute_levels(
                entries, bulk, bulk_frame.energy, bulk_doc["vbm"], bulk_doc["band_gap"], correction=scheme,
                dielectric=campaign.levels.dielectric, bulk_potential=bulk_frame.potential)
    for e in entries:
        row = out_q[f"{e.charge:+d}"]
        for scheme, res in per_scheme.items():
            row[scheme] = res.correction_details[group_key(e.defect, e.charge)].model_dump(exclude={"scheme"})
    return {
        "cell": {"natoms_bulk": len(bulk), "abc": list(bulk.lattice.abc), "volume": bulk.lattice.volume},
        "hf_settings": settings, "dielectric": campaign.levels.dielectric,
        "bulk": {"energy": bulk_frame.energy, "frozen_energy": bulk_doc["energy"],
                 "wall_seconds": bulk_frame.wall_seconds, "potential_file": bulk_frame.potential.file},
        "charges": out_q,
        "transition_levels": {s: [t.model_dump(mode="json") for t in r.transition_levels]
                              for s, r in per_scheme.items()},
        "notes": {s: r.notes for s, r in per_scheme.items()},
        "wall_seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - cpu0, "machine": machine(),
    }


def show(data: dict[str, Any]) -> str:
    """The side-by-side table (eV) and the checks against the frozen energies."""
    rows = []
    for q, row in data["charges"].items():
        fnv, efnv = row["fnv"], row["efnv"]
        rows.append([q, row["image_charge"]["energy"], fnv["energy"], fnv["point_charge"], fnv["alignment"],
                     fnv["error"], efnv["energy"], efnv["alignment"], efnv["error"]])
    title = (f"Si vacancy, {data['cell']['natoms_bulk']}-site cell, QE PBE (the frozen HF engine), "
             f"ε = {data['dielectric']}; corrections in eV (added to the defect's energy)")
    out = [title, "",
           table(["q", "image charge", "FNV", "FNV pc", "FNV align", "FNV err", "eFNV", "eFNV align", "eFNV err"],
                 rows), ""]
    for q, row in data["charges"].items():
        diff = None if row["frozen_energy"] is None else row["energy"] - row["frozen_energy"]
        out.append(f"q = {q}: {row['structure']}" + ("" if diff is None else
                                                     f"; E − E_frozen = {1000 * diff:.2f} meV"))
    b = data["bulk"]
    out.append(f"bulk: E − E_frozen = {1000 * (b['energy'] - b['frozen_energy']):.2f} meV")
    for scheme, levels in data["transition_levels"].items():
        text = ", ".join(f"ε({t['q_from']:+d}/{t['q_to']:+d}) = {t['level']:.3f} eV" for t in levels)
        out.append(f"CTLs with {scheme}: {text or 'none between the charges computed'}")
    out.append(f"wall {data['wall_seconds']:.0f} s, CPU {data['cpu_seconds']:.0f} s")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--charges", type=int, nargs="+", default=[1, 2], help="charge states (default: 1 2)")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "benchmarks" / "corrections",
                    help="folder of the QE runs (pw.out, potential.cube.gz per calculation)")
    ap.add_argument("--mpi-procs", type=int, default=None,
                    help="MPI ranks of pw.x (default: the reference's, 2)")
    ap.add_argument("--json", type=Path, default=RESULTS / "corrections.json", help="output JSON")
    ap.add_argument("--show", action="store_true", help="print the table of the existing JSON, compute nothing")
    args = ap.parse_args(argv)
    if args.show:
        if not args.json.is_file():
            raise SystemExit(f"{args.json}: not written yet (run without --show)")
        print(show(json.loads(args.json.read_text())))
        return
    data = compute(sorted(set(args.charges)), args.work_dir, args.mpi_procs)
    data = {k: v if k == "hf_settings" else rounded(v, 5) for k, v in data.items()}  # settings exact (conv_thr)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    print(show(data))
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
