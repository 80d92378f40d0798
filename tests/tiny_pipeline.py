"""The tiny pipeline's smallest useful run (configs/pipeline_tiny.yaml + these overrides), shared by the tests that
run it in-process (test_pipeline.py) and in killed driver processes (test_pipeline_resume.py)."""

from pathlib import Path

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pipeline_tiny.yaml"
TINY_OVERRIDES = [
    "prompts=[a corgi on the beach, a red car at night]",
    "generate.samples_per_prompt=2",
    "generate.prompts_per_chunk=1",
    "generate.sampling.num_frames=4",
    "generate.sampling.num_inference_steps=2",
    "train.overrides=[scaling.num_workers=1, optim.grad_accum=1, data.epochs=2, data.max_steps=2, "
    "run.checkpoint_every=2]",
    "evaluate.prompts=[a paper boat in the rain, a robot watering plants]",
    "evaluate.samples_per_prompt=1",
]
