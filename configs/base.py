"""Every jmid config key, with its default and a one-line meaning.

Experiment configs import this file and override a few keys; never copy it. Sections mirror the
modules that read them (run -> train.py, model -> model.py, mesh -> sharding.py, data -> data/,
optim -> optim.py, train -> train.py/steps.py, init -> checkpoint.py).
"""

from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
  """Returns the base config; `arg` is unused here (experiment configs may use theirs)."""
  del arg
  c = ConfigDict()

  c.run = ConfigDict()
  c.run.workdir = "runs/default"  # where config.json, checkpoints/, metrics.jsonl, tensorboard/ go
  c.run.seed = 0  # one seed for params init and data order
  c.run.name = "jmid"  # free-form label written to config.json and metrics
  # jax's persistent compilation cache on GPUs and TPUs (a restart skips the compile); "" = off
  c.run.compilation_cache = "~/.cache/jmid/xla"

  c.model = ConfigDict()
  # The Hugging Face family the model is (llama | mistral | qwen2 | qwen3; hf.set_model sets it
  # from a folder's config.json): it fixes the switches below as that family has them, and
  # export writes that architecture. "" = none: export writes the family the switches match.
  c.model.family = ""
  c.model.vocab_size = 32000  # rows of the embedding; >= the tokenizer's vocab
  c.model.d_model = 512  # residual width
  c.model.n_layers = 8  # decoder blocks (stacked and scanned)
  c.model.n_heads = 8  # query heads
  c.model.n_kv_heads = 8  # key/value heads (GQA when < n_heads); must divide n_heads
  c.model.head_dim = 0  # per-head width; 0 means d_model // n_heads
  c.model.d_ff = 1536  # SwiGLU hidden width
  c.model.rope_theta = 10000.0  # RoPE base (raise it to extend context)
  c.model.rope_scaling = "none"  # none | linear | llama3 | yarn (as Hugging Face defines them)
  c.model.rope_factor = 1.0  # context extension factor of the scaling
  c.model.rope_original_max_len = 0  # llama3 / yarn: the context length before extension
  c.model.rope_low_freq_factor = 1.0  # llama3: wavelengths above original/low are interpolated
  c.model.rope_high_freq_factor = 4.0  # llama3: wavelengths below original/high are kept
  c.model.rope_beta_fast = 32.0  # yarn: rotations above which a pair is kept (extrapolated)
  c.model.rope_beta_slow = 1.0  # yarn: rotations below which a pair is interpolated
  c.model.rope_attention_factor = 0.0  # yarn: cos/sin scale; 0 = 0.1 * ln(factor) + 1
  c.model.norm_eps = 1e-5  # RMSNorm epsilon
  c.model.tie_embeddings = False  # LM head reuses the token embedding
  c.model.qkv_bias = False  # bias on q/k/v projections (Qwen2)
  c.model.qk_norm = False  # per-head RMSNorm on q and k (Qwen3)
  c.model.sliding_window = 0  # attend to at most this many tokens back (Mistral); 0 = all
  # Per-layer attention: a group of kinds repeated over the layers, G global, L local (the
  # window above), N global without RoPE; "" = every layer L with a window, else G. Gemma 3:
  # "LLLLLG", OLMo 3: "LLLG", SmolLM3: "GGGN". Families set these from config.json (hf.set_model).
  c.model.layer_pattern = ""
  c.model.rope_local_theta = 0.0  # RoPE base of L layers (unscaled); 0 = the global RoPE
  c.model.norm_style = "llama"  # llama (x * w) | gemma (x * (1 + w), float32) | olmo (float32)
  c.model.norm_placement = "pre"  # pre (Llama) | pre_post (Gemma) | post (OLMo 2/3)
  c.model.qk_norm_scope = "head"  # q/k norm per head | over the whole projection (OLMo 2/3)
  c.model.mlp_activation = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
  c.model.embed_scale = False  # embeddings times sqrt(d_model) (Gemma)
  c.model.query_scale = 0.0  # attention logits scaled by query_scale ** -0.5; 0 = head width
  c.model.attn_softcap = 0.0  # attention logits -> c tanh(logits / c) (Gemma 2); 0 = none
  c.model.final_softcap = 0.0  # LM-head logits capped the same way (Gemma 2); 0 = none
  # auto (cudnn on Hopper GPUs, our pallas kernel on TPU and older GPUs, xla on CPU: the first
  # of config.AUTO_ATTENTION the model can use) | xla | cudnn | pallas (ours: Triton on GPU,
  # Mosaic on TPU, interpreted on CPU)
  c.model.attention = "auto"
  # cudnn: packed documents go to cuDNN as offsets (no [T, T] mask), in this many slots per row;
  # a batch with a row of more documents stops the run with one line saying so
  c.model.cudnn_max_docs = 32
  # What the layer scan saves for the backward pass: none (everything) | full (nothing) | dots
  # | dots_no_batch | 'save:qkv,attn' (exactly those of config.REMAT_NAMES); jmid.plan shows it
  c.model.remat = "none"
  # One compiled layer body looped n_layers times (fast compiles) or the layers unrolled (XLA
  # may schedule across layers; its FLOPs count covers every layer, jmid.plan shows it).
  c.model.scan_layers = True
  c.model.param_dtype = "float32"  # dtype params are stored (and optimized) in
  c.model.compute_dtype = "float32"  # matmul dtype; bfloat16 on accelerators
  c.model.init_std = 0.02  # std of the normal init of projections and embeddings

  c.mesh = ConfigDict()
  c.mesh.data = 1  # pure data-parallel replicas (across hosts/slices); -1 = remaining devices
  c.mesh.fsdp = -1  # params and batch sharded; -1 = remaining devices
  c.mesh.tensor = 1  # heads / MLP / vocab sharded
  c.mesh.context = 1  # sequence sharded over this many devices (ring attention, jmid/ring.py)
  c.mesh.context_layout = "zigzag"  # 2 mirrored chunks per device: equal causal work; or contiguous
  # Across nodes (GPU: one process per node) or TPU slices, over DCN / InfiniBand: the axes
  # above are then the layout inside one node/slice and these say how many nodes/slices the
  # data and fsdp axes span (the mesh's data axis is data * dcn_data). Data parallelism across
  # nodes all-reduces gradients once per step; fsdp across nodes gathers params every layer.
  c.mesh.dcn_data = 0  # 0 = every node/slice that dcn_fsdp does not take; 1 = one flat mesh
  c.mesh.dcn_fsdp = 1

  c.data = ConfigDict()
  c.data.demo = False  # build the built-in demo corpus (code, math, text) and use its sources
  c.data.cache_dir = "~/.cache/jmid"  # where the demo corpus is built once
  # name -> ConfigDict(path=..., and optionally weight, format, kind, field, dtype, eos_id,
  # eval_path): see SourceConfig in jmid/config.py for each key's meaning and default
  c.data.sources = ConfigDict()
  c.data.tokenizer = "byte"  # 'byte' (the demo's) or a Hugging Face tokenizer.json path
  c.data.mixture = ()  # ((start_step, {source: weight}), ...); () = constant source weights
  c.data.mixture_interpolation = "step"  # step | linear: weights between mixture stages
  c.data.seq_len = 1024  # tokens per packed row
  c.data.eval_fraction = 0.02  # share of each source's documents held out for eval
  c.data.packing = "concat"  # concat (concat-then-split) | first_fit
  c.data.shuffle = True  # shuffle documents (per epoch) before packing
  # The seed of the document order and the mixture's draws; -1: run.seed. The eval split is
  # always run.seed's. A stage branched from another run's checkpoint sets its own, or it reads
  # the documents in the order that run read them first.
  c.data.shuffle_seed = -1

  c.optim = ConfigDict()
  c.optim.lr = 3e-4  # peak learning rate
  c.optim.end_lr = 0.0  # learning rate at the last step (cosine, linear, wsd)
  c.optim.schedule = "cosine"  # constant | cosine | linear | wsd
  c.optim.warmup_steps = 100  # linear warmup from 0 to lr
  c.optim.decay_steps = 0  # wsd: length of the final decay; 0 means 20% of train.steps
  c.optim.decay_shape = "linear"  # wsd decay: linear | 1-sqrt | cosine
  c.optim.b1 = 0.9  # AdamW beta1
  c.optim.b2 = 0.95  # AdamW beta2
  c.optim.eps = 1e-8  # AdamW epsilon
  c.optim.weight_decay = 0.1  # decoupled weight decay (never on norms or biases)
  c.optim.decay_embeddings = False  # apply weight decay to embeddings and the LM head too
  c.optim.clip_norm = 1.0  # global gradient-norm clip; 0 disables
  c.optim.z_loss = 0.0  # weight of the log(Z)^2 auxiliary loss; 0 disables
  c.optim.lr_from_checkpoint = False  # peak lr := the lr stored in init.from_path (OLMo 2 anneal)

  c.train = ConfigDict()
  c.train.steps = 1000  # optimizer steps in this run; 0 = evaluate the init (init.from_path)
  c.train.global_batch = 32  # rows (sequences) per optimizer step, over all devices
  c.train.microbatches = 1  # gradient accumulation: global_batch is split into this many
  c.train.log_every_steps = 10  # console line + metrics.jsonl + TensorBoard
  c.train.eval_every_steps = 200  # held-out loss; 0 disables (a final eval always runs)
  c.train.eval_batches = 8  # batches of held-out data per eval
  c.train.checkpoint_every_steps = 200  # async Orbax save; a final save always happens
  c.train.keep_checkpoints = 3  # newest checkpoints kept
  c.train.ema_decay = 0.0  # EMA of params kept in the state (init.load='ema' reads it); 0 = off
  c.train.max_skipped_steps = 10  # stop after this many consecutive non-finite steps (skipped)
  # The LM head and cross-entropy run over chunks of about this many tokens per device, so no
  # float32 [tokens, vocab] logits array exists (jmid/loss.py); 0 computes them all at once
  c.train.loss_chunk = 1024
  c.train.resume_step = -1  # resume from this earlier checkpoint; newer ones are moved aside
  c.train.allow_resume_changes = False  # resume despite a changed seq_len/batch/data sources
  c.train.passkey_lengths = ()  # passkey retrieval at these lengths at every eval (jmid/passkey.py)
  c.train.passkey_depths = (0.0, 0.25, 0.5, 0.75, 1.0)  # where the key hides, 0 = start
  c.train.passkey_samples = 2  # keys per length and depth

  c.init = ConfigDict()
  c.init.from_path = ""  # another run's workdir or checkpoint step folder; "" = random init
  # params: its params, fresh optimizer | params+optimizer: AdamW moments too | ema: its EMA as
  # params. Always step 0 and fresh data; a checkpoint in this run's workdir always wins.
  c.init.load = "params"
  return c
