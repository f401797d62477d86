"""jmid's Pallas kernels, importable without jmid.

flash_attention: the forward pass so far (causal, packed documents, GQA, sliding window,
softcap), tested in interpret mode against attention_reference. The backward, the TPU tiling
and platform dispatch are the next steps of the kernel's issue; jmid.attention does not use it
yet.
"""

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.reference import attention_reference

__all__ = ["attention_reference", "flash_attention"]
