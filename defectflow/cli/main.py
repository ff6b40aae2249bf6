"""``defectflow`` command line.

Every subcommand does real work; ``defectflow <subcommand> --help`` explains it with examples.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

EXIT_INVALID = 2

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
  defectflow status workflows/quickstart.yaml       per-step progress of its newest run
  defectflow results workflows/quickstart.yaml      ground states, CTLs, model metrics, cost per step
  defectflow report workflows/quickstart.yaml       one self-contained HTML page of the run (tables + figures)
  defectflow query workflows/quickstart.yaml --step relax_lf --charge 0   job documents (--json)
  defectflow submit CAMPAIGN --manager fireworks    submit to FireWorks (or jobflow-remote)
  defectflow schema > campaign.schema.json          JSON schema of the campaign file
  defectflow schema --markdown                      every campaign key, its type, default and units

exit status: 0 ok, 1 a run finished with failed jobs, 2 invalid input or cannot start (one line per problem,
naming the field: a bad campaign, a MongoDB server that does not answer, a work directory in use by another run),
130 / 143 run stopped by Ctrl-C / SIGTERM (the same command resumes it)."""


def _errors(problems, source: str | None = None) -> int:
    """Print one ``error:`` line per problem (prefixed with the campaign file unless it already is)."""
    for p in problems:
        for line in str(p).splitlines():
            if source and not line.startswith(f"{source}: "):
                line = f"{source}: {line}"
            print(f"error: {line}", file=sys.stderr)
    return EXIT_INVALID


def _load(path: str):
    """The campaign of ``path``; raises CampaignError."""
    from defectflow.campaign import Campaign

    return Campaign.from_yaml(path)


def _cmd_validate(args) -> int:
    from defectflow.campaign import CampaignError
    from defectflow.preflight import preflight

    try:
        campaign = _load(args.campaign)
    except CampaignError as exc:
        return _errors(str(exc).splitlines())
    generation: list = []
    problems = preflight(campaign, fast=args.fast, generation_out=generation)
    if problems:
        return _errors(problems, campaign.source)
    host = campaign.host_structure()
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
    if generation:
        g = generation[0]
        print(f"  generated   {len(g.distortion_sets)} (defect, q) sets, {g.n_structures} structures in a "
              f"{len(g.bulk_supercell)}-atom supercell: "
              + ", ".join(f"{d} {qs}" for d, qs in g.charges.items()))
    print("  checked     host, defect names, engines (executables, pseudopotentials, calculators), store, work "
          "directory" + ("" if args.fast else ", doped generation") + (" (--fast: doped generation skipped)"
                                                                       if args.fast else ""))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# run: signals, progress
# ---------------------------------------------------------------------------------------------------------------
class _Terminated(BaseException):
    """SIGTERM, raised in the main thread (a BaseException, so that no job's ``except Exception`` swallows it)."""


def _install_signals():
    """SIGINT → KeyboardInterrupt, SIGTERM → _Terminated; returns the previous handlers."""
    import signal

    def on_term(signum, frame):
        raise _Terminated()

    def on_int(signum, frame):
        raise KeyboardInterrupt()

    return {signal.SIGTERM: signal.signal(signal.SIGTERM, on_term), signal.SIGINT: signal.signal(signal.SIGINT, on_int)}


def _ignore_signals() -> None:
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _restore_signals(old) -> None:
    import signal

    for sig, handler in old.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _terminate_engines() -> None:
    """End every engine child process group (mpirun + pw.x, cp2k_shell, mace_run_train) still alive."""
    try:
        from defectflow.engines.process import terminate_all
    except ImportError:
        terminate_all = None
    if terminate_all is not None:
        try:
            terminate_all()
        except Exception as exc:  # noqa: BLE001 - the run is being stopped; report and go on
            logging.getLogger(__name__).warning("could not end every engine process: %s", exc)


def _same_command() -> str:
    import shlex

    return "defectflow " + shlex.join(sys.argv[1:])


