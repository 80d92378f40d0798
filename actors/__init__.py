"""What runs inside Ray workers: thin callables over the library, built once per actor.

- `sampler.SamplerActor`, `scorer.OmniScorer`, `latent_encoder.LatentEncoderActor`: Ray Data callable classes
  (`map_batches(Class, fn_constructor_kwargs=..., compute=ActorPoolStrategy(...))`);
- `train_worker.train_loop_per_worker`: the Ray Train worker function (one DeepSpeed rank per worker).
They hold models and move rows; every formula they use lives in `videodpo_ray`.
"""
