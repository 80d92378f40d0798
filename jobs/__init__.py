"""Entrypoints only: parse and validate a config, check inputs, connect to Ray, wire a stage to its actors, exit.

`python -m jobs.<name> CONFIG.yaml [key.sub=value ...]` (and `videodpo-ray <name>`) for generate, score, pair,
train and pipeline. Exit codes: 0 done; 1 some work failed (what was committed stays, a rerun completes the rest);
2 bad config or input (nothing was started). The stage logic lives in `videodpo_ray.stages` and
`videodpo_ray.training`; the Ray-side callables in `actors/`.
"""
