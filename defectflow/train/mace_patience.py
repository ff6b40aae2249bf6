"""``python -m defectflow.train.mace_patience <mace_run_train arguments>``: mace_run_train whose
``--patience`` stops training (``mlip.patience``).

Workaround, mace-torch 0.3.16 (ACEsuit/mace#1384): in a single-process run mace's training loop only *logs*
"Stopping optimization after N epochs without improvement" and trains on to ``--max_num_epochs``; only a
distributed run leaves the loop. Here a logging filter turns that log record into an exception, and a wrapper
around ``mace.tools.train`` catches it and returns normally, so mace goes on exactly as after its last epoch: it
loads its best-validation checkpoint, saves the model and evaluates it. Nothing else of mace is changed; without
``--patience`` in the arguments this is plain mace_run_train.
"""

from __future__ import annotations

import logging
import re
import sys

#: the one log line of mace's loop that means "patience reached, no Stage Two to go to" (mace/tools/train.py);
#: the variant "... and starting Stage Two" is left alone: there mace itself moves on
STOP_LINE = re.compile(r"^Stopping optimization after \d+ epochs without improvement$")


class _PatienceReached(Exception):
    pass


class _StopOnPatience(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if STOP_LINE.match(record.getMessage()):
            raise _PatienceReached(record.getMessage())
        return True


def main(argv: list[str] | None = None) -> None:
    import mace.tools
    from mace.cli import run_train

    train = mace.tools.train

    def train_until_patience(*args, **kwargs):
        stop = _StopOnPatience()
        root = logging.getLogger()
        root.addFilter(stop)
        try:
            train(*args, **kwargs)
        except _PatienceReached as reached:  # the line below does not match STOP_LINE: it passes the filter
            logging.info("%s: training stopped here (mlip.patience; workaround for mace#1384)", reached)
        finally:
            root.removeFilter(stop)

    mace.tools.train = train_until_patience
    sys.argv = ["mace_run_train", *(sys.argv[1:] if argv is None else argv)]
    run_train.main()


if __name__ == "__main__":
    main()
