"""``defectflow`` command line.

Subcommands that exist today do real work; the ones still being built say so and exit with status 3 instead of
pretending (see the project's issues for the plan).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

EXIT_INVALID = 2
EXIT_NOT_BUILT = 3

DESCRIPTION = """\
defectflow: hybrid-functional-quality defect ground states and charge-transition levels (CTLs)
at a fraction of the cost of a direct hybrid-DFT ShakeNBreak search.

The pipeline, per defect and charge state q:
  1. generate   doped defects + charge states, ShakeNBreak bond distortions and rattles
  2. relax_lf   relax every distortion with the cheap engine (e.g. PBE); keep every ionic step
  3. single_hf  high-fidelity (e.g. HSE06) single points on a small, well-chosen subset
  4. train      one charge-embedded, multi-fidelity MACE model for all q
  5. search     the surrogate relaxes every distortion (and more), HF verifies the ground state,
                doped computes formation energies and CTLs

A campaign is a YAML file (see workflows/ and docs/campaign-reference.md)."""

EPILOG = """\
examples:
  defectflow validate workflows/quickstart.yaml     check a campaign, print its summary
  defectflow engines                                which engines can run on this machine
  defectflow run workflows/quickstart.yaml          run a campaign locally (embedded store), all five steps
  defectflow schema > campaign.schema.json          JSON schema of the campaign file
  defectflow schema --markdown                      every campaign key, its type, default and units

