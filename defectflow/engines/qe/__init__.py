"""Quantum ESPRESSO (pw.x) engine: the fast local HSE06 engine (and PBE).

Modules: :mod:`~defectflow.engines.qe.settings` (:class:`QESettings`, units), :mod:`~defectflow.engines.qe.inputs`
(pseudopotentials, the pw.x input), :mod:`~defectflow.engines.qe.outputs` (``pw.out`` parsing),
:mod:`~defectflow.engines.qe.engine` (:class:`QEEngine`).

What it runs
------------
* ``single_point``: ``pw.x`` with ``calculation='scf'``, ``tprnfor``/``tstress`` on. Energy in eV (with
  smearing: QE's ``!`` total energy, the free energy the forces belong to), forces in eV/Å, stress in eV/Å³
  (Voigt, ASE sign convention) and total magnetisation in μB, read with
  ``ase.io.read(format='espresso-out')``.
* ``relax``: native ``calculation='relax'``, fixed cell: BFGS with second-order wavefunction and potential
  extrapolation. Every ionic step becomes a :class:`~defectflow.schemas.Frame`. Our ``fmax`` bounds the force
  *norm*; QE's ``forc_conv_thr`` bounds each *component*, so it is set to ``fmax/√3`` (in Ry/bohr), which
  guarantees max |F| < fmax when QE stops (QE also needs ``etot_conv_thr`` between steps).
* Charge: ``tot_charge = q``, the same sign convention as ours (q = -1: one extra electron; checked against
  the "number of electrons" QE prints). Charged periodic cells carry QE's compensating background.
* Spin: ``spin: auto`` sets ``nspin = 2`` when the valence electron count Σ z_valence − q (z_valence from the
  UPF files) is odd, starting from a 1 μB moment spread over the cell; ``on``/``off`` force it. The moment
  may converge elsewhere (the 7-atom Si vacancy anion ends at 3 μB: its t2 level is triply degenerate at Γ).
* Hybrids: ``xc: HSE06`` → ``input_dft='hse'`` (ω = 0.106 bohr⁻¹), ``PBE0`` → ``'pbe0'``, with ``nqx = 1``,
  ``exxdiv_treatment='gygi-baldereschi'``, ``x_gamma_extrapolation`` and ``ecutfock = 2 × ecutwfc`` unless
  set (docs/engines.md: same energy as QE's default 4 × ecutwfc within 1e-7 Ry, half the time). A hybrid's energy is QE's final
  ``!!`` line (ASE's reader returns the first ``!`` line of the EXX loop, which is not the converged one).
* Band edges: ``nbnd`` = occupied + ``empty_bands`` (default max(4, 10 % of the occupied bands); QE's own
  smearing default was max(+4, +20 %), so small cells run the same bands as before and large ones fewer) and
  ``verbosity='high'`` so pw.x prints the occupations. Each frame (every relax step) gets ``vbm``/``cbm``
  (eV, QE's absolute scale) from the last eigenvalue table of its SCF (the EXX-converged one for hybrids):
  VBM = highest eigenvalue with occupation > 0.5, CBM = lowest with occupation < 0.5, over k-points and
  spins (:func:`parse_band_edges`), and ``fermi_level`` from "the Fermi energy is". Bulk Si 8 atoms, 2×2×2,
  20 Ry: gap 0.72 eV. Cost: none measurable at 7-8 atoms (PBE and HSE06: same nbnd as QE's default there);
  with hybrids the EXX work grows ∝ nbnd (Fock operator applied to every band), so many extra bands cost.
* Electrostatic potential (``electrostatic_potential: true``; a campaign turns it on for the bulk and verification
  single points when ``levels.correction`` needs it): after the SCF, ``pp.x`` (``plot_num = 11``: local ionic +
  Hartree potential, Ry, the G = 0 term of the local pseudopotentials included, as pw.x uses it) writes
  ``potential.cube.gz`` in the workdir; the Frame keeps its planar averages along a, b, c (eV, the sign of VASP's
  LOCPOT: doped's FNV) and its value at each atom averaged with a Gaussian test charge of σ = 0.5 Å (V, the
  sign doped's eFNV takes from VASP's OUTCAR), so the levels step needs no files (``Frame.potential``). pp.x runs
  serially, ~0.5 s at 7 atoms.
* Pseudopotentials: from ``pseudo_dir`` (default ``$ESPRESSO_PSEUDO``, else ``/usr/share/espresso/pseudo``
  from Debian's ``quantum-espresso-data``), chosen per element from the UPF headers: PBE norm-conserving
  scalar-relativistic first (by file name), then PBE norm-conserving with spin-orbit, then — semi-local
  functionals only — PBE ultrasoft/PAW. Hybrids take only norm-conserving defaults. ``pseudopotentials``
  overrides per element. With Debian's set, Si → ``Si.pbe-rrkj.UPF``. ``xc: LDA`` (``input_dft='pz'``) takes
  Perdew-Zunger LDA files the same way (Si → ``Si.pz-vbc.UPF``).
* Input: written by ASE's ``write_espresso_in`` (:func:`make_pw_input`; namelists from :func:`pw_namelists`),
  cell and Cartesian positions in Å.
* Parallelisation: ``mpirun -np <mpi_procs or all usable cores> pw.x -in pw.in``, ``OMP_NUM_THREADS=1``, in a
  session of its own (:mod:`defectflow.engines.process`): a timeout or an interrupt of the Python call
  (Ctrl-C, SIGTERM handled by the CLI) ends mpirun and every pw.x rank (SIGTERM, SIGKILL 10 s later).
  Files: ``pw.in``, ``pw.out``, ``pw.err`` in the workdir; QE's ``out/`` scratch is removed unless
  ``keep_outdir``.
* Failures: an unconverged SCF ("convergence NOT achieved"), a pw.x crash or a ``timeout_s`` kill is recorded
  in the returned document (``Frame.scf_converged = False`` + ``error``; ``RelaxTrajectory.status = 'failed'``
  with the frames done so far), never raised. :class:`EngineError` is raised only for set-up problems:
  pw.x, mpirun or a pseudopotential missing.

Measured cost
-------------
QE 6.7 (Debian), 2 cores, ``mpirun -np 2``, Γ only, ecutwfc 20 Ry, Fermi–Dirac 0.002 Ry, 7-atom Si vacancy
cell; wall time of the whole call (mpirun start-up ≈ 0.4 s included). Other jobs (CP2K) shared the 2 cores
(load average 4–6), so these are pessimistic, by up to ~2× for PBE and up to ~5× for HSE06:

=============================================  ================================
PBE single point q = 0                          1.2–1.8 s
PBE single point q = −1 (nspin = 2)             2.3–2.6 s
HSE06 single point q = 0, forces + stress       13–37 s
HSE06 single point q = −1                       32–35 s
PBE relax, rattled 0.05 Å, 3 ionic steps        3.9–5.3 s (pw.x itself 1.8–3.9 s)
=============================================  ================================

On a quiet machine (docs/engines.md, "Measured costs"): PBE 0.7/0.9 s (7 atoms, q = 0/−1), 10.5/23.6 s
(63 atoms); HSE06 6.4 s (7 atoms), 35 s (15 atoms), 114/251 s (63 atoms, q = 0/−1).
A relaxation that hits ``nstep`` costs ~1–2 s more: pw.x exits with status 3 and mpirun's abort path is slow.

Example (campaign YAML)::

    high:
      engine: qe
      xc: HSE06
      ecutwfc: 30          # Ry
      ecutfock: 60         # Ry (default 2 × ecutwfc)
      kpts: [1, 1, 1]      # Γ only (gamma tricks)
      smearing: fd
      degauss: 0.002       # Ry
      pseudo_dir: /usr/share/espresso/pseudo
      pseudopotentials: {Si: Si.pbe-rrkj.UPF}
      mpi_procs: 2
"""

