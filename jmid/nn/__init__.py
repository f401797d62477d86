"""The model's modules, one file each, in the order a token meets them: param (how every
weight is made), norm, attn, mlp, block (a layer: norms around attention and MLP), decoder
(embedding, the layers scanned in groups of the layer pattern, final norm, LM head).
jmid.model is the functional face of Decoder for the train step and the tools."""
