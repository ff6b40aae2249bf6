"""Example 5: the charge-embedded, two-head MACE surrogate trained on your own extxyz files, then used as an ASE
calculator at a chosen total charge.

Training data are two extended-XYZ files, one per fidelity, each frame with:

==================  ========  ===========================================================
key                 where     meaning
==================  ========  ===========================================================
``REF_energy``      info      total energy of the frame, eV
``REF_forces``      arrays    forces, eV/Å (one row per atom)
``total_charge``    info      total charge q of the cell, e (q = −1: one extra electron)
==================  ========  ===========================================================

(``defectflow.train.data`` names them ENERGY_KEY, FORCES_KEY, CHARGE_KEY; a campaign writes the same keys in
``runs/<name>/training_lf.xyz``.) The low-fidelity (LF) file holds many cheap frames (e.g. PBE, every ionic step
of every relaxation), the high-fidelity (HF) file a few expensive ones (e.g. HSE06 single points) at geometries like
the LF ones. ``train_surrogate`` trains defectflow's default recipe (``MlipSpec.multi_fidelity = "finetune"``, chosen
by the training study in docs/benchmarks.md): a MACE on the LF frames (head ``lf``), then the same model fine-tuned
on the HF frames (head ``hf``), both conditioned on q (mace-torch's total-charge embedding) and with
per-(fidelity, q) reference energies removed before training and added back at prediction; mace-torch's
``mace_run_train`` runs in a subprocess. ``multi_fidelity="multihead"`` trains one MACE with a shared body and both
heads at once instead. A part of the HF frames is held out for testing (``MlipSpec.hf_test_fraction``).
``load_calculator`` turns the trained model into an ASE calculator, which reads q from ``atoms.info["charge"]``:
one model serves every charge state.

Without ``--lf``/``--hf`` the script first writes such files itself, from xTB single points (tblite) on rattled
15-atom Si vacancy cells at q = 0 and +1: GFN1-xTB as LF on every geometry, GFN2-xTB as HF on every other one. It
then prints the surrogate's energies of a new geometry at each ``--charges`` value (and, for those demo data, the
GFN2-xTB energies to compare with).

    python examples/05_train_own_surrogate.py --fast
    python examples/05_train_own_surrogate.py --lf pbe.xyz --hf hse.xyz --structure relaxed.cif --charges -1 0 1

Time on 2 cores: ``--fast`` (16 LF + 8 HF demo frames, a tiny model, 20 epochs) about 1 min; the default (24 + 12
frames, defectflow's default recipe, 30 + 30 epochs) not re-timed since the recipe changed. The fitted model is
written to ``<out>/model.json`` (load it again with ``TrainedModel.model_validate_json``); mace's logs and
checkpoints stay in ``<out>/training/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read, write
from pymatgen.core import Lattice, Structure

from defectflow.campaign import MlipSpec
from defectflow.engines import AseSettings, get_engine
from defectflow.train import TrainedModel, load_calculator, train_surrogate
from defectflow.train.data import CHARGE_KEY, ENERGY_KEY, FORCES_KEY

#: the demo data: GFN1-xTB as low, GFN2-xTB as high fidelity (tblite)
DEMO_LF = AseSettings(calculator="tblite.ase.TBLite", xc="GFN1-xTB", kwargs={"method": "GFN1-xTB", "verbosity": 0})
DEMO_HF = AseSettings(calculator="tblite.ase.TBLite", xc="GFN2-xTB", kwargs={"method": "GFN2-xTB", "verbosity": 0})
DEMO_CHARGES = (0, 1)


def si_vacancy_cell(rattle: float, seed: int) -> Structure:
    """15-atom Si vacancy cell (2×2×2 primitive diamond cell, a = 5.431 Å, one atom removed), every atom displaced
    by a Gaussian of standard deviation ``rattle`` (Å), reproducibly for ``seed``."""
    cell = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]]).get_primitive_structure()
    cell.make_supercell(2)
    cell.remove_sites([0])
    displaced = cell.cart_coords + np.random.default_rng(seed).normal(0.0, rattle, (len(cell), 3))
    return Structure(cell.lattice, cell.species, displaced, coords_are_cartesian=True)


def to_atoms(structure: Structure) -> Atoms:
    """A pymatgen Structure as periodic ASE Atoms (positions and cell in Å)."""
    return Atoms([site.specie.symbol for site in structure], positions=structure.cart_coords,
                 cell=structure.lattice.matrix, pbc=True)


def labelled_atoms(structure: Structure, charge: int, energy: float, forces: list[list[float]]) -> Atoms:
    """One training frame: the geometry with its energy (eV), forces (eV/Å) and total charge under the keys
    defectflow and mace-torch read."""
    atoms = to_atoms(structure)
    atoms.info[ENERGY_KEY] = energy
    atoms.info[CHARGE_KEY] = charge
    atoms.arrays[FORCES_KEY] = np.asarray(forces)
    return atoms


def write_demo_data(out: Path, n_geometries: int) -> tuple[Path, Path]:
    """Write ``lf.xyz`` (GFN1-xTB, every geometry) and ``hf.xyz`` (GFN2-xTB, every other geometry) at q = 0 and
    +1 into ``out``; frames whose SCF did not converge are left out. Returns the two paths."""
    lf_engine, hf_engine = get_engine(DEMO_LF, fidelity="low"), get_engine(DEMO_HF, fidelity="high")
    lf, hf = [], []
    for i in range(n_geometries):
        structure = si_vacancy_cell(rattle=0.05, seed=100 + i)
        for q in DEMO_CHARGES:
            engines = [(lf_engine, lf)] + ([(hf_engine, hf)] if i % 2 == 0 else [])
            for engine, frames in engines:
                frame = engine.single_point(structure, q, workdir=out / "xtb")
                if frame.energy is not None and frame.scf_converged:
                    frames.append(labelled_atoms(structure, q, frame.energy, frame.forces))
    paths = out / "lf.xyz", out / "hf.xyz"
    for path, frames in zip(paths, (lf, hf)):
        write(path, frames, format="extxyz")
        print(f"wrote {path}: {len(frames)} frames")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true",
                        help="few demo frames and a tiny model trained for 20 epochs (~1 min)")
    parser.add_argument("--lf", type=Path, default=None, help="your LF extxyz (default: demo data written here)")
    parser.add_argument("--hf", type=Path, default=None, help="your HF extxyz (default: demo data written here)")
    parser.add_argument("--structure", type=Path, default=None,
                        help="structure to evaluate (any file ASE reads; default: a new demo geometry, or the first "
                             "frame of --hf)")
    parser.add_argument("--charges", type=int, nargs="+", default=list(DEMO_CHARGES),
                        help="total charges q (e) to evaluate the structure at (default: 0 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/example-surrogate"),
                        help="output folder: demo data, model.json, mace's training files (default runs/example-surrogate)")
    args = parser.parse_args(argv)
    if (args.lf is None) != (args.hf is None):
        parser.error("give both --lf and --hf, or neither (demo data)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    demo = args.lf is None
    lf_path, hf_path = write_demo_data(out, 8 if args.fast else 12) if demo else (args.lf, args.hf)
    tiny = MlipSpec(hidden_irreps="8x0e", max_L=0, num_interactions=2, correlation=2, r_max=4.0, max_epochs=20)
    spec = tiny if args.fast else MlipSpec()  # MlipSpec(): defectflow's default recipe (finetune, 30 + 30 epochs)
    trained = train_surrogate(str(lf_path), str(hf_path), spec, out / "training")
    model_file = out / "model.json"
    model_file.write_text(trained.model_dump_json())
    print(f"trained {trained.kind} model (heads {', '.join(trained.heads)}) in {trained.wall_seconds:.0f} s; "
          f"saved to {model_file}")

    # later, in any script: the saved model as an ASE calculator of its HF head
    calc = load_calculator(TrainedModel.model_validate_json(model_file.read_text()), head="hf")
    new_geometry = None  # the demo's check: a geometry the model was not trained on, also computed with GFN2-xTB
    if args.structure is not None:
        atoms = read(args.structure)
    elif demo:
        new_geometry = si_vacancy_cell(rattle=0.05, seed=999)
        atoms = to_atoms(new_geometry)
    else:
        atoms = read(hf_path, index=0)
    print(f"surrogate (hf head) on a {len(atoms)}-atom structure:")
    for q in args.charges:
        atoms.info["charge"] = q  # the total charge the model is evaluated at, e
        atoms.calc = calc
        energy, fmax = atoms.get_potential_energy(), np.abs(atoms.get_forces()).max()
        line = f"  q={q:+d}: E = {energy:.4f} eV, max |F| component = {fmax:.3f} eV/Å"
        if new_geometry is not None:
            reference = get_engine(DEMO_HF, fidelity="high").single_point(new_geometry, q, workdir=out / "xtb")
            line += f" (GFN2-xTB: {reference.energy:.4f} eV)"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
