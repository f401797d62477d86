"""Demo post-training (SFT): the mid-trained model on chat data only; prompts get no loss.

python -m jmid.train --config=configs/demo/midtrain.py     # first
python -m jmid.train --config=configs/demo/sft.py
"""

from ml_collections import ConfigDict

from configs.demo import midtrain


def get_config(arg: str | None = None) -> ConfigDict:
  c = midtrain.get_config(arg)  # the same model, handed over unchanged
  c.run.workdir = "runs/demo-sft"
  c.run.name = "demo-sft"
  c.init.from_path = "runs/demo-midtrain"  # its final (annealed) checkpoint, params only
  c.init.load = "params"
  c.data.shuffle_seed = 2  # not the mid-train's order: it trained on the chat source too
  c.data.mixture = ((0, {"chat": 1.0}),)  # tutoring conversations, loss on the tutor's turns
  c.data.mixture_interpolation = "step"
  c.optim.lr_from_checkpoint = False  # the anneal ended at 0: SFT warms up to its own lr
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 10
  c.optim.schedule = "linear"
  c.train.steps = 60
  c.train.eval_every_steps = 30
  return c
