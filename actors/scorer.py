"""Scorer actor: scores mp4 videos on the configured OmniScore / VBench dimensions.

A Ray Data callable class:

    samples.map_batches(OmniScorer, fn_constructor_kwargs={"config": scorer_config},
                        compute=ray.data.ActorPoolStrategy(size=n), num_gpus=1, batch_size=16)

Input columns: `sample_id`, `prompt_id`, `prompt`, `video` (mp4 bytes); every input column is passed through.
Added: every output of every configured dimension (raw values; dynamic_degree adds `dynamic_degree_vbench`),
`omniscore` (when every dimension of `config.omniscore` is configured) and `failed_reason` (None on success).

Failures: a video that cannot be used (`VideoDataError`: undecodable, too short, too small) is recorded as a failed
row (NaN scores and the reason) and the rest of the batch is scored; a row the sampler gave up on (null `video`)
keeps the sampler's `failed_reason`. Anything else (CUDA, out of memory, a missing weight file, a bug; a
VideoDataError an infrastructure fault caused, `errors.is_infrastructure_error`, the sampler's rule too) fails the
whole batch loudly, and so does a NaN or infinite score for a video that decoded (`NonFiniteScoreError`, naming the
dimension and the samples): an infrastructure or numeric fault never becomes NaN data.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np

from videodpo_ray.errors import NonFiniteScoreError, VideoDataError, is_infrastructure_error
from videodpo_ray.omniscore import omniscore
from videodpo_ray.scoring import ScorerConfig, dimension_outputs, load_scorer_model, score_outputs
from videodpo_ray.stages.common import batch_slices
from videodpo_ray.video import decode_mp4

logger = logging.getLogger(__name__)
Video = tuple[np.ndarray, float]  # frames (T, H, W, 3) uint8, fps


class OmniScorer:
    """Loads the configured scorer models once, then scores batches of videos."""

    def __init__(self, config: ScorerConfig | Mapping[str, Any], batch_size: int | None = None) -> None:
        self.config = config if isinstance(config, ScorerConfig) else ScorerConfig.model_validate(config)
        self.batch_size = batch_size  # rows scored together; None: each call's batch as it comes
        self.device = self.config.resolved_device()
        self.models = {
            name: load_scorer_model(name, self.config.spec(name), self.device) for name in self.config.dimensions
        }
        self.output_names = [key for name in self.config.dimensions for key in dimension_outputs(name)]
        self.computes_omniscore = not self.config.dimensions_missing_for_omniscore()

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every row of `batch` scored, in batches of `batch_size` rows (`stages.common.batch_slices`)."""
        count = len(batch["sample_id"])
        parts = [self.score_batch({key: values[offset : offset + length] for key, values in batch.items()})
                 for offset, length in batch_slices(count, self.batch_size)]
        if len(parts) == 1:
            return parts[0]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def score_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One scorer batch: the input columns plus every output, omniscore and failed_reason."""
        sample_ids = [str(s) for s in batch["sample_id"]]
        prompts = [str(p) for p in batch["prompt"]]
        failures: dict[int, str] = {}
        videos: dict[int, Video] = {}
        for i, data in enumerate(batch["video"]):
            if data is None:
                failures[i] = str(batch["failed_reason"][i])
                continue
            try:
                frames, fps = decode_mp4(bytes(data), name=sample_ids[i])
                videos[i] = (frames.numpy(), float(fps))
            except VideoDataError as error:
                failures[i] = f"decode: {_video_failure(error)}"

        outputs: dict[int, dict[str, float]] = {i: {} for i in range(len(sample_ids))}
        for name, model in self.models.items():
            alive = [i for i in sorted(videos) if i not in failures]
            results = self._score_dimension(name, model, alive, videos, prompts, failures)
            _check_finite(name, results, sample_ids)
            for i, result in results.items():
                outputs[i].update(result)

        totals: dict[int, float] = {}
        quality, semantic = self.config.omniscore.quality, self.config.omniscore.semantic
        for i, sample_id in enumerate(sample_ids):
            if i in failures:
                outputs[i] = {}
            elif self.computes_omniscore:  # every value is finite (_check_finite)
                totals[i] = omniscore(outputs[i], sample_id, quality, semantic)
        if failures:
            logger.warning("scoring failed for %d of %d videos: %s", len(failures), len(sample_ids), failures)
        return {**batch, **self._columns(batch, outputs, totals, failures)}

    def _score_dimension(
        self,
        name: str,
        model: Any,
        indices: list[int],
        videos: dict[int, Video],
        prompts: list[str],
        failures: dict[int, str],
    ) -> dict[int, dict[str, float]]:
        """All outputs of one dimension for `indices`. When the batch call hits a VideoDataError, videos are scored
        one by one so that only the unusable ones fail; any other error propagates and fails the batch."""
        if not indices:
            return {}
        try:
            return dict(zip(indices, self._run(name, model, indices, videos, prompts)))
        except VideoDataError as error:
            reason = _video_failure(error)
            if len(indices) == 1:
                failures[indices[0]] = f"{name}: {reason}"
                return {}
        results = {}
        for i in indices:
            try:
                results[i] = self._run(name, model, [i], videos, prompts)[0]
            except VideoDataError as error:
                failures[i] = f"{name}: {_video_failure(error)}"
        return results

    @staticmethod
    def _run(
        name: str, model: Any, indices: list[int], videos: dict[int, Video], prompts: list[str]
    ) -> list[dict[str, float]]:
        return score_outputs(
            name,
            [videos[i][0] for i in indices],
            model,
            prompts=[prompts[i] for i in indices],
            fps=[videos[i][1] for i in indices],
        )

    def _columns(
        self,
        batch: Mapping[str, np.ndarray],
        outputs: dict[int, dict[str, float]],
        totals: dict[int, float],
        failures: dict[int, str],
    ) -> dict[str, np.ndarray]:
        count = len(outputs)
        columns: dict[str, np.ndarray] = {
            "sample_id": np.asarray(batch["sample_id"]).astype(str),
            "prompt_id": np.asarray(batch["prompt_id"]).astype(str),
        }
        for key in self.output_names:
            columns[key] = np.array([outputs[i].get(key, np.nan) for i in range(count)], dtype=np.float64)
        columns["omniscore"] = np.array([totals.get(i, np.nan) for i in range(count)], dtype=np.float64)
        columns["failed_reason"] = np.array([failures.get(i) for i in range(count)], dtype=object)
        return columns


def _video_failure(error: VideoDataError) -> str:
    """The failed_reason of a row whose video raised `error`; raised again when an infrastructure fault caused it
    (it fails the batch)."""
    if is_infrastructure_error(error):
        raise error
    return f"{type(error).__name__}: {error}"


def _check_finite(name: str, results: dict[int, dict[str, float]], sample_ids: list[str]) -> None:
    """NonFiniteScoreError naming dimension `name`, its outputs and the samples where its model gave NaN or inf for
    a video that decoded: a numeric fault of the model (overflow, bad weights), never a row of data."""
    bad = {
        sample_ids[i]: ", ".join(f"{key}={value}" for key, value in result.items() if not math.isfinite(value))
        for i, result in results.items()
    }
    bad = {sample_id: values for sample_id, values in bad.items() if values}
    if bad:
        raise NonFiniteScoreError(
            f"scorer {name!r} gave non-finite values for {len(bad)} of {len(results)} decoded video(s): "
            + "; ".join(f"{sample_id} ({values})" for sample_id, values in bad.items())
        )
