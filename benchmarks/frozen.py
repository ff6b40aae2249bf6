"""Reading the frozen benchmark data in ``benchmarks/data/`` (written by ``benchmarks/reference.py``).

What is there (see ``manifest.json`` for the digests, cost and code versions):

* ``generation.json.gz`` — step 1 (doped + ShakeNBreak) of ``benchmarks/presets/reference.yaml``: every start;
* ``bulk_hf.json`` — the pristine supercell's HF single point (energy, VBM, CBM in eV);
* ``hf/`` — the direct-HF ShakeNBreak search: one ``<name>.extxyz.gz`` per relaxation (every ionic step) and
  ``index.json`` (status, steps, final energy, wall and CPU seconds per relaxation);
* ``lf/<preset>/`` — the same for each LF preset, plus ``pool_hf.extxyz.gz`` / ``pool_index.json``: HF single
  points on a pool of that preset's LF frames (HF labels in ``REF_*``, the LF ones in ``LF_*``);
* ``reference.json`` — the direct-HF ground state per q, formation energies and CTLs (once complete).

Frames use defectflow's training-file keys (:mod:`defectflow.train.data`). The ``hf`` frames are the held-out HF
test set of the training study: nothing may train on them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
PRESET_DIR = ROOT / "benchmarks" / "presets"
LF_PRESETS = ("far", "close", "functional")
#: eV per cell: two relaxed structures of one q whose HF energies agree within this are "the same minimum" (distinct
#: minima of this cell are ≥ 30 meV apart; one minimum relaxed from different starts spreads over ≤ 2 meV at fmax
#: 0.05 eV/Å)
SAME_MINIMUM_EV = 0.005

__all__ = [
    "DATA", "LF_PRESETS", "PRESET_DIR", "SAME_MINIMUM_EV", "load_campaign", "generation", "read_json", "write_json",
    "read_frames_gz", "write_frames_gz", "sha256", "manifest", "check_digests", "relaxation_index",
    "relaxation_record", "relax_name", "seed_relaxations", "pool_frames", "lf_snb_states", "reference_summary",
    "set_dir",
]


# ---------------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_json(path: Path, default: Any = None) -> Any:
    if not path.is_file():
        return default
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return json.loads(raw)


def write_json(path: Path, data: Any) -> None:
    """Atomic write (a kill never leaves half a file); ``.gz`` names are gzip-compressed (mtime 0: reproducible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1, sort_keys=True, default=str) + "\n"
    raw = gzip.compress(text.encode(), mtime=0) if path.suffix == ".gz" else text.encode()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    tmp.replace(path)


def write_frames_gz(path: Path, atoms_list) -> None:
    from defectflow.train.data import frames_to_text

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(gzip.compress(frames_to_text(atoms_list).encode(), mtime=0))
    tmp.replace(path)


def read_frames_gz(path: Path):
    from defectflow.train.data import read_frames

    return read_frames(gzip.decompress(path.read_bytes()).decode())


def manifest() -> dict[str, Any]:
    m = read_json(DATA / "manifest.json")
    if m is None:
        raise FileNotFoundError(f"{DATA / 'manifest.json'}: no frozen data (run benchmarks/reference.py compute)")
    return m


def check_digests(parts: list[str] | None = None) -> list[str]:
    """Files whose sha256 differs from the manifest's, or that are missing (empty: all match). ``parts``: only the
    files under these folders (e.g. ``["hf", "lf/far"]``) and the top-level ones, so that a benchmark of one preset
    runs while another preset is still being computed."""
    bad = []
    for name, digest in manifest()["files"].items():
        if parts is not None and "/" in name and not any(name.startswith(p.rstrip("/") + "/") for p in parts):
            continue
        path = DATA / name
        if not path.is_file():
            bad.append(f"{name}: missing")
        elif sha256(path) != digest:
            bad.append(f"{name}: sha256 differs from manifest.json")
    return bad


# ---------------------------------------------------------------------------------------------------------------
# campaigns, starts, relaxations
# ---------------------------------------------------------------------------------------------------------------
def load_campaign(name: str, work_dir: str | Path | None = None):
    """The reference campaign (``reference``) or an LF preset's campaign (``close``, ...), from its YAML;
    ``work_dir`` replaces ``execution.work_dir``."""
    from defectflow.campaign import Campaign

    campaign = Campaign.from_yaml(PRESET_DIR / f"{name}.yaml")
    if work_dir is not None:
        campaign = campaign.model_copy(update={"execution": campaign.execution.model_copy(
            update={"work_dir": str(work_dir)})})
    return campaign


