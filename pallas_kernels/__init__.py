"""jmid's Pallas kernels, importable without jmid.

Flash attention for GPU and TPU (causal, packed documents, GQA, sliding window) lands here with
its own issue; until then jmid.attention offers the 'xla' and 'cudnn' implementations.
"""
