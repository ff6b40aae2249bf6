"""Example 3: the campaign of example 1 submitted to FireWorks.

``submit_fireworks`` builds the campaign's jobflow graph and adds it to a FireWorks LaunchPad as one workflow:
one Firework per job (each distorted structure's LF relaxation, each HF single point, the training, each search
and verification). FireWorkers then run them wherever they are started (``rlaunch rapidfire`` on a node,
``qlaunch -r rapidfire`` through the batch system), and every output goes to the campaign's store, so
``defectflow results`` / ``status`` and example 4 read them as for a local run.

What it needs: MongoDB, twice.

* The LaunchPad (FireWorks' own database of workflows and their states): ``lpad init`` writes
  ``my_launchpad.yaml`` (host, port, database, user); ``--launchpad FILE`` names it, and without it FireWorks
  looks for ``my_launchpad.yaml`` / ``$FW_CONFIG_FILE``. A new LaunchPad is initialised once with ``lpad reset``
  (``--reset-launchpad`` here), which deletes every workflow on it.
* The campaign's store (``--store``): a MongoDB URI every FireWorker can reach (documents in the collection
  ``outputs``, trajectories and model files in GridFS ``outputs_data``). It can be the LaunchPad's server, in a
  database of its own. The embedded store only works when every FireWorker sees this machine's work directory.

Per-step resources (cores, wall time, FireWorker category, queue; ``execution.resources``, see
docs/execution.md) become each Firework's ``_category`` and ``_queueadapter``; this example sets none.

``--run-here`` runs the workflow in this process with FireWorks' ``rapidfire`` (one FireWorker without a category,
which runs every job) to try it out on one machine; on a cluster, leave it out and start FireWorkers there.

    python examples/03_fireworks.py --fast --store mongodb://localhost:27017/defects \\
        --launchpad-uri mongodb://localhost:27017/fireworks --reset-launchpad --run-here
    python examples/03_fireworks.py --store mongodb://db.example.org/defects --launchpad my_launchpad.yaml
    defectflow status --store mongodb://db.example.org/defects --name example-si-vacancy   # later, anywhere

Time: the submission takes seconds; ``--fast --run-here`` about 1.5 min on 2 cores (less when example 1 already
ran the same campaign into the same store: finished jobs with the same inputs are reused).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fireworks import FWorker, LaunchPad
from fireworks.core.rocket_launcher import rapidfire

from defectflow.submit.fireworks import status_of_submission, submit_fireworks

# the campaign of example 1, built in Python (examples/01_local_campaign.py)
_local = importlib.import_module("01_local_campaign")
build_campaign, print_submitted_run = _local.build_campaign, _local.print_submitted_run


def open_launchpad(path: str | None, uri: str | None, reset: bool) -> LaunchPad:
    """The LaunchPad of a YAML file (``path``), of a MongoDB URI whose path is its database (``uri``), or
    FireWorks' default (``my_launchpad.yaml``, ``$FW_CONFIG_FILE``); ``reset`` initialises it (deletes everything
    on it)."""
    if uri:
        lpad = LaunchPad(host=uri, uri_mode=True, name=uri.rsplit("/", 1)[-1].split("?")[0] or "fireworks",
                         strm_lvl="WARNING")
    elif path:
        lpad = LaunchPad.from_file(path)
    else:
        lpad = LaunchPad.auto_load()
    if reset:
        lpad.reset("", require_password=False)
    return lpad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="example 1's small campaign (15-atom cell, q = 0, +1, xTB)")
    parser.add_argument("--store", default="mongodb",
                        help="the campaign's store: a MongoDB URI mongodb://host:port/database, or 'mongodb' for "
                             "$DEFECTFLOW_MONGODB_URI / ~/.config/defectflow/config.yaml (default)")
    parser.add_argument("--work-dir", default=None,
                        help="work directory (submission.json, job folders of --run-here); default runs/<campaign>")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--launchpad", default=None, help="LaunchPad YAML file (from `lpad init`)")
    where.add_argument("--launchpad-uri", default=None,
                       help="LaunchPad as a MongoDB URI, mongodb://host:port/database (instead of a file)")
    parser.add_argument("--reset-launchpad", action="store_true",
                        help="initialise the LaunchPad first, as `lpad reset` does: DELETES every workflow on it")
    parser.add_argument("--steps", choices=["all", "lf"], default="all",
                        help="'lf' stops after the LF relaxations (steps 1-2); default all five steps")
    parser.add_argument("--run-here", action="store_true",
                        help="run the workflow in this process (FireWorks rapidfire) instead of on FireWorkers")
    args = parser.parse_args(argv)

    campaign = build_campaign(fast=args.fast, store=args.store, work_dir=args.work_dir)
    lpad = open_launchpad(args.launchpad, args.launchpad_uri, args.reset_launchpad)
    record = submit_fireworks(campaign, launchpad=lpad, steps=args.steps)
    print(f"submitted {campaign.name}: {record.n_jobs} Fireworks (fw_ids {record.job_ids[0]}-{record.job_ids[-1]}), "
          f"flow {record.flow_uuid}; record in {campaign.work_dir() / 'submission.json'}")
    if not args.run_here:
        print("start FireWorkers to run it (rlaunch rapidfire / qlaunch -r rapidfire); "
              f"follow it with: defectflow status --store {campaign.execution.store} --name {campaign.name}")
        return 0

    rapidfire(lpad, FWorker(), m_dir=str(campaign.work_dir()), nlaunches=0, sleep_time=1, strm_lvl="WARNING")
    states = status_of_submission(campaign.work_dir(), launchpad=lpad)
    return print_submitted_run(campaign, record.flow_uuid, states, "FireWorks")


if __name__ == "__main__":
    sys.exit(main())