def _fmt_elapsed(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Tally:
    """What a run did so far, from the progress callback: jobs done / total, finished per step, the current job."""

    def __init__(self):
        import time

        self.t0 = time.monotonic()
        self.done = 0
        self.total = 0
        self.current = "building the graph (doped + ShakeNBreak)"
        self.step = "generation"
        self.finished: dict[str, int] = {}

    def update(self, event: str, name: str, done: int, total: int) -> bool:
        """Record an event; True when the step changed."""
        from defectflow.steps import step_of

        self.done, self.total = done, total
        step = step_of(name) or name.split(" ", 1)[0]
        if event == "finished":
            self.finished[step] = self.finished.get(step, 0) + 1
            self.current = ""
            return False
        self.current = name
        changed = step != self.step
        self.step = step
        return changed

    def line(self) -> str:
        import time

        if not self.total:
            return f"progress: {self.current}, elapsed {_fmt_elapsed(time.monotonic() - self.t0)}"
        job = f"; running {self.current}" if self.current else ""
        return (f"progress: {self.done}/{self.total or '?'} jobs done, step {self.step}{job}, elapsed "
                f"{_fmt_elapsed(time.monotonic() - self.t0)}")

    def summary(self) -> str:
        from defectflow.steps import STEPS

        order = list(STEPS)
        per = ", ".join(f"{k} {v}" for k, v in sorted(self.finished.items(),
                                                       key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))
        return f"{self.done} of {self.total or '?'} jobs finished" + (f" ({per})" if per else "")


class _PlainProgress:
    """Progress for logs (stdout not a terminal): a plain line at every step change and every ``every`` seconds."""

    def __init__(self, tally: _Tally, every: float, stream=None):
        import threading

        self.tally = tally
        self.every = every
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="defectflow-progress", daemon=True)

    def emit(self) -> None:
        with self._lock:
            print(self.tally.line(), file=self.stream, flush=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.emit()

    def __enter__(self):
        self.emit()
        if self.every > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        return False


def _cmd_run(args) -> int:
    import contextlib

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from defectflow.campaign import CampaignError
    from defectflow.engines import EngineError
    from defectflow.preflight import check_generated, preflight
    from defectflow.store import StoreError
    from defectflow.store.lock import WorkDirLocked, lock_holder
    from defectflow.submit import run_campaign, steps_of_run

    console = Console(stderr=True)
    try:
        campaign = _load(args.campaign)
    except CampaignError as exc:
        return _errors(str(exc).splitlines())
    source = campaign.source
    if args.work_dir:
        campaign.execution.work_dir = args.work_dir
    work = campaign.work_dir()
    holder = lock_holder(work) if work.is_dir() else None
    if holder is not None:
        return _errors([f"{work} is in use by another run (PID {holder.get('pid')}, started "
                        f"{holder.get('started', '?')}): wait for it to end or stop it"])
    problems = preflight(campaign, fast=True, create=True)
    if args.work_dir:
        problems = [p.replace("execution.work_dir:", "--work-dir:", 1) for p in problems]
    if problems:
        return _errors(problems, source)

    steps = "lf" if args.lf_only else "all"
    console.print(f"[bold]defectflow run[/] {campaign.name} → {work}", soft_wrap=True)
    console.print(f"steps: {', '.join(steps_of_run(steps, bool(campaign.search.foundation_baseline)))}",
                  soft_wrap=True)
    tally = _Tally()
    plain = not sys.stdout.isatty() and not args.quiet
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("[dim]{task.fields[current]}")]
    old_signals = _install_signals()
    interrupted = None
    try:
        with contextlib.ExitStack() as stack:
            bar = stack.enter_context(Progress(*columns, console=console, transient=False,
                                               disable=args.quiet or plain))
            task = bar.add_task("jobs", total=None, current=tally.current)
            printer = stack.enter_context(_PlainProgress(tally, args.progress_every)) if plain else None

            def progress(event, name, done, total):
                changed = tally.update(event, name, done, total)
                bar.update(task, total=total, completed=done, current=name if event == "starting" else "")
                if printer is not None and changed:
                    printer.emit()

            try:
                from defectflow.generate import generate

                generation = generate(campaign)
                problems = check_generated(campaign, generation)
                if problems:
                    bar.stop()
                    return _errors(problems, source)
                result = run_campaign(campaign, progress=progress, steps=steps, generation=generation)
            except (CampaignError, EngineError, StoreError, WorkDirLocked) as exc:
                bar.stop()
                if isinstance(exc, CampaignError):
                    return _errors(exc.problems, exc.source or source)
                return _errors(str(exc).splitlines())
    except KeyboardInterrupt:
        interrupted = ("SIGINT", 130)
    except _Terminated:
        interrupted = ("SIGTERM", 143)
    finally:
        if interrupted:
            _ignore_signals()  # a second Ctrl-C must not interrupt the clean-up
            _terminate_engines()
        _restore_signals(old_signals)
    if interrupted:
        name, code = interrupted
        print(f"interrupted ({name}): {tally.summary()}, kept in the store; resume with: {_same_command()}",
              file=sys.stderr, flush=True)
        return code
    code = _report_run(campaign, result)
    _write_run_report(campaign, result)
    return code


def _write_run_report(campaign, result) -> None:
    """The run's HTML page at ``<work_dir>/report.html`` (what ``defectflow report`` writes); a failure is one
    warning line, never the run's failure."""
    try:
        from defectflow.report import write_report
        from defectflow.results import Results

        text = Path(campaign.source).read_text() if campaign.source else campaign.to_yaml()
        path = write_report(Results.for_campaign(campaign, run=result.flow_uuid), text,
                            result.work_dir / "report.html", store_label=_store_label(campaign))
    except Exception as exc:  # noqa: BLE001 - the run itself finished; the page is a convenience
        print(f"warning: could not write the HTML report ({type(exc).__name__}: {exc}); "
              f"`defectflow report {campaign.source or 'CAMPAIGN'}` writes it from the store", file=sys.stderr)
        return
    print(f"report: {path}")


def _store_label(campaign) -> str:
    """Where a campaign's store is, for people: the embedded store's folder or the masked MongoDB URI."""
    from defectflow.store import mask_uri

    return (str(campaign.work_dir() / "store") if campaign.execution.store == "embedded"
            else mask_uri(campaign.execution.store))