def generation():
    """The frozen step-1 result (every start of every charge state)."""
    from defectflow.schemas import GenerationResult

    data = read_json(DATA / "generation.json.gz")
    if data is None:
        raise FileNotFoundError(f"{DATA / 'generation.json.gz'}: no frozen starts")
    return GenerationResult.model_validate(data)


def relax_name(distortion_set, label: str) -> str:
    """File stem of one frozen relaxation: ``v_Si_+1__Bond_Distortion_-30.0_``."""
    from defectflow.engines.base import safe_name

    return safe_name(f"{distortion_set.name}__{label}")


def set_dir(part: str) -> Path:
    """``hf`` (the direct-HF search) or an LF preset's name → its folder."""
    return DATA / part if part == "hf" else DATA / "lf" / part


def relaxation_index(part: str) -> dict[str, dict[str, Any]]:
    return read_json(set_dir(part) / "index.json", {})


def relaxation_record(part: str, name: str, settings_digest: str | None = None):
    """One frozen relaxation as the :class:`~defectflow.schemas.RelaxRecord` step 2 made (every ionic step as a
    Frame), or None when it is not frozen."""
    from defectflow.engines.base import atoms_to_structure
    from defectflow.schemas import Frame, RelaxRecord, RelaxTrajectory
    from defectflow.train.data import CHARGE_KEY, ENERGY_KEY, FORCES_KEY, STRESS_KEY

    row = relaxation_index(part).get(name)
    if row is None:
        return None
    atoms = read_frames_gz(set_dir(part) / row["file"]) if row.get("file") else []
    digest = settings_digest or row["settings_digest"]
    frames = []
    for a in atoms:
        q = int(a.info[CHARGE_KEY])
        frames.append(Frame(
            structure=atoms_to_structure(a, q), energy=float(a.info[ENERGY_KEY]),
            forces=a.arrays[FORCES_KEY].tolist(),
            stress=None if STRESS_KEY not in a.info else list(map(float, a.info[STRESS_KEY])), charge=q,
            engine=row["engine"], xc=None, fidelity=a.info.get("fidelity"), settings_digest=digest,
            wall_seconds=float(a.info.get("wall_seconds", 0.0)), step=int(a.info["step"]),
            magnetization=a.info.get("magnetization"), vbm=a.info.get("vbm"), cbm=a.info.get("cbm"),
            fermi_level=a.info.get("fermi_level"), forces_suspect=bool(a.info.get("forces_suspect", False))))
    fidelity = "high" if part == "hf" else "low"
    traj = RelaxTrajectory(frames=frames, status=row["status"], error=row.get("error"), charge=row["charge"],
                           engine=row["engine"], fidelity=fidelity, settings_digest=digest,
                           fmax_target=float(row.get("fmax_target", 0.05)), wall_seconds=row["wall_seconds"],
                           label=f"{row['defect']}_{row['charge']:+d}/{row['distortion']}")
    final = traj.final
    return RelaxRecord(defect=row["defect"], charge=row["charge"], distortion=row["distortion"],
                       bond_distortion=row.get("bond_distortion"), status=row["status"], error=row.get("error"),
                       n_steps=len(frames), energy=None if final is None else final.energy,
                       fmax=None if final is None else final.fmax, wall_seconds=row["wall_seconds"],
                       engine=row["engine"], fidelity=fidelity, settings_digest=digest,
                       final_structure=None if final is None else final.structure, trajectory=traj)


