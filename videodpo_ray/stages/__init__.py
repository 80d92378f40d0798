"""The stages, pure (no Ray): each owns its config, its shard schema, its plan (what is committed, what is left),
its manifest and its report. The runtime (`jobs/`, `actors/`) wires a stage to Ray actors; nothing here starts one.

- `common`: actor-pool settings, chunk collection, run manifests;
- `prompts`: prompt files;
- `generate`: prompts -> samples and scores shards;
- `score`: existing mp4 files -> scores shards;
- `pair`: scores -> pair shards with latents;
- `pipeline`: generate -> pair -> train, and its report;
- `importer`: the released VideoDPO data set -> pair shards.
"""