def _report_run(campaign, result) -> int:
    from rich.console import Console
    from rich.table import Table

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
        rows = [{**g.model_dump(), "ground_state_source": g.source} for g in res.ground_states]
        out.print(_ground_state_table(rows, f"Ground states (surrogate search, verified with "
                                            f"{campaign.fidelities.high.engine} {campaign.fidelities.high.xc})"))
        if res.levels is not None:
            _print_levels(out, res.levels.model_dump())
        else:
            out.print(f"[yellow]levels not computed:[/] {res.levels_error}")
        out.print(f"HF calculations: {res.hf_calls} ({res.hf_seconds:.0f} s); verification rounds: "
                  f"{len(res.rounds)}")
    ts = result.training_set
    if ts:
        out.print(f"training set: {ts['n_frames']} frames of {ts['n_candidates']} ionic steps, "
                  f"charges {ts['charges']} → {ts['path']}")
    for p in result.plots:
        out.print(f"plot: {p}")
    from defectflow.store import mask_uri

    where = result.work_dir / "store" if campaign.execution.store == "embedded" else mask_uri(campaign.execution.store)
    out.print(f"{result.n_jobs} jobs in {result.wall_seconds:.0f} s; store: {campaign.execution.store} ({where})")
    if result.failed_jobs or result.failures:
        out.print(f"[red]{len(result.failed_jobs)} job(s) did not finish:[/] {', '.join(result.failed_jobs[:5])}")
        for name, why in result.failures.items():
            out.print(f"[red]  {name}:[/] {why}")
        if result.failures:
            out.print(f"full tracebacks: {result.work_dir / 'failures.log'}")
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------------
# tables shared by run / results
# ---------------------------------------------------------------------------------------------------------------
def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _ground_state_table(rows: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title)
    lf = rows and rows[0].get("source") == "lf"
    cols = (("defect", "q", "ground state (LF ShakeNBreak)", "E_LF (eV)", "ΔE vs Unperturbed (eV)") if lf else
            ("defect", "q", "from start", "E_HF (eV)", "|E_HF − E_MLIP| (meV/atom)", "σ_E (meV)", "σ_F (eV/Å)",
             "HF F_max (eV/Å)", "minima", "round", "baseline RMSD (Å)"))
    for col in cols:
        table.add_column(col)
    for r in sorted(rows, key=lambda r: (r["defect"], r["charge"])):
        label = (r.get("ground_state_label") or "-").replace("Bond_Distortion_", "")
        if lf:
            table.add_row(r["defect"], f"{r['charge']:+d}", label, _fmt(r.get("lf_energy"), ".4f"),
                          _fmt(r.get("energy_lowering"), "+.3f"))
        else:
            std = r.get("energy_std")
            if r.get("ground_state_source") == "known HF frame":
                label += " (known HF frame)"
            table.add_row(r["defect"], f"{r['charge']:+d}", label, _fmt(r.get("hf_energy"), ".4f"),
                          _fmt(r.get("verification_error_mev_per_atom"), ".1f"),
                          _fmt(None if std is None else 1000 * std, ".1f"), _fmt(r.get("force_std")),
                          _fmt(r.get("hf_max_force")),
                          str(r.get("n_minima", "-")),
                          _fmt(r.get("round"), "d"), _fmt(r.get("baseline_rmsd")))
    return table


def _print_levels(console, levels: dict) -> None:
    from rich.table import Table

    table = Table(title=f"Charge-transition levels (VBM = 0, gap {levels['band_gap']:.2f} eV, "
                        f"correction: {levels['correction_scheme']})")
    for col in ("defect", "level", "eV above VBM", "in gap"):
        table.add_column(col)
    for t in levels.get("transition_levels", []):
        table.add_row(t["defect"], f"ε({t['q_from']:+d}/{t['q_to']:+d})", f"{t['level']:.3f}",
                      "yes" if t["in_gap"] else "no")
    console.print(table)
    if not levels.get("transition_levels"):
        console.print("no transition level within [VBM − 1 eV, CBM + 1 eV]")


def _rounds_table(rounds: list[dict]):
    """Active-learning rounds: verified minima, errors, changed ground states, frames added, HF cost."""
    from rich.table import Table

    table = Table(title="Verification and top-up rounds")
    for col in ("round", "verified minima", "max |E_HF − E_MLIP| (meV/atom)", "max σ_E (meV)", "max σ_F (eV/Å)",
                "ground state changed",
                "frames added before it", "left out of training", "HF calls", "HF CPU (s)"):
        table.add_column(col)
    for r in rounds:
        checks = [c for cs in (r.get("verified") or {}).values() for c in cs]
        errs = [c["error_mev_per_atom"] for c in checks if c.get("error_mev_per_atom") is not None]
        stds = [1000 * c["energy_std"] for c in checks if c.get("energy_std") is not None]
        fstds = [c["force_std"] for c in checks if c.get("force_std") is not None]
        added = r.get("added") or []
        why = ", ".join(f"{n} {k}" for k, n in sorted(_count(a["reason"] for a in added).items()))
        table.add_row(str(r["round"]), str(len(checks)), _fmt(max(errs) if errs else None, ".1f"),
                      _fmt(max(stds) if stds else None, ".1f"), _fmt(max(fstds) if fstds else None),
                      ", ".join(r.get("changed") or []) or "none",
                      f"{len(added)}" + (f" ({why})" if why else ""),
                      "; ".join(f"{x['group']} {x['label']}: {x['reason']}" for x in r.get("not_trained") or [])
                      or "none", str(r.get("hf_calls", "-")),
                      _fmt(r.get("hf_cpu_seconds"), ".0f"))
    return table


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _metrics_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="Surrogate and ablations: held-out HF errors")
    for col in ("model", "kind", "charge emb.", "E RMSE (meV/atom)", "F RMSE (meV/Å)", "LF E RMSE (meV/atom)",
                "train (s)"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["kind"], "yes" if r["charge_embedding"] else "no",
                      _fmt(r.get("hf_test_energy_rmse"), ".1f"), _fmt(r.get("hf_test_force_rmse"), ".0f"),
                      _fmt(r.get("lf_valid_energy_rmse"), ".1f"), _fmt(r.get("wall_seconds"), ".0f"))
    return table


def _cost_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="Cost per step")
    for col in ("step", "jobs", "reused", "wall (s)", "CPU (s)", "HF calls"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["step"], str(r["jobs"]), str(r["reused"]), f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
                      str(r["hf_calls"] or "-"))
    tot = {k: sum(r[k] for r in rows) for k in ("jobs", "reused", "wall_s", "cpu_s", "hf_calls")}
    table.add_row("[bold]total", str(tot["jobs"]), str(tot["reused"]), f"{tot['wall_s']:.1f}", f"{tot['cpu_s']:.1f}",
                  str(tot["hf_calls"]))
    return table


# ---------------------------------------------------------------------------------------------------------------
# results / query / status / submit
# ---------------------------------------------------------------------------------------------------------------
class _Source:
    """Where a read-only command reads from: the store, the campaign (when a file was given), its work directory."""

    def __init__(self, store, campaign=None, work_dir: Path | None = None, name: str | None = None,
                 label: str = ""):
        self.store = store
        self.campaign = campaign
        self.work_dir = work_dir
        self.name = name
        self.label = label


