"""Example 4: a finished campaign's results read from MongoDB, with defectflow's Results API and with plain pymongo.

Run example 1 with ``--store mongodb://...`` (or example 2 or 3) first: every job of the campaign then wrote one
document to the collection ``outputs`` of that database (trajectories, extxyz and model files go to GridFS
``outputs_data``). This script reads them back in two ways.

1. :class:`defectflow.results.Results`: the ground state of each (defect, q) with its HF and surrogate energies
   (eV), the charge-transition levels (eV above the VBM), the surrogate's held-out errors, the cost per step, and
   one filtered query (the LF relaxation energies of one charge state). The same calls work on the embedded
   store, whichever executor ran the jobs (docs/results.md).
2. pymongo alone, for scripts and tools that do not import defectflow. A job document holds ``name`` (its first
   word is the step: ``relax_lf``, ``single_hf``, ``train``, ``search``, ``verify``, ``finalize`` ...), ``hosts``
   (the uuid of the run's flow last), ``metadata`` (``campaign``, ``step``, ``defect``, ``charge``, ``round``,
   ``cost`` in seconds) and ``output`` (the step's document; units in docs/pipeline.md). The query here: the HF
   energies of the surrogate ground states, from the ``verify`` documents of the newest finished run. They must
   equal the API's ``hf_energy`` (the ground state of a (defect, q) is its verified minimum of lowest HF energy
   over the verification rounds); the script says whether they do, and exits with 1 when not.

    python examples/04_query_mongodb.py --fast --store mongodb://localhost:27017/defects
    python examples/04_query_mongodb.py --store mongodb://db.example.org/defects --name my-campaign

Time: seconds.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

import pymongo

from defectflow.results import Results
from defectflow.store import open_store, resolve_uri

# the campaign names of example 1 (examples/01_local_campaign.py)
example1 = importlib.import_module("01_local_campaign")


def _ev(energy: float | None) -> str:
    """An energy in eV for printing; 'n/a' when the calculation gave none."""
    return "n/a" if energy is None else f"{energy:.4f} eV"


def with_results_api(store: str, name: str) -> dict[tuple[str, int], float]:
    """Print what :class:`Results` gives for the newest finished run of campaign ``name``; return the HF energy
    (eV) of each (defect, q) ground state."""
    r = Results(open_store(store), campaign=name)
    print(f"Results API: campaign {name}, {len(r.runs())} run(s) in the store; newest finished run {r.run}")
    print("  ground states:")
    for g in r.ground_states():
        print(f"    {g['defect']} q={g['charge']:+d}: start {g['ground_state_label']}, E_HF = {_ev(g['hf_energy'])}, "
              f"E_surrogate = {_ev(g['surrogate_energy'])}")
    print("  transition levels (eV above the VBM):")
    for t in r.transition_levels():
        print(f"    {t['defect']} ε({t['q_from']:+d}/{t['q_to']:+d}) = {t['level']:.3f}{'' if t['in_gap'] else ' (outside the gap)'}")
    for m in r.model_metrics():
        hf_rmse = m["hf_test_energy_rmse"]
        print(f"  model {m['model']} ({m['kind']}): LF validation energy RMSE {m['lf_valid_energy_rmse']:.1f} meV/atom, "
              "held-out HF energy RMSE " + (f"{hf_rmse:.1f} meV/atom" if hf_rmse is not None else "n/a (no HF test frames)"))
    print("  cost per step (jobs, reused from earlier runs, CPU seconds):")
    for row in r.cost():
        print(f"    {row['step']:<15} {row['jobs']:>3} {row['reused']:>3} {row['cpu_s']:>9.1f}")
    charge = r.ground_states()[0]["charge"]
    print(f"  LF relaxations of q={charge:+d} (query step='relax_lf', charge={charge}):")
    for d in r.query(step="relax_lf", charge=charge, properties=["name", "metadata.distortion", "output.energy",
                                                                "output.status"]):
        print(f"    {d['metadata']['distortion']:<24} E_LF = {d['output']['energy']:.4f} eV ({d['output']['status']})")
    return {(g["defect"], g["charge"]): g["hf_energy"] if g["hf_energy"] is not None else math.inf
            for g in r.ground_states()}


def with_pymongo(uri: str, name: str) -> dict[tuple[str, int], float]:
    """The HF energies (eV) of the verified surrogate ground states of campaign ``name``'s newest finished run,
    read with pymongo from the job documents alone."""
    with pymongo.MongoClient(uri) as client:
        outputs = client.get_default_database("defectflow")["outputs"]
        # a finished run has a 'finalize round N' document whose output holds the ground states
        final = outputs.find_one({"metadata.campaign": name, "metadata.step": "finalize",
                                  "output.ground_states": {"$exists": True}},
                                 projection=["hosts", "completed_at"], sort=[("completed_at", pymongo.DESCENDING)])
        if final is None:
            raise SystemExit(f"no finished run of campaign {name!r} in {uri}")
        run = final["hosts"][-1]  # the run's flow uuid: every job of the run lists it in 'hosts'
        docs = list(outputs.find({"hosts": run, "metadata.step": "verify"},
                                 projection=["name", "metadata.defect", "metadata.charge", "metadata.round",
                                             "output.ground_state.hf_energy",
                                             "output.ground_state.error_mev_per_atom"]))
    print(f"pymongo: run {run}, {len(docs)} verify documents")
    lowest: dict[tuple[str, int], float] = {}
    for d in sorted(docs, key=lambda d: (d["metadata"]["defect"], d["metadata"]["charge"], d["metadata"]["round"])):
        # one verify job per (defect, q) and round; its ground_state is the lowest-HF-energy structure it checked
        meta, out = d["metadata"], (d["output"].get("ground_state") or {})
        energy = out["hf_energy"] if out.get("hf_energy") is not None else math.inf  # nothing verified / failed
        error = out.get("error_mev_per_atom")
        print(f"    {d['name']}: E_HF = {energy:.4f} eV"
              + (f", |E_HF - E_surrogate| = {error:.1f} meV/atom" if error is not None else ""))
        key = (meta["defect"], meta["charge"])
        lowest[key] = min(energy, lowest.get(key, math.inf))
    return lowest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="mongodb",
                        help="MongoDB URI mongodb://host:port/database, or 'mongodb' for $DEFECTFLOW_MONGODB_URI / "
                             "~/.config/defectflow/config.yaml (default)")
    parser.add_argument("--fast", action="store_true",
                        help=f"read the small campaign of examples 1-3 ({example1.FAST_NAME}) instead of "
                             f"{example1.NAME}")
    parser.add_argument("--name", default=None, help="campaign name (overrides --fast)")
    args = parser.parse_args(argv)

    name = args.name or (example1.FAST_NAME if args.fast else example1.NAME)
    api = with_results_api(args.store, name)
    plain = with_pymongo(resolve_uri(args.store), name)
    same = api.keys() == plain.keys() and all(math.isclose(api[k], plain[k], abs_tol=1e-9) for k in api)
    print(f"Results API and pymongo agree on {len(api)} ground-state HF energies: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
