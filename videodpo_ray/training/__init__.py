"""Training without Ray: the train config (and the DeepSpeed config it implies), the data plan, input validation,
the DPO step and the checkpoint / export format. The Ray Train worker that runs them is `actors/train_worker.py`."""

from videodpo_ray.training.step import StepOutput, dpo_step, sft_step

__all__ = ["StepOutput", "dpo_step", "sft_step"]