from defectflow.engines.qe.engine import QEEngine
from defectflow.engines.qe.inputs import (
    UPFInfo,
    default_pseudo_dir,
    make_pp_input,
    make_pw_input,
    n_bands,
    n_valence_electrons,
    pw_namelists,
    read_upf_header,
    select_pseudopotentials,
    unique_elements,
)
from defectflow.engines.qe.outputs import (
    PwResult,
    parse_band_edges,
    parse_pw_output,
    read_potential_cube,
    suspect_forces,
)
from defectflow.engines.qe.settings import (
    DEFAULT_PSEUDO_DIR,
    HYBRID_DFT,
    RY_IN_EV,
    RY_PER_BOHR_IN_EV_PER_ANG,
    QESettings,
)

__all__ = [
    "DEFAULT_PSEUDO_DIR",
    "HYBRID_DFT",
    "RY_IN_EV",
    "RY_PER_BOHR_IN_EV_PER_ANG",
    "PwResult",
    "QEEngine",
    "QESettings",
    "UPFInfo",
    "default_pseudo_dir",
    "make_pp_input",
    "make_pw_input",
    "n_bands",
    "n_valence_electrons",
    "parse_band_edges",
    "parse_pw_output",
    "suspect_forces",
    "pw_namelists",
    "read_potential_cube",
    "read_upf_header",
    "select_pseudopotentials",
    "unique_elements",
]
