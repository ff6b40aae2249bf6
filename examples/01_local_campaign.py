"""Example 1: a point-defect campaign built in Python and run on this machine.

The campaign is the silicon vacancy (v_Si) of ``workflows/quickstart.yaml``, written with defectflow's
:class:`~defectflow.campaign.Campaign` model instead of YAML, so that a script can build many campaigns (other hosts,
other charge states, a loop over settings). ``run_campaign`` then runs all five steps in this process:

1. doped builds the vacancy supercell, ShakeNBreak its distorted starting structures per charge state q;
2. the low-fidelity (LF) engine relaxes every distorted structure;
3. a few LF frames are chosen and computed again with the high-fidelity (HF) engine;
4. a charge-embedded, two-head MACE surrogate is trained on the LF and HF frames;
5. the surrogate searches for the ground state of each q, the HF engine verifies each ground state, and doped gives
   the charge-transition levels (CTLs).

Every job's output goes to the campaign's store: ``embedded`` (one SQLite file under the work directory, no server)
or a MongoDB URI (``--store``). Examples 2 and 3 submit this same campaign to jobflow-remote and FireWorks, and
example 4 queries what it stored.

Two sizes (``--fast`` picks the small one):

* default: 30-atom cell, q = −1, 0, +1, ShakeNBreak −30 %, 0 %, +30 % and Dimer starts; GFN1-xTB (tblite) as LF,
  Quantum ESPRESSO PBE (``pw.x``, Debian's Si pseudopotential, 20 Ry, Γ only) as HF. About 15 min on 2 cores.
* ``--fast``: 15-atom cell, q = 0, +1, Unperturbed and +30 % starts; GFN1-xTB as LF, GFN2-xTB as HF; a MACE small
  enough to train in seconds; no top-up round. About 1 min on 2 cores, no DFT code needed.

Neither is converged defect physics (tiny cells, Γ only, xTB as a fidelity): they show the pipeline end to end.
Adapt :func:`build_campaign` (host structure, defects, charges, fidelities) for a real study; every field, its
units and default are in docs/campaign-reference.md.

    python examples/01_local_campaign.py --fast
    python examples/01_local_campaign.py --store mongodb://localhost:27017/defects
"""

from __future__ import annotations

import argparse
import sys

from pymatgen.core import Lattice, Structure

from defectflow.campaign import (
    Campaign,
    DefectsSpec,
    DistortionsSpec,
    ExecutionSpec,
    FidelitiesSpec,
    HostSpec,
    LevelsSpec,
    MlipSpec,
    RelaxSpec,
    SearchSpec,
    SelectionSpec,
    SupercellSpec,
    VerifySpec,
)
from defectflow.engines import AseSettings, QESettings
from defectflow.submit import CampaignRun, run_campaign

#: experimental lattice constant of diamond Si, Å
SI_LATTICE_A = 5.431

#: campaign names of the two sizes (examples 2-4 use the same names)
NAME, FAST_NAME = "example-si-vacancy", "example-si-vacancy-fast"


def silicon_primitive() -> Structure:
    """The 2-atom primitive cell of diamond Si (a = 5.431 Å), built in Python instead of read from a file."""
    conventional = Structure.from_spacegroup("Fd-3m", Lattice.cubic(SI_LATTICE_A), ["Si"], [[0, 0, 0]])
    return conventional.get_primitive_structure()


def xtb(method: str, electronic_temperature: float = 300.0) -> AseSettings:
    """A tblite xTB fidelity (``method``: GFN1-xTB or GFN2-xTB); Fermi smearing at ``electronic_temperature`` (K)."""
    return AseSettings(calculator="tblite.ase.TBLite", xc=method,
                       kwargs={"method": method, "verbosity": 0, "electronic_temperature": electronic_temperature})


def build_campaign(fast: bool = False, store: str = "embedded", work_dir: str | None = None) -> Campaign:
    """The v_Si campaign as a :class:`Campaign` (see the module docstring for the two sizes).

    ``store``: ``embedded`` or a MongoDB URI (``mongodb://host:port/database``). ``work_dir``: where job folders,
    plots and the embedded store go (default ``runs/<campaign name>``, relative to the current directory).
    """
    execution = ExecutionSpec(store=store, work_dir=work_dir or "runs/{name}")
    host = silicon_primitive()
    if fast:
        return Campaign(
            name=FAST_NAME,
            description="v_Si, q = 0, +1; GFN1-xTB -> GFN2-xTB, 15-atom cell (a quick demonstration)",
            host=HostSpec(structure=host, supercell=SupercellSpec(matrix=[[2, 0, 0], [0, 2, 0], [0, 0, 2]]),
                          oxidation_states={"Si": 4}),
            defects=DefectsSpec(include=["v_Si"]),
            charges=[0, 1],
            distortions=DistortionsSpec(bond_distortions=[0.3], dimer=False),
            fidelities=FidelitiesSpec(low=xtb("GFN1-xTB"), high=xtb("GFN2-xTB")),
            relax=RelaxSpec(fmax=0.3, max_steps=4),            # eV/Å; a few ionic steps are enough to show the flow
            selection=SelectionSpec(strategy="minima", budget=2),  # two HF single points in all
            mlip=MlipSpec(hidden_irreps="8x0e", max_L=0, num_interactions=2, correlation=2, r_max=4.0,
                          max_epochs=20, batch_size=4),
            search=SearchSpec(extra_starts=0, fmax=0.2, max_steps=15),
            verify=VerifySpec(max_rounds=0),
            levels=LevelsSpec(dielectric=11.7),                 # Si, ionic + electronic
            execution=execution,
        )
    return Campaign(
        name=NAME,
        description="v_Si, q = -1, 0, +1; GFN1-xTB -> QE PBE, 30-atom cell (workflows/quickstart.yaml in Python)",
        host=HostSpec(structure=host, supercell=SupercellSpec(min_image_distance=8.0, min_atoms=30),
                      oxidation_states={"Si": 4}),   # ShakeNBreak distorts the vacancy's dangling-bond neighbours
        defects=DefectsSpec(include=["v_Si"]),
        charges=[-1, 0, 1],
        distortions=DistortionsSpec(bond_distortions=[-0.3, 0.0, 0.3], dimer=True),
        # 3000 K smearing: the q = -1 vacancy's nearly degenerate defect level converges in every start
        fidelities=FidelitiesSpec(low=xtb("GFN1-xTB", electronic_temperature=3000.0),
                                  high=QESettings(xc="PBE", ecutwfc=20.0)),
        relax=RelaxSpec(fmax=0.1, max_steps=50, keep_every=6),
        selection=SelectionSpec(strategy="fps", budget=12),
        mlip=MlipSpec(multi_fidelity="finetune", finetune_min_frames=32, finetune_epochs=20),  # fewer FT steps
        search=SearchSpec(extra_starts=1, fmax=0.05, max_steps=200),
        verify=VerifySpec(energy_threshold=50.0, max_rounds=1),  # meV/atom; one top-up round above it
        levels=LevelsSpec(dielectric=11.7),
        execution=execution,
    )


