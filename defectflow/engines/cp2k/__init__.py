"""CP2K engine: local PBE for any element (GTH pseudopotentials, MOLOPT basis sets); HSE06+ADMM (slow).

Modules: :mod:`~defectflow.engines.cp2k.settings` (:class:`CP2KSettings`), :mod:`~defectflow.engines.cp2k.inputs`
(data files, spin, the input template), :mod:`~defectflow.engines.cp2k.outputs` (SCF and band-edge parsing),
:mod:`~defectflow.engines.cp2k.engine` (:class:`CP2KEngine`, :class:`RecordingCP2K`).

Single points and relaxations go through ASE's :class:`ase.calculators.cp2k.CP2K` calculator, which keeps one
``cp2k_shell`` process (``env OMP_NUM_THREADS=1 mpirun -np N cp2k_shell.psmp``, started in the work directory)
alive for a whole relaxation: the ASE optimizer (BFGS) moves the atoms, the shell receives the new positions,
and CP2K starts each SCF from the ASPC-extrapolated wavefunction of the previous ionic steps (measured: 21 SCF
iterations at step 0, 15 at each later step).

Why ASE's calculator and not atomate2's CP2K makers: the local engine must record every ionic step in our own
:class:`~defectflow.schemas.RelaxTrajectory` (the base class drives ASE optimizers), the persistent shell
reuses the wavefunction between steps, and pymatgen's CP2K input sets have quirks measured here
(``xc_functionals`` must be passed explicitly; ``hybrid_functional=HSE06`` silently gives truncated PBE0; the
ADMM basis line it writes, ``BASIS_SET BASIS_SET AUX_FIT cFIT3``, is rejected by CP2K 2023.1). The input
written here is small and explicit (see :meth:`CP2KEngine.render_input`); a user ``inp`` template is merged on
top of it.

Physics choices
---------------
* Charge: CP2K's ``CHARGE`` (GPW adds the neutralising background of a charged periodic cell implicitly).
* Spin: the valence-electron count comes from the GTH potential (``GTH-PBE-q4`` → 4 for Si: the ``-qN`` alias
  or, failing that, the electron-count line of the potential file). ``spin: auto`` → unrestricted Kohn–Sham
  (UKS) with ``MULTIPLICITY 2`` when the count is odd, restricted otherwise; ``on`` → UKS always (multiplicity
  1 or 2); ``off`` → restricted (an odd count then relies on smearing). ``Frame.magnetization`` is the imposed
  moment (multiplicity − 1, in μB), not a computed one.
* SCF for PBE: ``scf: smear`` (default) = diagonalisation, Fermi–Dirac smearing (``smearing_temperature``, 300
  K default), Broyden mixing, ``added_mos`` extra orbitals. It converged every charged 7-atom Si vacancy case
  tried here. ``scf: ot`` = orbital transformation (DIIS, FULL_SINGLE_INVERSE, outer SCF) with integer
  occupations: on the 7-atom vacancy it was 8× slower (48 s vs 6 s) and landed 0.18 eV higher (a different
  occupation of the degenerate vacancy levels) — use it for clean insulating cells only.
* HSE06: PBE correlation + ωPBE exchange scaled to 75 % short range (ω = 0.11 bohr⁻¹), 25 % short-range HF
  (``&HF``, ``INTERACTION_POTENTIAL SHORTRANGE``, Schwarz screening ``hf_eps_schwarz``), ADMM with the
  ``cFIT3`` auxiliary basis from ``BASIS_ADMM`` (that file has cFIT3 only for light elements, H–Cl: transition
  metals need e.g. ``aux_basis_set_file: BASIS_ADMM_MOLOPT``, ``aux_basis_set: admm-dzp``;
  :meth:`CP2KEngine.check` names the missing one), always OT (diagonalisation + smearing did not converge), no
  stress. Cost, honestly: 706 s for one 7-atom single point on 2 cores (98 s with loose screening), estimated
  over 1 h at 63 atoms; cells under ~29 Å warn that the short-range cutoff exceeds half the cell. The
  generated HSE06 input passes ``cp2k.psmp --check``, but no HSE06 SCF is run in the tests.
* Band edges (``scf: smear`` only): ``&DFT/&PRINT/&MO`` prints every MO's eigenvalue and occupation (occupied
  + ``added_mos``) once per evaluation into ``cp2k.out``; each frame gets ``vbm`` (highest eigenvalue with
  occupation > half the maximum), ``cbm`` (lowest below half) and ``fermi_level`` (``E(Fermi)``), in eV on
  CP2K's scale (:func:`parse_band_edges`). No extra cost beyond a table in the output. With OT (``scf: ot``
  and HSE06) they stay None: CP2K 2023.1 printed wrong (shifted) eigenvalues for an OT run of bulk Si.
* Processes: the shell line is ``cd <workdir> && exec setsid env OMP_NUM_THREADS=1 mpirun -np N
  cp2k_shell.psmp`` (``setsid`` from util-linux when present: a session of its own), so an interrupt of the
  Python call (Ctrl-C, SIGTERM handled by the CLI) or an error ends the shell, mpirun and every rank
  (:meth:`CP2KEngine.close_calculator` in a ``finally`` block; :mod:`defectflow.engines.process`).
* SCF non-convergence is recorded, never raised. CP2K 2023.1 carries on after ``SCF run NOT converged`` (it
  has no ``IGNORE_CONVERGENCE_FAILURE`` yet); the engine reads the part of ``cp2k.out`` (work directory; CP2K
  appends to it) written during each evaluation and sets ``Frame.scf_converged=False`` with an ``error``,
  keeping CP2K's last energy/forces on the frame. A relaxation stops at the first unconverged ionic step
  (forces of an unconverged SCF would steer BFGS astray, and each such step costs ``max_scf`` iterations): the
  trajectory keeps every frame, the flagged one last, with status ``failed``.

Measured costs (CP2K 2023.1 Debian, 2 cores, ``mpirun -np 2``, OMP_NUM_THREADS=1, Γ only, DZVP-MOLOPT-SR-GTH,
7-atom Si vacancy; wall seconds per call including shell start-up; another code ran ``pw.x -np 2`` on the same
2 cores throughout, so these are upper bounds, roughly 2× the idle figures)::

    cutoff/rel_cutoff   q=0 single point    q=-1 single point (UKS)   relax step 0 / later steps
    400/50 Ry           12 s (13-14 SCF)    50-55 s (22-24 SCF)       -
    200/30 Ry (tests)    4-7 s (14 SCF)     19-27 s (22 SCF)          10.6 s (21 SCF) / 7.4-7.9 s (15 SCF)

200/30 Ry changes the 7-atom energy by 0.2 meV vs 400/50 Ry; cost is dominated by grid
collocation/integration, which follows ``rel_cutoff`` more than ``cutoff``.

Example (campaign YAML)::

    low:
      engine: cp2k
      xc: PBE
      cutoff: 400          # Ry
      rel_cutoff: 50       # Ry
      basis_set: DZVP-MOLOPT-SR-GTH
      scf: smear
      mpi_procs: 2
"""

from defectflow.engines.cp2k.engine import CP2KEngine, RecordingCP2K, ScfNotConverged
from defectflow.engines.cp2k.inputs import (
    MO_PRINT,
    data_dir,
    find_basis,
    find_potential,
    hse06_xc,
    input_template,
    merge_inputs,
    scf_section,
    spin_state,
    valence_electrons,
)
from defectflow.engines.cp2k.outputs import parse_band_edges, parse_scf
from defectflow.engines.cp2k.settings import DEFAULT_DATA_DIR, CP2KSettings

__all__ = [
    "DEFAULT_DATA_DIR",
    "MO_PRINT",
    "CP2KEngine",
    "CP2KSettings",
    "RecordingCP2K",
    "ScfNotConverged",
    "data_dir",
    "find_basis",
    "find_potential",
    "hse06_xc",
    "input_template",
    "merge_inputs",
    "parse_band_edges",
    "parse_scf",
    "scf_section",
    "spin_state",
    "valence_electrons",
]
