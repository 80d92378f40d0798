"""Training without Ray: the train config (and the DeepSpeed config it implies), the data plan, input validation,
the DPO step and the checkpoint / export format. The Ray Train worker that runs them is `actors/train_worker.py`.

Nothing is re-exported here: the config, the plan and the checkpoint format import without torch, so the train job
refuses bad input before torch is paid for."""
