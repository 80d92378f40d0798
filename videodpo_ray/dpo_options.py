"""The Diffusion-DPO loss's options as types (`dpo.diffusion_dpo_loss` documents them), torch-free so a train config
parses without importing torch."""

from typing import Literal

DPOReduction = Literal["mean", "videodpo_reference"]
BetaSchedule = Literal["constant", "timestep_scaled"]
