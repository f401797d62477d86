"""model.attention='cudnn' with packed documents as offsets: the offsets describe exactly the
segment mask, the step lowers for CUDA to cuDNN's fused attention with no [T, T] array, and
what cuDNN cannot do is one line. (No GPU here: cuDNN itself runs only on the lent GPU.)"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as fa

from jmid import attention as attention_lib
from jmid import build, sharding
from jmid import config as config_lib
from jmid import loop
from jmid.errors import ConfigError, UserError
from tests.helpers import tiny_config, tiny_configdict


def _rows(rng: np.random.Generator, b: int, t: int) -> np.ndarray:
  """Packed rows: documents of random lengths (some of one token), padding (0) at some ends."""
  rows = np.zeros((b, t), np.int32)
  for r in range(b):
    pos, seg = 0, 1
    end = t - int(rng.integers(0, 6)) * (r % 2)
    while pos < end:
      n = int(rng.choice([1, 2, 5, 9]))
      rows[r, pos:min(pos + n, end)] = seg
      pos, seg = pos + n, seg + 1
  return rows


def test_offsets_describe_exactly_the_segment_mask():
  """From (lengths, starts) alone, rebuild which key each query may see (same document, not
  later): it equals the dense mask the xla path uses, for every non-padding query."""
  rng = np.random.default_rng(0)
  seg = _rows(rng, 4, 40)
  max_docs = attention_lib.docs_per_row(seg) + 2
  lengths, starts = (np.asarray(a) for a in attention_lib.packed_offsets(jnp.asarray(seg),
                                                                        max_docs))
  assert starts.shape == (4, max_docs + 1) and (starts[:, -1] == -1).all()
  for r in range(4):
    doc = np.full(40, -1)
    for i in range(max_docs):
      assert (lengths[r, i] == -1) == (starts[r, i] == -1)
      if starts[r, i] >= 0:
        doc[starts[r, i]:starts[r, i] + lengths[r, i]] = i
    assert ((doc >= 0) == (seg[r] > 0)).all()
    rebuilt = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0) & np.tri(40, dtype=bool)
    dense = np.asarray(attention_lib.segment_mask(jnp.asarray(seg[r:r + 1])))[0, 0]
    keep = seg[r] > 0
    np.testing.assert_array_equal(rebuilt[keep], dense[keep])


def _lower_for_cuda(fn, *args) -> str:
  """StableHLO of fn lowered for CUDA on this host: jax's cuDNN entry asks the local GPU for
  its compute capability and the cuDNN library for its version while tracing; here there are
  neither, so those two questions are answered as an H100 with cuDNN 9.10 would."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(fa, "check_cudnn_version", lambda: 91000)
    mp.setattr(fa, "check_compute_capability", lambda capability: True)
    checks = [jax.export.DisabledSafetyCheck.custom_call(n)
              for n in ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")]
    return jax.export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=checks)(*args).mlir_module()


@pytest.mark.parametrize("window", [0, 100])
def test_the_gradient_lowers_to_cudnn_with_offsets_and_no_t_by_t_array(window):
  """Forward and backward are cuDNN's fused kernels with the document offsets as operands and
  a padding-causal mask; nothing of T x T size is in the program (the old path passed a dense
  [B, 1, T, T] mask, made into a bias); a window goes to cuDNN's sliding window."""
  t = 512
  q = jax.ShapeDtypeStruct((2, t, 8, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, t, 8, 64), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, t), jnp.int32)

  def loss(q, k, v, s):
    out = attention_lib.attention(q, k, v, s, implementation="cudnn", window=window,
                                  max_docs=16)
    return out.astype(jnp.float32).sum()
  text = _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, seg)
  calls = re.findall(r"custom_call @(__cudnn\$\w+)\(", text)
  assert calls == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"], calls
  assert '\\22mask_type\\22: \\22PADDING_CAUSAL\\22' in text
  assert f'\\22sliding_window_length\\22: {window}' in text
  assert '\\22max_seg_per_batch\\22: 16' in text
  assert not re.search(rf"tensor<[^>]*\b{t}x{t}\b", text), "a [T, T] array is in the program"


def test_what_cudnn_cannot_do_is_one_line():
  """GQA with packed documents read wrong keys before jax 0.11.2; rows with more documents
  than the slots are refused by the loop (checked here on a host batch)."""
  c = tiny_configdict(attention="cudnn", compute_dtype="bfloat16", n_heads=4, n_kv_heads=2)
  if config_lib._jax_at_least(0, 11, 2):
    config_lib.from_configdict(c)
  else:
    with pytest.raises(ConfigError, match="reads wrong keys before jax 0.11.2"):
      config_lib.from_configdict(c)
  c.model.n_kv_heads, c.model.cudnn_max_docs = 4, 0
  with pytest.raises(ConfigError, match="model.cudnn_max_docs=0: must be > 0"):
    config_lib.from_configdict(c)
  seg = np.array([[1, 1, 2, 3, 3, 0], [4, 4, 4, 4, 5, 5]])
  assert attention_lib.docs_per_row(seg) == 3
  c.model.cudnn_max_docs = 2
  with pytest.raises(UserError, match="the batch of step 7: a row holds 3 documents, more "
                     "than model.cudnn_max_docs=2 .* set it to 3 or more"):
    loop._to_device(config_lib.from_configdict(c), None, {"segment_ids": seg},
                    "the batch of step 7")


def test_auto_attention_chooses_per_platform_as_documented():
  """'auto': cuDNN on Hopper GPUs when the model allows it, else our kernel, else xla; our
  kernel on TPUs; xla on CPUs; a kernel the devices cannot use is passed over."""
  m = tiny_config(attention="auto", compute_dtype="bfloat16", n_heads=4, n_kv_heads=4).model
  choose = config_lib.choose_attention
  assert [choose(m, p) for p in ("gpu", "gpu-sm8x", "tpu", "cpu")] == \
      ["cudnn", "pallas", "pallas", "xla"]
  assert choose(m, "gpu", context=2) == "pallas"  # ring attention takes no cuDNN
  f32 = dataclasses.replace(m, compute_dtype="float32")
  assert choose(f32, "gpu") == "pallas" and choose(f32, "gpu", unusable=("pallas",)) == "xla"
  wide = dataclasses.replace(m, head_dim=192)  # no lane tiling for our TPU kernel
  assert choose(wide, "tpu") == "xla" and choose(wide, "gpu") == "cudnn"
  gqa = dataclasses.replace(m, n_kv_heads=2)
  assert choose(gqa, "gpu") == ("cudnn" if config_lib._jax_at_least(0, 11, 2) else "pallas")
  assert choose(dataclasses.replace(m, attention="xla"), "gpu") == "xla"
  c = tiny_config(attention="auto")
  assert build.attention_for(c, sharding.make_mesh(c.mesh, jax.devices())) == "xla"
