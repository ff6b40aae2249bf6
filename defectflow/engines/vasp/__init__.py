"""VASP through atomate2's VASP makers, with doped/ShakeNBreak-style defect settings (for cluster users).

Modules: :mod:`~defectflow.engines.vasp.settings` (:class:`VaspSettings`), :mod:`~defectflow.engines.vasp.inputs`
(defect INCAR, POTCAR symbols and ZVALs, the makers), :mod:`~defectflow.engines.vasp.sets` (the atomate2 input-set
generator ``DefectSetGenerator``; imports atomate2, so it is loaded only by the makers),
:mod:`~defectflow.engines.vasp.outputs` (``vasprun.xml`` / ``TaskDoc`` → documents),
:mod:`~defectflow.engines.vasp.engine` (:class:`VaspEngine`).

VASP cannot run on every machine (licence, POTCARs), so this engine has two halves:

* **inputs** — :func:`relax_maker` / :func:`static_maker` return atomate2 makers (``RelaxMaker``, ``StaticMaker``,
  ``HSERelaxMaker``, ``HSEStaticMaker``) whose input-set generator writes a fixed-cell, spin-polarised defect
  INCAR with ``NELECT`` set for the total charge q. :meth:`VaspEngine.write_inputs` writes INCAR/KPOINTS/POSCAR and
  ``POTCAR.spec`` (the POTCAR symbols) for any q **without** POTCAR files, so the inputs can be inspected anywhere;
  for the ``high`` fidelity it writes a single-point (static: IBRION −1, NSW 0) INCAR by default, since the method
  only runs high-fidelity single points; ``kind="relax"`` asks for a relaxation;
* **outputs** — :func:`trajectory_from_task` / :func:`frames_from_task` (atomate2's ``TaskDoc``: every ionic step of
  ``calcs_reversed``), :func:`to_frame` and :func:`trajectory_from_vasprun` (``vasprun.xml``) turn a VASP run into
  :class:`~defectflow.schemas.Frame` / :class:`~defectflow.schemas.RelaxTrajectory` documents (energy, forces,
  stress of every ionic step; both sources give the same documents). A single point's Frame also carries what
  doped's finite-size corrections read (``Frame.potential``): the LOCPOT planar averages (``LVHAR`` is on) and the
  OUTCAR core potentials, from the TaskDoc (``output.locpot``, ``output.outcar``: :func:`potential_from_task`) or
  from the files with doped's readers (:func:`potential_from_directory`).

:meth:`VaspEngine.single_point` and :meth:`VaspEngine.relax` run one atomate2 maker job (custodian, then atomate2's
TaskDoc) with ``jobflow.run_locally`` in the engine's work directory, only when a VASP executable is configured;
otherwise they raise :class:`~defectflow.engines.base.EngineError`. The TaskDoc is kept: the documents are built from
it (``vasprun.xml`` is read only when atomate2 could not build one, e.g. a crashed run) and it is written to
``taskdoc.json.gz`` next to the run.

Why the makers are not jobs of the campaign graph (decision, atomate2 0.1.5 / jobflow 0.4)
------------------------------------------------------------------------------------------
Composing ``StaticMaker.make(structure)`` (output: ``TaskDoc``) into the graph in place of the engine's
``single_point`` job cannot keep resume, per-step accounting and failure recording, so the makers stay nested
inside the engine call (one graph job per HF point, whatever the engine):

* **Resume** — ``defectflow.store.tracking.tracked`` wraps the job *function*: before computing it looks up a
  finished output with the same ``metadata.cache_key`` (inputs + engine-settings digest) in the job's own store and
  returns it. An atomate2 job's function is the maker's ``make`` method (``@vasp_job``), which writes inputs and
  starts custodian in the job directory at once: there is no place for the lookup without re-implementing every
  maker's ``make``; a re-run campaign would run every VASP calculation again.
* **metadata.step / cost** — ``tracked`` writes ``metadata.step``, ``cost.wall_s``/``cpu_s``/``cpu_children_s`` and
  ``cache_key`` when the function returns; ``Results.cost`` and ``defectflow query --step`` read them. Per-step
  *resources* alone would survive (they match job names, ``"single_hf "``), the accounting would not.
* **Failure recording** — the engine contract is that physics failures are recorded (``Frame.error``,
  ``RelaxTrajectory.status``) and the campaign goes on. atomate2 raises when custodian gives up and, with its
  default ``VASP_HANDLE_UNSUCCESSFUL="error"``, on any unconverged run; jobflow then marks the job failed and
  never runs the jobs that reference its output (``collect_hf`` → training → search; ``bulk_reference`` →
  levels): one unconverged HF point would stop the campaign instead of being retried on resume.
* **Typed outputs** — every consumer (bulk reference, HF collection, verification, harvest) takes a ``Frame`` /
  ``RelaxTrajectory``; a ``TaskDoc`` output would need a VASP-only conversion job per HF point and VASP branches
  in the graph (``defectflow/flows.py``).

Nesting needs one repair, made in :meth:`VaspEngine._run`: jobflow's ``Job.run`` sets ``CURRENT_JOB`` to the nested
job and resets it to None when that job ends (or leaves it there when it fails), so ``tracked`` wrote the graph
job's ``metadata`` to the nested atomate2 job, or failed on None; the engine restores the graph job and its store.

Example (campaign YAML)::

    fidelities:
      high:
        engine: vasp
        xc: HSE06                 # PBE | PBEsol | HSE06 (AEXX 0.25, HFSCREEN 0.2 Å⁻¹)
        encut: 450                # eV
        kpoints: [1, 1, 1]        # Γ only (default); e.g. [2, 2, 2] for a Γ-centred mesh
        incar_updates:            # override any default (null removes a tag)
          NCORE: 8
          KPAR: 1
          ALGO: Damped
        user_potcar_settings: {Ga: Ga_d}

Cluster set-up: atomate2 reads ``~/.atomate2.yaml`` (or ``ATOMATE2_CONFIG_FILE``)::

    VASP_CMD: srun vasp_std
    VASP_GAMMA_CMD: srun vasp_gam     # used by custodian for Γ-only KPOINTS
    # and pymatgen's ~/.config/.pmgrc.yaml: PMG_VASP_PSP_DIR: /path/to/potcars

then run the campaign with ``defectflow submit`` (FireWorks / jobflow-remote). ``command`` / ``gamma_command`` in
the engine settings override ``VASP_CMD`` / ``VASP_GAMMA_CMD`` for one fidelity.

Charge convention: q is the total charge of the cell in e, so ``NELECT = sum(ZVAL) - q`` (q = -1: one extra
electron). The ZVALs come from the POTCAR files when pymatgen can find them; otherwise from pymatgen's bundled
POTCAR summary data (``pymatgen/io/vasp/potcar-summary-stats.json.bz2``), which records ZVAL per POTCAR symbol and
functional — so NELECT is exact even without POTCARs on disk.
"""

from defectflow.engines.vasp.engine import VaspEngine
from defectflow.engines.vasp.inputs import defect_incar, relax_maker, static_maker, zval_for
from defectflow.engines.vasp.outputs import (
    KBAR_TO_EV_PER_A3,
    frames_from_task,
    potential_from_directory,
    potential_from_task,
    to_frame,
    trajectory_from_task,
    trajectory_from_vasprun,
    vasp_stress_to_ase,
)
from defectflow.engines.vasp.settings import VaspSettings

__all__ = [
    "KBAR_TO_EV_PER_A3",
    "VaspEngine",
    "VaspSettings",
    "defect_incar",
    "frames_from_task",
    "potential_from_directory",
    "potential_from_task",
    "relax_maker",
    "static_maker",
    "to_frame",
    "trajectory_from_task",
    "trajectory_from_vasprun",
    "vasp_stress_to_ase",
    "zval_for",
]