exit status: 0 ok, 2 invalid input (one line per problem, naming the field), 3 not built yet."""

PLANNED = {
    "submit": ("submit a campaign to FireWorks or jobflow-remote", "issue #6 (executors and MongoDB)"),
    "status": ("per-step progress of a campaign", "issue #6"),
    "results": ("ground states, CTLs, model metrics and cost per step", "issue #6"),
    "query": ("Mongo-style queries over any job store (--json)", "issue #6"),
    "plot": ("energy-vs-distortion, parity, PCA and formation-energy plots", "issues #4 and #5"),
    "benchmark": ("accuracy and cost against a direct high-fidelity search", "issue #7"),
}


def _cmd_validate(args) -> int:
    from defectflow.campaign import Campaign, CampaignError

    try:
        campaign = Campaign.from_yaml(args.campaign)
        host = campaign.host_structure()
    except CampaignError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        print(campaign.model_dump_json(indent=2, exclude={"host": {"structure"}}))
        return 0
    lo, hi = campaign.fidelities.low, campaign.fidelities.high
    print(f"campaign {campaign.name!r} is valid")
    print(f"  host        {host.composition.reduced_formula} ({len(host)} atoms in the input cell)")
    print(f"  defects     {', '.join(campaign.defects.include)}")
    print(f"  charges     {campaign.charges}")
    grid = campaign.distortions.bond_distortions or f"±0.6 in steps of {campaign.distortions.distortion_increment}"
    print(f"  distortions {grid}{' + Dimer' if campaign.distortions.dimer else ''} + Unperturbed")
    print(f"  low  (LF)   {lo.engine} {lo.xc}")
    print(f"  high (HF)   {hi.engine} {hi.xc}   budget {campaign.selection.budget} single points "
          f"({campaign.selection.strategy})")
    print(f"  surrogate   MACE {campaign.mlip.multi_fidelity}, charge embedding "
          f"{'on' if campaign.mlip.charge_embedding else 'off'}")
    print(f"  store       {campaign.execution.store} → {campaign.work_dir()}")
    return 0


def _cmd_run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from defectflow.campaign import Campaign, CampaignError
    from defectflow.engines import EngineError
    from defectflow.submit import BUILT_STEPS, run_campaign

    console = Console(stderr=True)
    try:
        campaign = Campaign.from_yaml(args.campaign)
        campaign.host_structure()
    except CampaignError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_INVALID
    if args.work_dir:
        campaign.execution.work_dir = args.work_dir
    console.print(f"[bold]defectflow run[/] {campaign.name} → {campaign.work_dir()}")
    steps = "lf" if args.lf_only else "all"
    console.print(f"steps: {', '.join(BUILT_STEPS if steps == 'all' else BUILT_STEPS[:5])}")
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("[dim]{task.fields[current]}")]
    with Progress(*columns, console=console, transient=False, disable=args.quiet) as bar:
        task = bar.add_task("jobs", total=None, current="building the graph (doped + ShakeNBreak)")

        def progress(event, name, done, total):
            bar.update(task, total=total, completed=done, current=name if event == "starting" else "")

        try:
            result = run_campaign(campaign, progress=progress, steps=steps)
        except (CampaignError, EngineError) as exc:
            bar.stop()
            for line in str(exc).splitlines():
                print(f"error: {line}", file=sys.stderr)
            return EXIT_INVALID
    table = Table(title=f"Low-fidelity ShakeNBreak search ({campaign.fidelities.low.engine} "
                        f"{campaign.fidelities.low.xc})")
    for col in ("defect", "q", "ground state", "ΔE vs Unperturbed (eV)", "converged", "failed"):
        table.add_column(col)
    for name, s in result.summaries.items():
        lowering = "-" if s.energy_lowering is None else f"{s.energy_lowering:+.3f}"
        gs = (s.ground_state or "-").replace("Bond_Distortion_", "")
        table.add_row(s.defect, f"{s.charge:+d}", gs, lowering,
                      f"{s.n_converged}/{len(s.status)}", str(s.n_failed))
    out = Console()
    out.print(table)
    res = result.result
    if res is not None:
        gs = Table(title=f"Ground states (surrogate search, verified with {campaign.fidelities.high.engine} "
                         f"{campaign.fidelities.high.xc})")
        for col in ("defect", "q", "from start", "E_HF (eV)", "|E_HF − E_MLIP| (meV/atom)", "minima",
                    "baseline RMSD (Å)"):
            gs.add_column(col)
        for r in sorted(res.ground_states, key=lambda r: (r.defect, r.charge)):
            err = "-" if r.verification_error_mev_per_atom is None else f"{r.verification_error_mev_per_atom:.1f}"
            base = "-" if r.baseline_rmsd is None else f"{r.baseline_rmsd:.3f}"
            e = "-" if r.hf_energy is None else f"{r.hf_energy:.4f}"
            gs.add_row(r.defect, f"{r.charge:+d}", (r.ground_state_label or "-").replace("Bond_Distortion_", ""),
                       e, err, str(r.n_minima), base)
        Console().print(gs)
        if res.levels is not None:
            lv = Table(title=f"Charge-transition levels (VBM = 0, gap {res.levels.band_gap:.2f} eV, "
                             f"correction: {res.levels.correction_scheme})")
            for col in ("defect", "level", "eV above VBM", "in gap"):
                lv.add_column(col)
            for t in res.levels.transition_levels:
                lv.add_row(t.defect, f"ε({t.q_from:+d}/{t.q_to:+d})", f"{t.level:.3f}", "yes" if t.in_gap else "no")
            Console().print(lv)
            if not res.levels.transition_levels:
                Console().print("no transition level within [VBM − 1 eV, CBM + 1 eV]")
        else:
            Console().print(f"[yellow]levels not computed:[/] {res.levels_error}")
        Console().print(f"HF calculations: {res.hf_calls} ({res.hf_seconds:.0f} s); verification rounds: "
                        f"{len(res.rounds)}")
    ts = result.training_set
    if ts:
        out.print(f"training set: {ts['n_frames']} frames of {ts['n_candidates']} ionic steps, "
                  f"charges {ts['charges']} → {ts['path']}")
    for p in result.plots:
        out.print(f"plot: {p}")
    out.print(f"{result.n_jobs} jobs in {result.wall_seconds:.0f} s; store: {campaign.execution.store} "
              f"({result.work_dir / 'store'})")
    if result.failed_jobs or result.failures:
        out.print(f"[red]{len(result.failed_jobs)} job(s) did not finish:[/] {', '.join(result.failed_jobs[:5])}")
        for name, why in result.failures.items():
            out.print(f"[red]  {name}:[/] {why}")
        if result.failures:
            out.print(f"full tracebacks: {result.work_dir / 'failures.log'}")
        return 1
    return 0


def _cmd_engines(args) -> int:
    rows = []
    for name, exe, pkg in [
        ("qe", "pw.x", "apt install quantum-espresso quantum-espresso-data"),
        ("cp2k", "cp2k_shell.psmp", "apt install cp2k cp2k-data"),
        ("mpi", "mpirun", "apt install openmpi-bin"),
        ("vasp", "vasp_std", "cluster only: configure atomate2 (VASP_CMD)"),
    ]:
        path = shutil.which(exe)
        rows.append((name, exe, path or "-", "yes" if path else f"no ({pkg})"))
    for mod, label in [("tblite", "ase:tblite (GFN1/GFN2-xTB)"), ("mace", "ase:mace"), ("chgnet", "ase:chgnet")]:
        try:
            __import__(mod)
            ok = "yes"
        except Exception as exc:  # noqa: BLE001 - report any import failure
            ok = f"no ({type(exc).__name__})"
        rows.append((label, mod, "python", ok))
    if args.json:
        print(json.dumps([dict(zip(("engine", "needs", "where", "available"), r)) for r in rows], indent=2))
    else:
        width = max(len(r[0]) for r in rows)
        for r in rows:
            print(f"{r[0]:<{width}}  {r[1]:<16} {r[3]:<5}  {r[2]}")
    return 0


def _cmd_schema(args) -> int:
    from defectflow.campaign import Campaign

    if args.markdown:
        from defectflow.reference import campaign_reference_markdown

        print(campaign_reference_markdown())
    else:
        print(json.dumps(Campaign.model_json_schema(), indent=2))
    return 0


def _not_built(name: str):
    def run(args) -> int:
        what, where = PLANNED[name]
        print(
            f"defectflow {name}: not built yet ({what}). It is planned in {where}; "
            "nothing was run.",
            file=sys.stderr,
        )
        return EXIT_NOT_BUILT

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defectflow",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("validate", help="check a campaign YAML and print a summary",
                       description="Validate a campaign file. Errors name the field, e.g.\n"
                       "  error: c.yaml: fidelities.low.engine: expected one of 'qe', 'cp2k', 'vasp', 'ase', got 'x'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("campaign", help="campaign YAML file")
    p.add_argument("--json", action="store_true", help="print the full validated campaign (with defaults) as JSON")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("run", help="run a campaign locally (embedded store) with progress",
                       description="Build the campaign graph and run it on this machine into the store named in\n"
                       "execution.store (default: embedded sqlite under the work directory):\n"
                       "  1 doped + ShakeNBreak generation    2 LF relaxation of every distortion (+ plots)\n"
                       "  3 HF single points on selected frames  4 charge-embedded multi-fidelity MACE\n"
                       "  5 surrogate search, HF verification, doped CTLs and formation-energy diagram\n"
                       "Ends with tables of ground states and CTLs and the paths of the plots.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("campaign", help="campaign YAML file")
    p.add_argument("--work-dir", help="override execution.work_dir")
    p.add_argument("--lf-only", action="store_true", help="stop after step 2 (generation + LF relaxations)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("engines", help="which engines (QE, CP2K, VASP, ASE calculators) can run here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_engines)

    p = sub.add_parser("schema", help="print the JSON schema (or the Markdown reference) of campaign files")
    p.add_argument("--markdown", action="store_true", help="Markdown reference (docs/campaign-reference.md)")
    p.set_defaults(func=_cmd_schema)

    for name, (what, where) in PLANNED.items():
        p = sub.add_parser(name, help=f"{what} [not built yet: {where}]",
                           description=f"{what}.\nNot built yet: planned in {where}.")
        p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
        p.set_defaults(func=_not_built(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from defectflow import __version__

        print(__version__)
        return 0
    import warnings

    # monty's `cd` helper prints this deprecation once per job; it says nothing to a defectflow user
    warnings.filterwarnings("ignore", message=r"(?s).*contextlib\.chdir")
    # mace-torch sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD itself and then warns about it on every model load
    warnings.filterwarnings("ignore", message=r"Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2), format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
