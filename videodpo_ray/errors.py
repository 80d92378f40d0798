"""Every exception type the project raises on purpose, in one place (foundation layer: imports nothing of ours).

Two families matter to the runtime:
- input errors (`ConfigError`, `PromptFileError`, `ShardError`, `CheckpointError`, `VideoInputError`, ...): bad
  configs, files or weights, found before any cluster work starts; jobs exit with code 2;
- `VideoDataError`: one video that cannot be used (undecodable, too short, too small). A scorer records it as a
  failed row and scores the rest of the batch. Anything else inside an actor (CUDA, out of memory, a missing weight
  file) is an infrastructure fault and fails the batch loudly; it never becomes a NaN score.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the key and the reason."""


class CheckpointMismatchError(ConfigError):
    """A run's checkpoint cannot be resumed with this config (world size, ZeRO stage or batch layout differ)."""


class PromptFileError(ValueError):
    """A prompts file that cannot be used; the message names the file, the row and the field."""


class VideoInputError(ValueError):
    """A video folder or its prompts file that cannot be scored; the message names the file and the entry."""


class ShardError(ValueError):
    """A shard that does not exist, does not match its manifest, or has the wrong schema."""


class ShardExistsError(ShardError):
    """A shard was committed already; shards are written once and never overwritten."""


class CheckpointError(ValueError):
    """Model weights that cannot be loaded; the message names the file and the missing/unexpected keys."""


class WeightsError(CheckpointError):
    """Scorer weights that cannot be read or do not match the model; the message names the file and the keys."""


class DatasetImportError(ValueError):
    """A released VideoDPO dataset that cannot be imported."""


class VideoDataError(ValueError):
    """One video that cannot be used: it is recorded as failed, the rest of its batch goes on."""


class VideoDecodeError(VideoDataError):
    """Video bytes that cannot be decoded (empty, no video stream, corrupt)."""


class VideoTooShortError(VideoDataError):
    """A video with too few frames (or pixels) for what is asked of it."""


class IncompleteStageError(RuntimeError):
    """A stage ended with some chunks not committed (every other one is); a rerun completes only those."""

    def __init__(self, report: Any) -> None:
        super().__init__(report.summary())
        self.report = report  # the stage's report: `incomplete` names the chunks


class NonFiniteTrainingError(RuntimeError):
    """The DPO loss or the gradient norm became NaN or infinite. The run stops before the update, keeping the last
    good checkpoint, and is not retried: a retry from that checkpoint would replay the same pairs and noise."""
