"""videodpo-ray: VideoDPO (Diffusion-DPO on OmniScore-ranked video pairs) as a distributed Ray system.

The package is layered; a module never imports one from a higher layer (import-linter checks it, see README):
foundation (`config`, `storage`, `shards`, `video`, `seeds`, `dimensions`, `errors`) < math (`dpo`, `pairs`,
`omniscore`) < `models` < `scoring` < `training` < `stages` (pure, no Ray) < the runtime (top-level `actors`,
`jobs`) < `cli`.
"""
