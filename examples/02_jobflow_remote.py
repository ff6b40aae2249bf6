"""Example 2: the campaign of example 1 submitted to jobflow-remote.

``submit_jobflow_remote`` builds the campaign's jobflow graph and adds it to a jobflow-remote *project*'s queue.
jobflow-remote's runner (``jf runner start``, on a machine that can reach the workers) then sends each job (each
distorted structure's LF relaxation, each HF single point, the training, each search and verification) to a
worker (this machine, or a cluster over SSH with its batch system) and collects the outputs.

What it needs: a MongoDB server, and a jobflow-remote project whose **jobstore is the campaign's store**.

* jobflow-remote keeps its queue (jobs, flows, their states) in a MongoDB database of the project.
* It writes every job's output to the project's jobstore, not to the store the job was built with. For
  ``defectflow results`` / ``status`` and example 4 to find them, that jobstore must be the campaign's
  ``execution.store`` (``--store``): documents in the collection ``outputs``, GridFS ``outputs_data`` as the
  additional store ``data``. ``submit_jobflow_remote`` checks this and refuses a project that differs (one line
  saying which part differs), and an ``embedded`` store.

``--create-project`` writes such a project for this machine (``<projects folder>/<name>.yaml``, the folder being
``$JFREMOTE_PROJECTS_FOLDER`` or ``~/.jfremote``): one ``local`` worker with the ``shell`` scheduler, the queue in
the database ``<store database>_jobflow_remote`` of the store's server, the jobstore built from ``--store`` with
defectflow's own :func:`~defectflow.store.make_store`, and a runner that polls every 2 s. It then initialises the
queue database (as ``jf admin reset`` does). For a cluster, add a ``remote`` worker (host, scheduler ``slurm``,
``pre_run`` activating the environment that has defectflow) to that file, or write the project with
``jf project generate``, and keep the jobstore as it is. Per-step workers and resources go in the campaign's
``execution.resources`` (docs/execution.md).

``--run-here`` runs the project's runner in this process until every job has finished, instead of
``jf runner start``: enough to try it on one machine. Each job then runs as ``jf -fe execution run`` in a shell of
its own (the project's ``pre_run`` puts this Python's ``jf`` on the PATH), so expect a few seconds per job more than
example 1.

    python examples/02_jobflow_remote.py --fast --store mongodb://localhost:27017/defects \\
        --project defects-demo --create-project --run-here --steps lf
    python examples/02_jobflow_remote.py --store mongodb://db.example.org/defects --project defects
    jf runner start -p defects                     # on the machine that reaches the workers
    defectflow status --store mongodb://db.example.org/defects --name example-si-vacancy

Time on 2 cores: the submission takes seconds; ``--fast --run-here --steps lf`` (steps 1-2) about a minute, all five
steps a few minutes (each job starts a ``jf`` process of its own and the runner polls every 2 s).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from maggma.stores import MongoStore
from monty.json import jsanitize

from defectflow.campaign import Campaign
from defectflow.store import make_store, resolve_uri
from defectflow.submit.remote import status_of_submission, submit_jobflow_remote

# the campaign of example 1, built in Python (examples/01_local_campaign.py)
_local = importlib.import_module("01_local_campaign")
build_campaign, print_submitted_run = _local.build_campaign, _local.print_submitted_run


def create_local_project(name: str, campaign: Campaign) -> Path:
    """Write a jobflow-remote project ``name`` that runs jobs on this machine and stores their outputs in the
    campaign's MongoDB store, initialise its queue database, and return the project file."""
    from jobflow_remote import ConfigManager, JobController
    from jobflow_remote.config.base import Project

    uri = resolve_uri(campaign.execution.store)
    jobstore = make_store(campaign.execution.store, campaign.work_dir())  # exactly what defectflow writes to
    queue_db = f"{jobstore.docs_store.database}_jobflow_remote"
    base = campaign.work_dir() / "jobflow-remote"
    project = Project(
        name=name,
        base_dir=str(base),
        workers={"local": {"type": "local", "scheduler_type": "shell", "work_dir": str(base / "jobs"),
                           # the runner starts each job with `jf`: the one of this Python environment
                           "pre_run": f'export PATH="{Path(sys.executable).parent}:$PATH"',
                           "timeout_execute": 120}},
        queue={"store": jsanitize(MongoStore.from_uri(uri, "jobs", database=queue_db).as_dict())},
        jobstore=jsanitize(jobstore.as_dict()),
        runner={"delay_checkout": 2, "delay_check_run_status": 2, "delay_advance_status": 2},
        log_level="warn",
    )
    manager = ConfigManager()
    manager.create_project(project)
    JobController.from_project(project).reset()
    return manager.projects_data[name].filepath


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="example 1's small campaign (15-atom cell, q = 0, +1, xTB)")
    parser.add_argument("--store", default="mongodb",
                        help="the campaign's store: a MongoDB URI mongodb://host:port/database, or 'mongodb' for "
                             "$DEFECTFLOW_MONGODB_URI / ~/.config/defectflow/config.yaml (default)")
    parser.add_argument("--work-dir", default=None,
                        help="work directory (submission.json; --create-project's folders); default runs/<campaign>")
    parser.add_argument("--project", default=None,
                        help="jobflow-remote project name (default: $JFREMOTE_PROJECT, or the only project)")
    parser.add_argument("--worker", default=None,
                        help="worker for the jobs without a per-step worker (default: the project's first worker)")
    parser.add_argument("--create-project", action="store_true",
                        help="first write project --project for this machine (a local worker; queue and jobstore on "
                             "--store's MongoDB) and initialise its queue database")
    parser.add_argument("--steps", choices=["all", "lf"], default="all",
                        help="'lf' stops after the LF relaxations (steps 1-2); default all five steps")
    parser.add_argument("--run-here", action="store_true",
                        help="run the project's runner in this process until every job finished (instead of "
                             "`jf runner start`)")
    parser.add_argument("--max-seconds", type=int, default=3600,
                        help="--run-here: stop the runner after this many seconds (default 3600)")
    args = parser.parse_args(argv)

    campaign = build_campaign(fast=args.fast, store=args.store, work_dir=args.work_dir)
    if args.create_project:
        if not args.project:
            parser.error("--create-project needs --project NAME")
        from jobflow_remote.config.base import ConfigError

        try:
            print(f"jobflow-remote project {args.project}: {create_local_project(args.project, campaign)}")
        except ConfigError as exc:  # e.g. a project of that name exists: use it without --create-project
            parser.error(f"--create-project: {exc}")
    record = submit_jobflow_remote(campaign, project=args.project, worker=args.worker, steps=args.steps)
    project = record.connection["project"]
    print(f"submitted {campaign.name} to jobflow-remote project {project} (worker {record.connection['worker']}): "
          f"{record.n_jobs} jobs, flow {record.flow_uuid}; record in {campaign.work_dir() / 'submission.json'}")
    if not args.run_here:
        print(f"start the runner to run it: jf runner start -p {project}; follow it with: "
              f"defectflow status --store {campaign.execution.store} --name {campaign.name}")
        return 0

    from jobflow_remote.jobs.runner import Runner

    Runner(project_name=project).run_all_jobs(max_seconds=args.max_seconds)
    states = status_of_submission(campaign.work_dir())
    return print_submitted_run(campaign, record.flow_uuid, states, "jobflow-remote")


if __name__ == "__main__":
    sys.exit(main())
