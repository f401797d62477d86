"""Demo mid-training: branch from the demo pretrain run's stable phase (the OLMo 2 recipe) and
anneal from the lr it had reached, linearly to 0, on a mixture that shifts toward math and code,
with chat data whose prompts get no loss.

python -m jmid.train --config=configs/demo/pretrain.py     # first, once
python -m jmid.train --config=configs/demo/midtrain.py
python -m jmid.train --config=configs/demo/sft.py          # then post-training
"""

from ml_collections import ConfigDict

from configs.demo import pretrain


def get_config(arg: str | None = None) -> ConfigDict:
  c = pretrain.get_config(arg)  # the same model: params are handed over unchanged
  c.run.workdir = "runs/demo-midtrain"
  c.run.name = "demo-midtrain"
  # The pretrain run's last checkpoint before its WSD decay (steps 180-240) began: still at its
  # peak lr. Params and AdamW moments (a warm optimizer: no shock at 3e-3), step 0.
  c.init.from_path = "runs/demo-pretrain/checkpoints/160"
  c.init.load = "params+optimizer"
  # Its own document order (the eval split stays run.seed's): with the pretrain's order it
  # would re-read the documents the pretrain read first and learn little from them.
  c.data.shuffle_seed = 1
  # Token proportions, blended linearly from the first stage to the second (SmolLM3-style shift
  # from general text toward math and code), with a steady share of chat.
  c.data.mixture = (
      (0, {"text": 0.40, "code": 0.25, "math": 0.20, "chat": 0.15}),
      (90, {"text": 0.15, "code": 0.35, "math": 0.35, "chat": 0.15}),
  )
  c.data.mixture_interpolation = "linear"
  c.optim.lr_from_checkpoint = True  # start at the lr stored in that checkpoint (3e-3)
  c.optim.schedule = "linear"  # anneal to end_lr=0 over the run
  c.optim.warmup_steps = 0
  c.train.steps = 120
  c.train.eval_every_steps = 40
  return c
