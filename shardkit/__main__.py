import logging
import os
import sys

from . import cli


def run() -> None:
    try:
        cli.main()
    except SystemExit as exc:
        if exc.code not in (0, None) or not cli.finished_rank_of_a_rendezvous:
            raise
    if cli.finished_rank_of_a_rendezvous:
        # Everything is written and closed; skip the interpreter's teardown (see cli.py).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


run()
