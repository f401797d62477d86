"""A local Google Cloud Storage for tests: gcp-storage-emulator (from the package index), with
the three things real GCS does that it lacks (2026.7.19) and TensorStore relies on:
- media downloads carry `x-goog-generation` (without it TensorStore reads generation 0, and a
  later conditional write of an OCDBT manifest fails: "Malformed StorageGeneration", about one
  Orbax save in five);
- uploads honour `ifGenerationMatch` (412 when it does not match; 0: the object must not exist,
  which is also what makes a lock file's create-if-absent atomic);
- media GETs honour `ifGenerationMatch` (412) and `ifGenerationNotMatch` (304).

    python tests/gcs_emulator.py PORT BUCKET      (in memory, on 127.0.0.1)

`start(bucket)` runs it on a free port and returns (process, environment): the variables that
point gcsfs (etils epath's gs:// backend) and TensorStore (Orbax's) at it, without credentials.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from http import HTTPStatus
from typing import Any


def env(url: str) -> dict[str, str]:
  """What a process needs to use the emulator at `url` for gs://, set before gcsfs is imported."""
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
      "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup
      # gcsfs otherwise probes each bucket over gRPC/TLS, which the emulator does not speak: a
      # 60 s timeout per bucket call
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore (Orbax's arrays)
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no credential discovery
  }


def start(bucket: str) -> tuple[subprocess.Popen, dict[str, str]]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), bucket],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(url + "/", timeout=1).read()
      return proc, env(url)
    except Exception:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        raise RuntimeError(f"the GCS emulator did not start on port {port}") from None
      time.sleep(0.1)


def _patch() -> None:
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects  # patched before .server builds its routes
  download, insert = objects.download, objects.insert

  def generation(storage: Any, bucket: str, name: str) -> str:
    try:
      return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
      return "0"

  def query(request: Any, key: str) -> str | None:
    v = request.query.get(key)
    return v[0] if v else None

  def download_(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    gen = generation(storage, bucket, name)
    if gen != "0":
      match, not_match = query(request, "ifGenerationMatch"), query(request, "ifGenerationNotMatch")
      if match is not None and match != gen:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
      response["x-goog-generation"] = gen
      if not_match is not None and not_match == gen:
        response.status = HTTPStatus.NOT_MODIFIED
        return None
      obj = storage.get_file_obj(bucket, name)
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return download(request, response, storage, *args, **kwargs)

  def insert_(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
    match, name = query(request, "ifGenerationMatch"), query(request, "name")
    if match is not None and name is not None and \
        generation(storage, request.params["bucket_name"], name) != match:
      response.status = HTTPStatus.PRECONDITION_FAILED
      response.json({"error": {"code": 412, "message": "conditionNotMet"}})
      return None
    return insert(request, response, storage, *args, **kwargs)

  objects.download, objects.insert = download_, insert_


if __name__ == "__main__":
  import logging
  logging.disable(logging.CRITICAL)
  _patch()
  from gcp_storage_emulator.server import create_server
  create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2]).run()
