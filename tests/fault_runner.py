"""``lmlab`` with a fault planted, for tests that launch it under torchrun (where monkeypatch cannot reach).

``LMLAB_TEST_FAULT=step:N``: the data of step ``N`` (0-based) raises, as a process killed mid-run;
``marker:N``: writing the ``COMPLETE`` marker of the step-``N`` checkpoint raises, as a run killed after every
rank wrote its shards and before the checkpoint was complete. Usage: ``torchrun … tests/fault_runner.py pretrain …``.
"""

from __future__ import annotations

import os
import sys

from lmlab.cli import main
from lmlab.io import dcp
from lmlab.train import data


def plant(fault: str) -> None:
    kind, at = fault.split(":")
    if kind == "step":
        real = data.ExampleBatches.__call__

        def crash(self, step, micro):
            if step == int(at):
                raise KeyboardInterrupt
            return real(self, step, micro)

        data.ExampleBatches.__call__ = crash
    elif kind == "marker":
        real_mark = dcp._mark_complete

        def crash_mark(folder):
            if f"step-{int(at):08d}" in folder.name:
                raise KeyboardInterrupt
            real_mark(folder)

        dcp._mark_complete = crash_mark
    else:
        raise SystemExit(f"unknown LMLAB_TEST_FAULT {fault!r}")


if __name__ == "__main__":
    if os.environ.get("LMLAB_TEST_FAULT"):
        plant(os.environ["LMLAB_TEST_FAULT"])
    sys.exit(main(sys.argv[1:]))
