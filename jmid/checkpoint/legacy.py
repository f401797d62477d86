"""Checkpoints written before the model was made of modules (jmid/nn) name a layer's weights
flat under `blocks` ('params.blocks.wq', 'opt_state.0.mu.blocks.w_gate'); now attention's and
the MLP's sit under `blocks.attn` and `blocks.mlp`. Every read of a checkpoint goes through
here, so such a checkpoint resumes, hands off, exports and verifies (its fingerprints carry the
old names) as one written today. Nothing is rewritten on disk."""

from __future__ import annotations

from typing import Any

ATTN = ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "q_norm", "k_norm")
MLP = ("w_gate", "w_up", "w_down")
_OWNER = {**{k: "attn" for k in ATTN}, **{k: "mlp" for k in MLP}}


def new_key(key: str) -> str:
  """'params.blocks.wq' -> 'params.blocks.attn.wq'; a key already new stays as it is."""
  parts = key.split(".")
  for i in range(len(parts) - 1):
    if parts[i] == "blocks" and parts[i + 1] in _OWNER:
      return ".".join(parts[:i + 1] + [_OWNER[parts[i + 1]]] + parts[i + 1:])
  return key


def _walk(tree: Any, blocks: Any) -> Any:
  """tree with every dict under a 'blocks' key rewritten by `blocks`."""
  if isinstance(tree, dict):
    return {k: blocks(v) if k == "blocks" and isinstance(v, dict) else _walk(v, blocks)
            for k, v in tree.items()}
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(_walk(x, blocks) for x in tree))
  if isinstance(tree, (list, tuple)):
    return type(tree)(_walk(x, blocks) for x in tree)
  return tree


def _nest(b: dict) -> dict:
  out: dict = {}
  for k, v in b.items():
    if k in _OWNER:
      out.setdefault(_OWNER[k], {})[k] = v
    else:
      out[k] = v
  return out


def _flatten(b: dict) -> dict:
  out = {k: v for k, v in b.items() if k not in ("attn", "mlp")}
  for owner in ("attn", "mlp"):
    out.update(b.get(owner) or {})
  return out


def is_old(saved: Any) -> bool:
  """Whether a saved state tree (or any tree holding params) names weights the old way."""
  found = []
  _walk(saved, lambda b: found.append(any(k in _OWNER for k in b)) or b)
  return any(found)


def to_new(tree: Any) -> Any:
  return _walk(tree, _nest)


def to_old(tree: Any) -> Any:
  return _walk(tree, _flatten)