def _open_source(args) -> _Source:
    """The store for ``args.campaign`` / ``--store`` / ``--work-dir`` without creating anything; raises
    CampaignError or ValueError (StoreError: no store there yet, MongoDB unreachable)."""
    from defectflow.store import mask_uri, open_store

    name = getattr(args, "name", None)
    work_dir = Path(args.work_dir).resolve() if getattr(args, "work_dir", None) else None
    if args.store:
        if args.store.startswith(("mongodb://", "mongodb+srv://")) or args.store == "mongodb":
            return _Source(open_store(args.store), name=name, work_dir=work_dir,
                           label=mask_uri(args.store))
        path = Path(args.store)
        path = path / "store" if (path / "store").is_dir() else path
        if not path.is_dir():
            raise ValueError(f"--store: expected a MongoDB URI or an embedded store directory, got {args.store!r}")
        from defectflow.store import embedded_store

        return _Source(embedded_store(path, create=False), name=name, work_dir=path.parent, label=str(path))
    if args.campaign:
        campaign = _load(args.campaign)
        if work_dir is not None:
            campaign.execution.work_dir = str(work_dir)
        work = campaign.work_dir()
        store = open_store(campaign.execution.store, work)
        return _Source(store, campaign=campaign, work_dir=work, name=name or campaign.name,
                       label=_store_label(campaign))
    if work_dir is not None:
        return _Source(open_store("embedded", work_dir), work_dir=work_dir, name=name, label=str(work_dir / "store"))
    raise ValueError("expected a campaign YAML file, --work-dir DIR or --store URI|DIR")


def _open_results(args):
    """Results for ``args.campaign`` (YAML), ``--store`` or ``--work-dir`` (+ ``--name``), and the source."""
    from defectflow.results import Results

    src = _open_source(args)
    return Results(src.store, src.name, run=getattr(args, "run", None)), src


def _run_state(r, src) -> dict:
    """Is the selected run finished? ``{"state": finished|lf-only|unfinished|running, "newest": uuid,
    "newest_state": ..., "jobs": n}`` from the store (and the work directory's run lock when there is one)."""
    from defectflow.store.lock import lock_holder

    runs = r.runs()

    def state(run_id: str, finished: bool) -> str:
        if finished:
            return "finished"
        names = {d["name"] for d in r.store.query({"hosts": run_id, "name": {"$in": ["harvest_lf", "select"]}},
                                                  properties=["name"])}
        return "lf-only" if names == {"harvest_lf"} else "unfinished"

    info = {r2["run"]: r2 for r2 in runs}
    me = info.get(r.run)
    out = {"state": state(r.run, me["finished"]) if me else "unfinished"}
    holder = lock_holder(src.work_dir) if src.work_dir is not None and src.work_dir.is_dir() else None
    if runs and runs[0]["run"] != r.run:
        out["newest"] = runs[0]["run"]
        out["newest_state"] = "running" if holder else state(runs[0]["run"], runs[0]["finished"])
    elif holder and out["state"] != "finished":
        out["state"] = "running"
    if holder:
        out["running_pid"] = holder.get("pid")
    out["jobs"] = r.store.count({"hosts": r.run}) if r.run else 0
    return out


def _state_line(state: dict, src) -> str | None:
    """One line saying the run is unfinished / running, or that a newer run is; None for a finished run."""
    again = f"defectflow run {src.campaign.source}" if src.campaign is not None and src.campaign.source else \
        "defectflow run CAMPAIGN"
    s = state["state"]
    line = None
    if s == "running":
        line = f"this run is still running (PID {state.get('running_pid')}): {state['jobs']} jobs finished so far"
    elif s == "unfinished":
        line = (f"this run is unfinished ({state['jobs']} jobs finished, no final result): resume it with `{again}` "
                "(and the options it was started with)")
    elif s == "lf-only":
        line = "this run stopped after step 2 (--lf-only): ground states are the LF ShakeNBreak ones"
    if state.get("newest"):
        newer = {"running": f"still running (PID {state.get('running_pid')})", "unfinished": "unfinished",
                 "lf-only": "LF only"}.get(state.get("newest_state"), state.get("newest_state"))
        extra = f"a newer run {state['newest']} is {newer}; --run {state['newest']} shows it"
        line = f"{line}; {extra}" if line else extra
    return line


def _fail(exc: Exception) -> int:
    for line in str(exc).splitlines():
        print(f"error: {line}", file=sys.stderr)
    return EXIT_INVALID


def _no_run(r) -> LookupError:
    return LookupError(f"no campaign run found in this store{f' for {r.campaign!r}' if r.campaign else ''}")


def _cmd_results(args) -> int:
    from rich.console import Console

    from defectflow.campaign import CampaignError
    from defectflow.results import write_json

    try:
        r, src = _open_results(args)
        if r.run is None:
            raise _no_run(r)
    except (CampaignError, ValueError, LookupError) as exc:
        return _fail(exc)
    state = _run_state(r, src)
    show = set(args.show.split(",")) if args.show else {"ground-states", "levels", "rounds", "metrics", "cost"}
    data = {"run": r.run, "campaign": r.campaign, "state": state["state"], "jobs": state["jobs"]}
    if state.get("newest"):
        data["newest_run"] = {"run": state["newest"], "state": state["newest_state"]}
    if "runs" in show:
        data["runs"] = r.runs()
    if "ground-states" in show:
        data["ground_states"] = [{k: v for k, v in g.items() if k != "structure" or args.structures}
                                 for g in r.ground_states()]
    if "levels" in show:
        data["levels"] = r.levels()
    if "rounds" in show:
        data["rounds"] = r.rounds()
    if "metrics" in show:
        data["model_metrics"] = r.model_metrics()
    if "cost" in show:
        data["cost"] = r.cost()
    if args.json:
        print(write_json(data))
        return 0
    out = Console()
    out.print(f"campaign [bold]{r.campaign or '?'}[/], run {r.run} ({state['state']})")
    note = _state_line(state, src)
    if note:
        out.print(f"[yellow]{note}[/]", soft_wrap=True)
    if "runs" in show:
        for run in data["runs"]:
            out.print(f"  {run['run']}  {run['campaign']}  started {run['started']}  "
                      f"{'final result' if run['finished'] else 'no final result'}")
    if data.get("ground_states"):
        title = ("Ground states (LF ShakeNBreak search; no final result in this run)"
                 if data["ground_states"][0]["source"] == "lf" else "Ground states (surrogate search, HF verified)")
        out.print(_ground_state_table(data["ground_states"], title))
    elif "ground-states" in show:
        out.print("ground states: none yet (no (defect, q) has finished its LF relaxations in this run)")
    if data.get("levels"):
        _print_levels(out, data["levels"])
    elif "levels" in show and state["state"] != "finished":
        out.print("levels: none yet (computed at the end of a full run)")
    if data.get("rounds"):
        out.print(_rounds_table(data["rounds"]))
        last = data["rounds"][-1]
        if last.get("stop_reason"):
            out.print(f"stopped after round {last['round']}: {last['stop_reason']}")
    if data.get("model_metrics"):
        out.print(_metrics_table(data["model_metrics"]))
    if data.get("cost"):
        out.print(_cost_table(data["cost"]))
    return 0