def seed_relaxations(store, campaign, part: str, gen=None) -> dict[str, float]:
    """Put the frozen relaxations of ``part`` into ``store`` as finished step-2 jobs of ``campaign``, so that a run
    of the campaign (with the frozen ``generation()``) reuses them through defectflow's own resume (the
    ``relax_lf`` cache key: the same inputs as the job the graph builds). Returns the frozen cost they stand for:
    ``{"relaxations", "cpu_seconds", "wall_seconds"}``; raises when one is missing or its engine settings differ
    from the campaign's."""
    import datetime
    import uuid

    from monty.json import jsanitize

    from defectflow.engines import get_engine
    from defectflow.steps import job_name
    from defectflow.store.tracking import cache_key

    gen = gen or generation()
    settings = campaign.fidelities.low.model_dump(mode="json")
    digest = get_engine(settings).digest
    index = relaxation_index(part)
    cost = {"relaxations": 0, "cpu_seconds": 0.0, "wall_seconds": 0.0}
    store.connect()
    for ds in gen.distortion_sets:
        for st in ds.structures:
            name = relax_name(ds, st.label)
            row = index.get(name)
            if row is None:
                raise LookupError(f"{set_dir(part)}: relaxation {name} is not frozen (benchmarks/reference.py "
                                  f"compute --only {part})")
            if row["settings_digest"] != digest:
                raise ValueError(f"{name}: frozen with engine settings {row['settings_digest']}, the campaign's "
                                 f"fidelities.low is {digest}")
            rec = relaxation_record(part, name)
            args = {"structure": st.structure.to_json(), "charge": ds.charge, "settings": settings,
                    "fidelity": "low", "defect": ds.defect, "distortion": st.label,
                    "bond_distortion": st.bond_distortion, "fmax": campaign.relax.fmax,
                    "max_steps": campaign.relax.max_steps}
            doc = {"uuid": str(uuid.uuid4()), "index": 1, "name": job_name("relax_lf", ds.name, st.label),
                   "output": jsanitize(rec, strict=True, enum_values=True, allow_bson=True),
                   "completed_at": datetime.datetime.now(datetime.UTC).isoformat(), "hosts": [],
                   "metadata": {"step": "relax_lf", "campaign": f"frozen:{part}", "defect": ds.defect,
                                "charge": ds.charge, "distortion": st.label,
                                "cache_key": cache_key("relax_lf", args, engines=("settings",)),
                                "cost": {"wall_s": row["wall_seconds"], "cpu_s": 0.0,
                                         "cpu_children_s": row["cpu_seconds"]}}}
            store.update(doc, key=["uuid", "index"], save={"data": ["trajectory"]})
            cost["relaxations"] += 1
            cost["cpu_seconds"] += row["cpu_seconds"]
            cost["wall_seconds"] += row["wall_seconds"]
    return cost


def pool_frames(preset: str) -> list:
    """HF single points on the preset's LF frame pool (ASE Atoms: ``REF_*`` = HF, ``LF_*`` = LF labels)."""
    path = DATA / "lf" / preset / "pool_hf.extxyz.gz"
    return read_frames_gz(path) if path.is_file() else []


def lf_snb_states(preset: str, gen, charges=None) -> dict[str, dict[str, Any]]:
    """LF ShakeNBreak's ground state per q (the lowest frozen LF relaxation) with its HF energy from the frozen pool
    (every LF minimum is in it): "LF ShakeNBreak + one HF single point per q" without new DFT. ``charges``: only
    these q (default: every q of ``gen``)."""
    import numpy as np

    from defectflow.schemas import group_key

    index = relaxation_index(preset)
    pool = pool_frames(preset)
    out = {}
    for ds in gen.distortion_sets:
        if charges is not None and ds.charge not in charges:
            continue
        rows = {n: r for n, r in index.items() if r["charge"] == ds.charge and r["energy"] is not None
                and r["status"] != "failed"}
        best = min(rows, key=lambda n: rows[n]["energy"])
        rec = relaxation_record(preset, best)
        final = rec.trajectory.frames[-1]
        match = [a for a in pool if a.info.get("lf_relaxation") == best and int(a.info["lf_step"]) == final.step]
        hf = float(match[0].info["REF_energy"]) if match else None
        if match:
            assert np.allclose(match[0].positions, final.structure.cart_coords, atol=1e-5)
        out[group_key(ds.defect, ds.charge)] = {"label": rec.distortion, "charge": ds.charge,
                                                 "structure": final.structure, "hf_energy": hf,
                                                 "lf_energy": rec.energy}
    return out


def reference_summary() -> dict[str, Any]:
    """The direct-HF ground state per q, formation energies and CTLs (``reference.json``)."""
    data = read_json(DATA / "reference.json")
    if data is None:
        raise FileNotFoundError(f"{DATA / 'reference.json'}: the direct-HF search is not complete yet "
                                "(benchmarks/reference.py status)")
    return data