def print_run(run: CampaignRun) -> None:
    """What a run produced: jobs, HF-verified ground states per (defect, q) and the CTLs."""
    print(f"campaign {run.campaign.name}: {run.n_jobs} jobs in {run.wall_seconds:.0f} s, "
          f"{len(run.failed_jobs)} failed; work directory {run.work_dir}")
    if run.result is None:
        print("no final result (see failures.log in the work directory)")
        return
    print("ground states (lowest HF energy among the verified surrogate minima and the known HF frames):")
    for g in run.result.ground_states:
        error = g.verification_error_mev_per_atom
        if g.hf_energy is None:  # nothing could be verified (e.g. every surrogate minimum rejected)
            print(f"  {g.defect} q={g.charge:+d}: no HF-verified ground state ({g.reason or 'see the verify job'})")
            continue
        print(f"  {g.defect} q={g.charge:+d}: start {g.ground_state_label}, E_HF = {g.hf_energy:.4f} eV, "
              + (f"|E_HF - E_surrogate| = {error:.1f} meV/atom" if error is not None else f"{g.source}: {g.reason}"))
    for r in run.result.rounds:
        print(f"  round {r.round}: {r.hf_calls} HF calls, {len(r.added)} frames added before it"
              + (f"; stopped: {r.stop_reason}" if r.stop_reason else ""))
    levels = run.result.levels
    if levels is None:
        print(f"no transition levels: {run.result.levels_error}")
        return
    print(f"transition levels (eV above the VBM; gap {levels.band_gap:.2f} eV, correction {levels.correction_scheme}):")
    for t in levels.transition_levels:
        print(f"  {t.defect} ε({t.q_from:+d}/{t.q_to:+d}) = {t.level:.3f} eV{'' if t.in_gap else ' (outside the gap)'}")


def print_submitted_run(campaign: Campaign, flow_uuid: str, states: dict[str, dict[str, int]], executor: str) -> int:
    """What a run submitted to FireWorks or jobflow-remote reached (examples 02 and 03): the job states per step
    (``status_of_submission``) and the ground states in the campaign's store (HF-verified, or the LF ones of an
    LF-only run), energies in eV. Returns the exit status: 0 when every job COMPLETED."""
    from defectflow.results import Results
    from defectflow.store import open_store

    print(f"{executor} states per step:")
    for step, counts in states.items():
        print(f"  {step}: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    results = Results(open_store(campaign.execution.store), campaign.name, run=flow_uuid)
    print("ground states:")
    for g in results.ground_states():
        energy = g["hf_energy"] if g["source"] != "lf" else g["lf_energy"]
        print(f"  {g['defect']} q={g['charge']:+d}: start {g['ground_state_label']}, "
              f"E = {energy:.4f} eV ({g['source']})")
    return 0 if all(set(counts) == {"COMPLETED"} for counts in states.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Results stay in the store: `defectflow results`, examples/04_query_mongodb.py")
    parser.add_argument("--fast", action="store_true",
                        help="the small campaign: 15-atom cell, q = 0, +1, xTB as LF and HF, ~1 min on 2 cores")
    parser.add_argument("--store", default="embedded",
                        help="'embedded' (a SQLite file in the work directory, default) or a MongoDB URI "
                             "mongodb://host:port/database")
    parser.add_argument("--work-dir", default=None,
                        help="work directory: job folders, plots, the embedded store (default runs/<campaign name>)")
    args = parser.parse_args(argv)

    campaign = build_campaign(fast=args.fast, store=args.store, work_dir=args.work_dir)
    print(f"running {campaign.name} in {campaign.work_dir()} (store: {campaign.execution.store})", flush=True)
    run = run_campaign(campaign)
    print_run(run)
    return 0 if run.result is not None and not run.failed_jobs else 1


if __name__ == "__main__":
    sys.exit(main())
