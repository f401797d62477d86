"""Demo context extension: the demo pretrain model, trained at 256 tokens, extended to 1024
(4x) in a stage that is also its anneal, gated on passkey retrieval.

The recipe of Llama 3 / Qwen / OLMo 3 long-context stages at demo scale: branch from the pretrain
run's stable phase (before its decay, as the mid-training demo does), raise the RoPE base
(ABF), pack 4x longer sequences whole (first_fit: a document never straddles two rows), and
anneal to 0 on a mixture that keeps the general sources (replay: code files are the long
documents) and adds synthetic retrieval documents (a pass key in a haystack of repeating
sentences, then the question and the answer; jmid/data/retrieval.py). Passkey retrieval at 256
and 1024 tokens is measured at every eval on the test's own filler, never trained on.

python -m jmid.train --config=configs/demo/pretrain.py     # first, once
python -m jmid.passkey --workdir=runs/demo-pretrain --lengths=256,1024   # before
python -m jmid.train --config=configs/demo/longctx.py
python -m jmid.passkey --workdir=runs/demo-longctx --lengths=256,1024    # after

About 9.5 minutes on a 2-core CPU; README.md has the before/after numbers. With several
devices, --config.mesh.context=N splits each sequence over N of them (ring attention); the
losses are the same.
"""

from ml_collections import ConfigDict

from configs.demo import pretrain


def get_config(arg: str | None = None) -> ConfigDict:
  c = pretrain.get_config(arg)  # the same model: params are handed over unchanged
  c.run.workdir = "runs/demo-longctx"
  c.run.name = "demo-longctx"
  c.init.from_path = "runs/demo-pretrain/checkpoints/160"  # stable phase, still at peak lr
  c.init.load = "params"
  # The pretrain's document order (data.shuffle_seed unset), unlike the mid-train: measured,
  # its own order or a warm optimizer left the held-out loss at 256 tokens 1-9% higher here
  # (README, "Planning a context extension").
  c.model.rope_theta = 40000.0  # 4x the pretraining base for 4x the context
  c.data.seq_len = 1024
  c.data.packing = "first_fit"
  c.data.sources = ConfigDict({"retrieval": {"path": ""}})  # an optional demo source
  c.data.mixture = ((0, {"text": 0.25, "code": 0.2, "math": 0.1, "chat": 0.05,
                         "retrieval": 0.4}),)
  c.optim.lr_from_checkpoint = True  # the lr the pretrain run had reached (3e-3)...
  c.optim.schedule = "linear"  # ...annealed to 0 over the stage
  c.optim.warmup_steps = 10  # a short re-warmup: the new RoPE base moves every attention score
  c.train.global_batch = 4  # 4 x 1024: the pretraining's 4096 tokens per step
  c.train.steps = 150
  c.train.eval_every_steps = 50
  c.train.eval_batches = 4
  c.train.checkpoint_every_steps = 50
  c.train.passkey_lengths = (256, 1024)
  c.train.passkey_samples = 2
  return c
