"""Every exception type the project raises on purpose, in one place (foundation layer: imports nothing of ours).

Two families matter to the runtime:
- input errors (`ConfigError`, `PromptFileError`, `ShardError`, `CheckpointError`, `VideoInputError`, ...): bad
  configs, files or weights, found before any cluster work starts; jobs exit with code 2;
- `VideoDataError`: one video that cannot be used (undecodable, too short, too small). A scorer records it as a
  failed row and scores the rest of the batch. Anything else inside an actor (CUDA, out of memory, a missing weight
  file, a NaN score: `NonFiniteScoreError`) is an infrastructure fault and fails the batch loudly; it never becomes
  a NaN score. `is_infrastructure_error` is the one rule the sampler and the scorer apply to the errors they catch.
"""

from __future__ import annotations

import re
from typing import Any

# GPU library failures torch raises as a plain RuntimeError (TORCH_CHECK), not as torch.AcceleratorError:
# "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED ...", "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR", "NCCL error in: ..."
_GPU_LIBRARY_FAULT = re.compile(
    r"\b(cuda|cuda driver|cudnn|cufft|cusolver|cusparse|nccl) error\b|cublas_status_|cudnn_status_"
    r"|triton error \[cuda\]",
    re.IGNORECASE,
)


def is_infrastructure_error(error: BaseException) -> bool:
    """Whether an error raised inside an actor is the machine's fault, not its input's: out of memory (host or
    device), a CUDA fault (torch.AcceleratorError) or a CUDA, cuBLAS, cuDNN, cuFFT, cuSOLVER, cuSPARSE or NCCL failure
    raised as a RuntimeError, in the error or anything that caused it. Such an error fails its batch (the chunk stays
    uncommitted); it is never recorded as a prompt's or a video's failure."""
    import torch  # only here: an actor's error, torch is loaded already; the rest of this module stays torch-free

    cause: BaseException | None = error
    seen: set[int] = set()  # a chain that loops back (an exception raised again inside its own handler)
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, (MemoryError, torch.OutOfMemoryError, torch.AcceleratorError)):
            return True
        if isinstance(cause, RuntimeError) and _GPU_LIBRARY_FAULT.search(str(cause)):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


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
    """A released VideoDPO dataset that cannot be imported (its files or their structure), found before any work."""


class RejectedPairError(DatasetImportError):
    """`--strict`: the first bad pair an import met; the shards committed before it stay."""


class VideoDataError(ValueError):
    """One video that cannot be used: it is recorded as failed, the rest of its batch goes on."""


class VideoDecodeError(VideoDataError):
    """Video bytes that cannot be decoded (empty, no video stream, corrupt)."""


class VideoTooShortError(VideoDataError):
    """A video with too few frames (or pixels) for what is asked of it."""


class NonFiniteScoreError(RuntimeError):
    """A scorer model gave a NaN or infinite value for a video that decoded fine (an overflow, bad weights): a numeric
    fault of the model, not of the video. The batch fails, naming the dimension and the samples; it never becomes a
    row of data."""


class IncompleteStageError(RuntimeError):
    """A stage ended with some chunks not committed (every other one is); a rerun completes only those."""

    def __init__(self, report: Any) -> None:
        super().__init__(report.summary())
        self.report = report  # the stage's report: `incomplete` names the chunks


class NonFiniteTrainingError(RuntimeError):
    """The DPO loss or the gradient norm became NaN or infinite. The run stops before the update, keeping the last
    good checkpoint, and is not retried: a retry from that checkpoint would replay the same pairs and noise."""