def _cmd_query(args) -> int:
    from defectflow.campaign import CampaignError
    from defectflow.results import write_json

    try:
        criteria = json.loads(args.filter) if args.filter else {}
        if not isinstance(criteria, dict):
            raise ValueError(f"--filter: expected a JSON object such as '{{\"metadata.charge\": 0}}', got {args.filter!r}")
        r, src = _open_results(args)
    except json.JSONDecodeError as exc:
        return _fail(ValueError(f"--filter: expected JSON ({exc.msg} at character {exc.pos}), got {args.filter!r}"))
    except (CampaignError, ValueError) as exc:
        return _fail(exc)
    fields = ["name", "metadata", "completed_at", *(args.fields.split(",") if args.fields else [])]
    try:
        docs = r.query(criteria, step=args.step, defect=args.defect, charge=args.charge, properties=fields,
                       all_runs=args.all_runs)
    except LookupError as exc:
        return _fail(exc)
    docs = docs[: args.limit] if args.limit else docs
    for d in docs:
        d.pop("_id", None)
    if args.json:
        print(write_json(docs))
        return 0
    extra = args.fields.split(",") if args.fields else []
    for d in docs:
        meta = d.get("metadata") or {}
        cost = meta.get("cost") or {}
        line = f"{d['name']:<48} {d.get('completed_at', '')[:19]}"
        if cost:
            line += f"  {cost.get('wall_s', 0):8.1f} s"
        if meta.get("reused_from"):
            line += "  (reused)"
        for f in extra:
            value = d
            for part in f.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            line += f"  {f}={value}"
        print(line)
    print(f"{len(docs)} job document(s)", file=sys.stderr)
    if not args.all_runs and r.run is not None:
        note = _state_line(_run_state(r, src), src)
        if note:
            print(f"note: {note}", file=sys.stderr)
    return 0


