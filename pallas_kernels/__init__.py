"""jmid's Pallas kernels, importable without jmid.

flash_attention: forward and backward (custom VJP, all Pallas) with causal, packed-document,
GQA, sliding-window and softcap masking, tested in interpret mode against attention_reference;
jmid uses it with model.attention='pallas'. The TPU tiling, the Mosaic GPU layouts and
platform dispatch are the next steps of the kernel's issue: it runs interpreted on CPU only.
"""

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.reference import attention_reference

__all__ = ["attention_reference", "flash_attention"]
