"""jmid's Pallas kernels, importable without jmid.

flash_attention: forward and backward (custom VJP, all Pallas) with causal, packed-document,
GQA, sliding-window and softcap masking. It dispatches on the platform being lowered for:
Triton kernels on GPU (flash_gpu), Mosaic TPU kernels on TPU (flash_tpu), the GPU kernels
interpreted on CPU. attention_reference is the pure-jnp reference the tests check against.
"""

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.reference import attention_reference

__all__ = ["attention_reference", "flash_attention"]
