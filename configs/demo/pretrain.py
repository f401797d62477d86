"""Demo pretraining on the built-in corpus (code, math, text): a ~2M-param model, ~5 minutes on
a 2-core CPU.

python -m jmid.train --config=configs/demo/pretrain.py
"""

from ml_collections import ConfigDict

from configs import base


def get_config(arg: str | None = None) -> ConfigDict:
  c = base.get_config(arg)
  c.run.workdir = "runs/demo-pretrain"
  c.run.name = "demo-pretrain"
  c.model.vocab_size = 384  # byte tokenizer (258 ids), padded to a multiple of 128
  c.model.d_model = 256
  c.model.n_layers = 3
  c.model.n_heads = 8
  c.model.n_kv_heads = 4
  c.model.d_ff = 512
  c.data.demo = True
  c.data.seq_len = 256
  c.optim.lr = 3e-3
  c.optim.schedule = "wsd"
  c.optim.warmup_steps = 30
  c.optim.decay_steps = 60
  c.optim.weight_decay = 0.05
  c.train.steps = 240
  c.train.global_batch = 16
  c.train.log_every_steps = 10
  c.train.eval_every_steps = 80
  c.train.checkpoint_every_steps = 40
  return c