def _cmd_status(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from defectflow.campaign import CampaignError
    from defectflow.results import Results, list_runs
    from defectflow.steps import STEPS, step_of
    from defectflow.store import NoStoreYet
    from defectflow.store.lock import lock_holder
    from defectflow.submit import submission_status

    campaign, work, runs, store, label = None, None, [], None, ""
    try:
        src = _open_source(args)
        campaign, work, store, label = src.campaign, src.work_dir, src.store, src.label
        runs = list_runs(store, src.name)
    except NoStoreYet:
        try:  # a campaign (or work directory) that never ran: report it, create nothing
            campaign = _load(args.campaign) if args.campaign else None
            if campaign is not None and args.work_dir:
                campaign.execution.work_dir = args.work_dir
        except CampaignError as exc2:
            return _fail(exc2)
        work = campaign.work_dir() if campaign is not None else Path(args.work_dir or args.store).resolve()
        label = str(work if work.name == "store" else work / "store")
    except (CampaignError, ValueError) as exc:
        return _fail(exc)
    name = campaign.name if campaign is not None else (args.name or "?")
    planned: dict[str, int] = {}
    if campaign is not None and not args.no_plan:
        from defectflow.flows import DefectCampaignMaker

        flow = DefectCampaignMaker(check_engines=False).make(campaign)
        for j in flow.jobs:
            planned[step_of(j.name)] = planned.get(step_of(j.name), 0) + 1
        planned["single_hf"] = campaign.selection.budget
    newest = runs[0]["run"] if runs else None
    done = Results(store, campaign.name if campaign else args.name, run=newest).progress() if runs else []
    manager = submission_status(work) if work is not None and work.is_dir() else None
    holder = lock_holder(work) if work is not None and work.is_dir() else None
    data = {"campaign": name, "run": newest, "planned": planned,
            "finished": {r["step"]: r["finished"] for r in done}, "reused": {r["step"]: r["reused"] for r in done},
            "running": ({"pid": holder.get("pid"), "started": holder.get("started")} if holder else None),
            "manager": manager}
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    out = Console()
    if not runs:
        out.print(f"campaign [bold]{name}[/]: no run yet in {label}"
                  + (f"; a run is starting (PID {holder.get('pid')})" if holder else ""))
    else:
        state = (f"running (PID {holder.get('pid')})" if holder and not runs[0]["finished"]
                 else "final result" if runs[0]["finished"] else "no final result: unfinished, or --lf-only")
        out.print(f"campaign [bold]{name}[/]: {len(runs)} run(s) in {label}; newest {newest} ({state})")
    table = Table(title="Progress of the newest run (finished jobs in the store)")
    for col in ("step", "finished", "planned (static graph)", "reused"):
        table.add_column(col)
    order = list(STEPS)
    steps = sorted(set(planned) | set(data["finished"]), key=lambda s: order.index(s) if s in order else 99)
    for step in steps:
        table.add_row(step, str(data["finished"].get(step, 0)), str(planned.get(step, "dynamic")),
                      str(data["reused"].get(step, 0)))
    if steps:
        out.print(table)
    if manager:
        out.print(f"{manager['manager']} (submitted {manager.get('submitted', '?')}):")
        for step, states in sorted(manager.get("steps", {}).items()):
            out.print(f"  {step:<12} " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
    return 0


def _cmd_submit(args) -> int:
    from defectflow.campaign import CampaignError
    from defectflow.engines import EngineError
    from defectflow.preflight import preflight

    try:
        campaign = _load(args.campaign)
    except CampaignError as exc:
        return _errors(str(exc).splitlines())
    if args.manager == "fireworks" and args.launchpad:
        path = Path(args.launchpad).expanduser().resolve()
        if path.is_dir():
            return _fail(ValueError(f"launchpad: expected a LaunchPad YAML file, got a directory: {path}"))
        if not path.is_file():
            return _fail(ValueError(f"launchpad: file not found: {path}"))
    problems = preflight(campaign, fast=True)
    if problems:
        return _errors(problems, campaign.source)
    try:
        steps = "lf" if args.lf_only else "all"
        if args.manager == "fireworks":
            from defectflow.submit.fireworks import submit_fireworks

            record = submit_fireworks(campaign, launchpad=args.launchpad, steps=steps)
        else:
            from defectflow.submit.remote import submit_jobflow_remote

            record = submit_jobflow_remote(campaign, project=args.project, worker=args.worker, steps=steps)
    except (CampaignError, EngineError, ValueError) as exc:
        return _fail(exc)
    print(json.dumps(record.as_dict(), indent=1, default=str))
    print(f"submitted; follow it with: defectflow status {args.campaign}", file=sys.stderr)
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
        from defectflow.schema_doc import campaign_reference_markdown

        print(campaign_reference_markdown())
    else:
        print(json.dumps(Campaign.model_json_schema(), indent=2))
    return 0


def _cmd_plot(args) -> int:
    from defectflow.campaign import CampaignError
    from defectflow.replot import replot

    try:
        r, src = _open_results(args)
        if r.run is None:
            raise _no_run(r)
        what = tuple(w.strip() for w in args.what.split(",") if w.strip())
        if args.out:
            out = Path(args.out)
        elif src.campaign is not None:
            out = src.work_dir / "plots" / "replot"
        else:
            out = Path(f"plots-{r.campaign or r.run}")
        written = replot(r, out, what)
    except (CampaignError, ValueError, LookupError) as exc:
        return _fail(exc)
    state = _run_state(r, src)
    if args.json:
        print(json.dumps({"run": r.run, "campaign": r.campaign, "state": state["state"], "plots": written},
                         indent=2))
        return 0
    note = _state_line(state, src)
    if note:
        print(f"note: {note}")
    for kind, paths in written.items():
        print(f"{kind}: {len(paths)} plot(s)" + ("" if paths else " (nothing to draw in this run)"))
        for path in paths:
            print(f"  {path}")
    return 0


def _cmd_report(args) -> int:
    from defectflow.campaign import CampaignError
    from defectflow.report import write_report

    try:
        r, src = _open_results(args)
        if r.run is None:
            raise _no_run(r)
        if args.output:
            out = Path(args.output).resolve()
        elif src.work_dir is not None:
            out = src.work_dir / "report.html"
        else:
            out = Path(f"report-{r.campaign or r.run}.html").resolve()
        text = Path(src.campaign.source).read_text() if src.campaign is not None else None
        state = _run_state(r, src)
        note = _state_line(state, src)
    except (CampaignError, ValueError, LookupError) as exc:
        return _fail(exc)
    try:
        path = write_report(r, text, out, store_label=src.label, note=note)
    except OSError as exc:
        return _fail(OSError(f"cannot write the report: {exc.filename or out}: {exc.strerror or exc}"))
    if args.json:
        print(json.dumps({"run": r.run, "campaign": r.campaign, "state": state["state"], "report": str(path)},
                         indent=2))
        return 0
    if note:
        print(f"note: {note}")
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB; open it in a browser, no network needed)")
    return 0


def _benchmarks_dir() -> Path | None:
    import defectflow

    d = Path(defectflow.__file__).resolve().parents[1] / "benchmarks"
    return d if (d / "accuracy_cost.py").is_file() else None


def _cmd_benchmark(args) -> int:
    import subprocess

    d = _benchmarks_dir()
    if d is None:
        print("defectflow benchmark: the benchmark scripts live in the source checkout (benchmarks/), which this "
              "installation does not have: clone the repository and install it with `pip install -e .`",
              file=sys.stderr)
        return EXIT_INVALID
    script = d / {"accuracy": "accuracy_cost.py", "speed": "speed.py"}[args.which]
    if args.which == "accuracy":
        cmd = [sys.executable, str(script), "--preset", args.preset] + (["--resume"] if args.resume else [])
    else:
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
    cmd += ["--show"] if args.show else []
    print("running:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


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

    p = sub.add_parser("validate", help="check a campaign YAML (the same checks as run) and print a summary",
                       description="Validate a campaign file with the checks `run` makes before it starts: the\n"
                       "fields, the host structure, defect names against the host (and doped's generation unless\n"
                       "--fast), charges keys, the engines' set-up (executables, pseudopotentials, basis sets, ASE\n"
                       "calculator import), the store (a MongoDB server answering) and the work directory.\n"
                       "Errors name the field, e.g.\n"
                       "  error: c.yaml: fidelities.low.engine: expected one of 'qe', 'cp2k', 'vasp', 'ase', got 'x'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("campaign", help="campaign YAML file")
    p.add_argument("--json", action="store_true", help="print the full validated campaign (with defaults) as JSON")
    p.add_argument("--fast", action="store_true", help="skip the slow check (doped's defect generation); the "
                   "host, defect names, engines, store and work directory are still checked")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("run", help="run a campaign locally (embedded store) with progress",
                       description="Build the campaign graph and run it on this machine into the store named in\n"
                       "execution.store (default: embedded sqlite under the work directory):\n"
                       "  1 doped + ShakeNBreak generation    2 LF relaxation of every distortion (+ plots)\n"
                       "  3 HF single points on selected frames  4 charge-embedded multi-fidelity MACE\n"
                       "  5 surrogate search, HF verification, doped CTLs and formation-energy diagram\n"
                       "Ends with tables of ground states and CTLs and the paths of the plots.\n\n"
                       "Ctrl-C or SIGTERM stops the run (and every engine process it started); finished jobs stay\n"
                       "in the store and the same command resumes (exit status 130 / 143). One run per work\n"
                       "directory at a time (<work_dir>/run.lock). Without a terminal (batch jobs), progress is a\n"
                       "plain line per step change and every --progress-every seconds, on stderr.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("campaign", help="campaign YAML file")
    p.add_argument("--work-dir", help="override execution.work_dir")
    p.add_argument("--lf-only", action="store_true", help="stop after step 2 (generation + LF relaxations)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help="when stdout is not a terminal (a batch job's log): a plain progress line every SECONDS "
                   "(default 30; 0: only at step changes)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("engines", help="which engines (QE, CP2K, VASP, ASE calculators) can run here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_engines)

    p = sub.add_parser("schema", help="print the JSON schema (or the Markdown reference) of campaign files")
    p.add_argument("--markdown", action="store_true", help="Markdown reference (docs/campaign-reference.md)")
    p.set_defaults(func=_cmd_schema)

    def store_args(p, run: bool = True):
        p.add_argument("campaign", nargs="?", help="campaign YAML file (its execution.store and work_dir are used)")
        p.add_argument("--work-dir", help="the campaign's work directory (overrides execution.work_dir, as for run; "
                       "without a campaign file: read the embedded store in it)")
        p.add_argument("--store", help="instead of a campaign file: a MongoDB URI, 'mongodb' (URI from "
                       "$DEFECTFLOW_MONGODB_URI or the config file) or an embedded store / work directory")
        p.add_argument("--name", help="campaign name (metadata.campaign) to select in a shared store")
        if run:
            p.add_argument("--run", help="a run's flow uuid (default: the newest run with a final result)")
        p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")

    p = sub.add_parser("results", help="ground states, CTLs, model metrics and cost per step of a campaign",
                       description="Results of a campaign's newest finished run, from its store (embedded or\n"
                       "MongoDB, whichever executor ran it).\n\n"
                       "  ground-states  per (defect, q): ground-state start, E_HF, surrogate error, minima\n"
                       "  levels         charge-transition levels ε(q/q') in eV above the VBM\n"
                       "  metrics        held-out HF errors of the surrogate and its ablations\n"
                       "  cost           jobs, reused jobs, wall and CPU seconds, HF calls per step\n"
                       "  runs           every run of the campaign in the store\n\n"
                       "examples:\n"
                       "  defectflow results workflows/quickstart.yaml\n"
                       "  defectflow results workflows/quickstart.yaml --show levels --json | jq '.levels'\n"
                       "  defectflow results --store mongodb://host/db --name sb2se3 --show cost",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    store_args(p)
    p.add_argument("--show", help="comma-separated: ground-states,levels,rounds,metrics,cost,runs (default: all but "
                   "runs)")
    p.add_argument("--structures", action="store_true", help="include ground-state structures in --json output")
    p.set_defaults(func=_cmd_results)

    p = sub.add_parser("query", help="Mongo-style queries over the job documents of a campaign",
                       description="Job documents of a run that match a MongoDB filter. Every document has name\n"
                       "(first word = step), metadata.campaign, metadata.defect / charge / distortion where they\n"
                       "apply, metadata.cost {wall_s, cpu_s, cpu_children_s} and output.*.\n\n"
                       "examples:\n"
                       "  defectflow query c.yaml --step relax_lf --charge 0 --fields output.energy,output.status\n"
                       "  defectflow query c.yaml --filter '{\"output.status\": \"failed\"}' --json\n"
                       "  defectflow query --store runs/x --filter '{\"metadata.defect\": \"v_Si\"}' --all-runs",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    store_args(p)
    p.add_argument("--filter", help="MongoDB filter as JSON, e.g. '{\"metadata.charge\": -1}'")
    p.add_argument("--step", help="pipeline step: relax_lf, single_hf, train, search, verify, summary, ...")
    p.add_argument("--defect", help="defect name, e.g. v_Si")
    p.add_argument("--charge", type=int, help="charge state q")
    p.add_argument("--fields", help="comma-separated extra fields to return, e.g. output.energy")
    p.add_argument("--all-runs", action="store_true", help="search every run of the campaign, not only one")
    p.add_argument("--limit", type=int, help="at most this many documents")
    p.set_defaults(func=_cmd_query)

    p = sub.add_parser("status", help="per-step progress of a campaign (store, and FireWorks / jobflow-remote)",
                       description="Finished jobs per step of the campaign's newest run in its store, against\n"
                       "the planned graph; with a submission (defectflow submit), the job states per step\n"
                       "reported by FireWorks or jobflow-remote, and whether a local run is still running.\n"
                       "Reads only: creates nothing, also for a campaign that never ran.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    store_args(p, run=False)
    p.add_argument("--no-plan", action="store_true", help="skip building the graph for planned counts (faster)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("submit", help="submit a campaign to FireWorks or jobflow-remote",
                       description="Build the campaign graph and submit it. Per-step resources and workers come\n"
                       "from execution.resources (relax_lf, single_hf, train, search, verify).\n\n"
                       "  fireworks       adds a workflow to the LaunchPad (--launchpad FILE, else FireWorks'\n"
                       "                  auto_load: $FW_CONFIG_FILE / my_launchpad.yaml); run `rlaunch` or\n"
                       "                  `qlaunch`; jobs of a step go to fireworkers of category = its worker\n"
                       "  jobflow-remote  submit_flow into a jobflow-remote project (--project, else the default);\n"
                       "                  the project's jobstore must be the campaign's MongoDB store\n\n"
                       "example:\n"
                       "  defectflow submit workflows/sb2se3_vasp.yaml --manager jobflow-remote --project cluster",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("campaign", help="campaign YAML file")
    p.add_argument("--manager", choices=["fireworks", "jobflow-remote"], required=True)
    p.add_argument("--launchpad", help="FireWorks LaunchPad YAML file")
    p.add_argument("--project", help="jobflow-remote project name")
    p.add_argument("--worker", help="jobflow-remote worker for steps without execution.resources.<step>.worker")
    p.add_argument("--lf-only", action="store_true", help="only steps 1-2")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("plot", help="draw a run's figures again from its store (LF energy vs distortion, "
                       "surrogate landscapes, formation energies)",
                       description="Figures of a finished run, drawn from its store alone: for runs executed on\n"
                       "FireWorks / jobflow-remote workers (whose plots stay on the worker) or whose plot files\n"
                       "are gone.\n\n"
                       "  lf          LF energy vs bond distortion per (defect, q) (ShakeNBreak's plot)\n"
                       "  landscapes  surrogate energy vs starting distortion per (defect, q), final round\n"
                       "              (+ the foundation-model baseline when it ran)\n"
                       "  levels      formation energy vs Fermi level (doped), from the verified HF energies\n\n"
                       "examples:\n"
                       "  defectflow plot workflows/quickstart.yaml\n"
                       "  defectflow plot --store mongodb --name sb2se3 --what levels --out figs/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    store_args(p)
    p.add_argument("--what", default="lf,landscapes,levels", help="comma-separated: lf,landscapes,levels "
                   "(default: all)")
    p.add_argument("--out", help="output folder (default: <work_dir>/plots/replot for a campaign file, else "
                   "./plots-<campaign name>)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("report", help="one self-contained HTML page of a run: tables and figures of every step",
                       description="Write one HTML page of a campaign's newest finished run, from its store (embedded\n"
                       "or MongoDB, whichever executor ran it). The page is self-contained: figures are embedded\n"
                       "PNGs, with no external style sheet, script or font, so it opens offline and can be mailed\n"
                       "or archived as one file. It holds:\n\n"
                       "  ground states        per (defect, q): the start it came from, E_HF and E_surrogate (eV),\n"
                       "                       |E_HF − E_MLIP| (meV/atom), distinct minima, RMSDs (Å)\n"
                       "  levels               CTLs ε(q/q') in eV above the VBM, formation energies at E_F = VBM\n"
                       "                       and corrections (eV), doped's formation-energy diagram\n"
                       "  landscapes           energy vs distortion: LF ShakeNBreak relaxations, surrogate search\n"
                       "                       (and the foundation-model baseline when it ran)\n"
                       "  surrogate model      held-out errors of the model and its ablations (meV/atom, meV/Å),\n"
                       "                       parity and descriptor-PCA plots\n"
                       "  verification rounds  |E_HF − E_MLIP| per (defect, q) and round, top-up retraining\n"
                       "  cost per step        jobs, reused jobs, wall and CPU seconds, HF calls\n"
                       "  campaign file        the YAML as given (not with --store alone: the store does not keep it)\n\n"
                       "Figures are the PNG files the run wrote; missing ones (runs on FireWorks / jobflow-remote\n"
                       "workers) are drawn again from the store, as `plot` does (parity and PCA plots need the model\n"
                       "evaluated again and are named instead). An LF-only or unfinished run gets a page too: what\n"
                       "it does not have yet is said in one line. `run` writes <work_dir>/report.html at its end.\n\n"
                       "examples:\n"
                       "  defectflow report workflows/quickstart.yaml\n"
                       "  defectflow report workflows/quickstart.yaml --work-dir /scratch/si -o si.html\n"
                       "  defectflow report --store mongodb://host/db --name sb2se3 -o sb2se3.html",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    store_args(p)
    p.add_argument("-o", "--output", help="HTML file to write (default: <work_dir>/report.html; with a MongoDB "
                   "--store and no work directory: ./report-<campaign name>.html)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("benchmark", help="run a benchmark script from the source checkout (accuracy and HF cost "
                       "vs a direct high-fidelity search; speed and memory)",
                       description="Runs benchmarks/accuracy_cost.py or benchmarks/speed.py (source checkout only):\n"
                       "  accuracy  defectflow vs the frozen direct-HF ShakeNBreak search (benchmarks/data/), ablations,\n"
                       "            CHGNet, LF ShakeNBreak + 1 HF single point, per LF preset (~40-60 min each on 2 cores)\n"
                       "  speed     surrogate vs LF/DFT per structure, training per epoch, peak memory (~5 min)\n"
                       "Tables on stdout, JSON in benchmarks/results/; discussion in docs/benchmarks.md.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["accuracy", "speed"])
    p.add_argument("--quick", action="store_true", help="speed: smoke run (minutes; the figures mean nothing)")
    p.add_argument("--show", action="store_true", help="print the tables of the last JSON again (no runs)")
    p.add_argument("--resume", action="store_true", help="accuracy: reuse the finished defectflow run")
    p.add_argument("--preset", choices=["close", "functional", "far"], default="close",
                   help="accuracy: the LF preset (benchmarks/presets/): close = QE PBE 12 Ry, functional = QE LDA "
                   "18 Ry, far = GFN1-xTB (default: close)")
    p.set_defaults(func=_cmd_benchmark)

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
    from defectflow.campaign import CampaignError
    from defectflow.store import StoreError

    try:
        return args.func(args)
    except CampaignError as exc:
        return _errors(exc.problems, exc.source)
    except StoreError as exc:  # MongoDB unreachable, no URI configured, a work directory that cannot be created
        return _fail(exc)
    except KeyboardInterrupt:  # any other command: no traceback
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
