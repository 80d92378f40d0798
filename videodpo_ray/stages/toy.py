"""The toy world stage (the embedded default; never VBench): its prompts, base model and semantic scorer.

`prepare_toy_world(config, out)` builds, once, under `{out}/toy/`:
- `base-<key>/`: the toy base model, a tiny VideoCrafter2-family model pretrained on partly mis-captioned toy videos
  (`stages.toy_pretrain`), a directory `build_model(ModelConfig(family="vc2", path=...))` loads;
- `classifier-<key>/`: the toy text-video classifier behind the `toy_semantic` scorer dimension, trained on clean
  toy videos.
Both are deterministic functions of their settings, whose hash is the directory name, so a rerun (or another run
under the same root) finds them and skips the work. `toy_prompts(config)` is the fixed split of the toy prompts into
the DPO-training prompts and the held-out evaluation prompts.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydantic import Field

from videodpo_ray import storage
from videodpo_ray import toy_world as world
from videodpo_ray.config import StrictConfig
from videodpo_ray.scoring import ModelSpec, OmniScoreConfig, ScorerConfig

logger = logging.getLogger(__name__)
TOY_DIRECTORY = "toy"
TOY_SEMANTIC = "toy_semantic"
TOY_QUALITY_DIMENSIONS: tuple[str, ...] = ("temporal_flickering",)  # model-free: no weights to download


class ToyWorldConfig(StrictConfig):
    """The toy world: which split, which pretraining seed, and the CPU threads pretraining runs on (results are
    bit-identical for a fixed thread count)."""

    seed: int = Field(0, ge=0)
    num_held_out: int = Field(world.NUM_HELD_OUT, ge=1)
    threads: int = Field(1, ge=1)

    def pretrain_settings(self) -> world.PretrainSettings:
        return world.PretrainSettings(seed=self.seed)

    def classifier_settings(self) -> world.ClassifierSettings:
        return world.ClassifierSettings(seed=self.seed)

    def base_model_url(self, out: str) -> str:
        """Where the pretrained base model is (or will be) under the output root."""
        return storage.join(out, TOY_DIRECTORY, f"base-{self.pretrain_settings().key()}")

    def classifier_url(self, out: str) -> str:
        """Where the toy classifier (the `toy_semantic` dimension's weights) is (or will be)."""
        return storage.join(out, TOY_DIRECTORY, f"classifier-{self.classifier_settings().key()}")

    def scorer_config(self, out: str) -> ScorerConfig:
        """The toy scorer: the model-free quality dimension(s) and `toy_semantic`, blended by the real OmniScore
        formula (4 Q + S) / 5."""
        return ScorerConfig(
            dimensions=[*TOY_QUALITY_DIMENSIONS, TOY_SEMANTIC],
            omniscore=OmniScoreConfig(quality=list(TOY_QUALITY_DIMENSIONS), semantic=[TOY_SEMANTIC]),
            models={TOY_SEMANTIC: ModelSpec(weights=self.classifier_url(out))},
        )


@dataclass(frozen=True)
class ToyWorld:
    """What `prepare_toy_world` made or found."""

    base_model: str
    classifier: str
    built: tuple[str, ...]  # what this call trained ("base model", "classifier"); () when everything was cached


def toy_prompts(config: ToyWorldConfig) -> tuple[list[str], list[str]]:
    """(DPO-training prompts, held-out evaluation prompts): a fixed seeded split of every toy prompt."""
    return world.split_prompts(config.seed, config.num_held_out)


def prepare_toy_world(config: ToyWorldConfig, out: str, progress: bool = True) -> ToyWorld:
    """Pretrain the toy base model and classifier under `{out}/toy/` unless they are there already."""
    import torch

    from videodpo_ray.scoring import toy_semantic as toy_classifier
    from videodpo_ray.stages import toy_pretrain

    base_url, classifier_url = config.base_model_url(out), config.classifier_url(out)
    built = []
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        if not storage.exists(storage.join(classifier_url, toy_classifier.WEIGHTS_FILE)):
            logger.info("toy world: training the toy classifier -> %s", classifier_url)
            classifier = toy_classifier.train_classifier(config.classifier_settings(), progress)
            _build(classifier_url, toy_classifier.WEIGHTS_FILE, lambda d: toy_classifier.save_classifier(classifier, d))
            built.append("classifier")
        if not storage.exists(storage.join(base_url, toy_pretrain.REPORT_FILE)):
            logger.info("toy world: pretraining the toy base model -> %s", base_url)
            settings = config.pretrain_settings()
            _build(base_url, toy_pretrain.REPORT_FILE, lambda d: toy_pretrain.pretrain(settings, d, progress=progress))
            built.append("base model")
    finally:
        torch.set_num_threads(threads)
    return ToyWorld(base_url, classifier_url, tuple(built))


def _build(url: str, marker: str, write: Callable[[Path], object]) -> None:
    """Write a directory with `write(local_dir)` and commit it at `url`: a local rename, or an upload whose `marker`
    file (what readers check) goes last, so a crash never leaves a directory that looks complete."""
    if storage.is_local(url):
        Path(url).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(url).parent if storage.is_local(url) else None, prefix=".tmp-") as tmp:
        local = Path(tmp) / "dir"
        write(local)
        storage.remove_tree(url)
        if storage.is_local(url):
            local.rename(url)  # same folder: atomic
            return
        marker_bytes = (local / marker).read_bytes()
        (local / marker).unlink()
        storage.upload_directory(local, url)
        storage.write_bytes_atomic(storage.join(url, marker), marker_bytes)
