"""Rank 0's training curves as TensorBoard event files, copied next to the checkpoints (`{run dir}/tensorboard/`,
which TensorBoard reads from s3:// and gs:// directly; `checkpoint.read_tensorboard_scalars` reads them back)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from videodpo_ray import storage


class TrainingCurves:
    """A SummaryWriter in a local folder; `upload` copies its event files to the run directory."""

    def __init__(self, run_url: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.directory = tempfile.mkdtemp(prefix="videodpo-tensorboard-")
        self.writer = SummaryWriter(self.directory)
        self.target = storage.join(run_url, "tensorboard")

    def log(self, metrics: dict[str, Any]) -> None:
        """Every float metric of a step as `train/{name}` at `metrics["step"]`."""
        for key, value in metrics.items():
            if isinstance(value, float) and key not in ("step", "epoch"):
                self.writer.add_scalar(f"train/{key}", value, metrics["step"])

    def upload(self) -> None:
        self.writer.flush()
        for name in sorted(os.listdir(self.directory)):
            storage.write_bytes_atomic(storage.join(self.target, name), Path(self.directory, name).read_bytes())

    def close(self) -> None:
        self.writer.close()
