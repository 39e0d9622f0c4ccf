"""What every training stage does around its work.

    with stage_run(run_dir, cfg.train.device) as dist:
        ...  # read the data, build the model, fit, save run_dir/final

Under ``torchrun`` it joins the process group (and waits for the other processes before leaving it);
the run directory is created, and the main process holds its lock for the whole run, so a second run
into the same ``--out`` stops at once with "in use by process N" instead of clearing the first one's
scratch files under it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from tinylm.io import directory_lock
from tinylm.train import distributed


@contextmanager
def stage_run(run_dir: str | Path, device_name: str) -> Iterator[distributed.Distributed]:
    with distributed.process_group(device_name) as dist:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with directory_lock(run_dir) if dist.is_main else nullcontext():
            yield dist
