"""A safetensors folder read lazily and written in shards, with numpy only.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw little-endian bytes. Reading memory-maps each file, so a slice of a
tensor touches only its own bytes (each device reads just its shard). bfloat16 comes from
ml_dtypes, which jax already needs. Sharded folders have model.safetensors.index.json.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

from jmid.errors import UserError

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64),
          "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


def is_hf_folder(path: str) -> bool:
  """A config.json next to safetensors weights (single, or sharded with an index)."""
  return os.path.isfile(os.path.join(path, "config.json")) and any(
      f.endswith(".safetensors") or f.endswith(".safetensors.index.json")
      for f in os.listdir(path))


class Folder:
  """{tensor name -> memory-mapped array} over every safetensors file of a HF folder."""

  def __init__(self, path: str) -> None:
    self.path = path
    index = os.path.join(path, INDEX)
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(single):
      files = ["model.safetensors"]
    else:
      raise UserError(f"{path}: no model.safetensors nor {INDEX}; a Hugging Face model folder "
                      "holds its weights in one of those")
    self.tensors: dict[str, np.ndarray] = {}
    for name in files:
      self.tensors.update(_map_file(os.path.join(path, name)))

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def __getitem__(self, name: str) -> np.ndarray:
    return self.tensors[name]


def _map_file(path: str) -> dict[str, np.ndarray]:
  try:
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
  except (OSError, ValueError, struct.error) as e:
    raise UserError(f"{path}: not a readable safetensors file ({e})") from None
  header.pop("__metadata__", None)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    if info["dtype"] not in DTYPES:
      raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which jmid does not "
                      f"read ({', '.join(DTYPES)})")
    start, end = info["data_offsets"]
    if end > data.size:
      raise UserError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
    out[name] = data[start:end].view(DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def write_folder(path: str, tensors: Iterable[tuple[str, np.ndarray]],
                 shard_bytes: int) -> list[str]:
  """Writes (name, array) pairs into model.safetensors, or into numbered shards of at most
  `shard_bytes` plus an index when they do not fit in one. Holds one shard in memory: a written
  shard leaves only its tensor names behind."""
  shard_names: list[list[str]] = []  # per written shard
  current: list[tuple[str, np.ndarray]] = []
  size = total = 0

  def flush() -> None:
    _write_file(os.path.join(path, f".shard-{len(shard_names) + 1}.tmp"), current)
    shard_names.append([name for name, _ in current])
    current.clear()

  for name, array in tensors:
    if current and size + array.nbytes > shard_bytes:
      flush()
      size = 0
    current.append((name, np.ascontiguousarray(array)))
    size += array.nbytes
    total += array.nbytes
  if not shard_names:
    _write_file(os.path.join(path, "model.safetensors"), current)
    return ["model.safetensors"]
  flush()
  n = len(shard_names)
  weight_map = {}
  for i, names in enumerate(shard_names, start=1):
    final = f"model-{i:05d}-of-{n:05d}.safetensors"
    os.replace(os.path.join(path, f".shard-{i}.tmp"), os.path.join(path, final))
    weight_map.update({name: final for name in names})
  with open(os.path.join(path, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return sorted(set(weight_map.values()))


def _write_file(path: str, tensors: list[tuple[str, np.ndarray]]) -> None:
  header, offset = {}, 0
  for name, a in tensors:
    header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  header["__metadata__"] = {"format": "pt"}
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data, as the reference writer does
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for _, a in tensors:
      f.write(a.tobytes())

