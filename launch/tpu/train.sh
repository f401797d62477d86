#!/usr/bin/env bash
# One jmid training job on a TPU VM slice: the same command on every worker (host) of the slice.
#   TPU_NAME=my-v5e ZONE=us-west4-a [PROJECT=my-project] \
#     launch/tpu/train.sh configs/x.py [--config.k=v ...]
# jax finds the slice's workers itself (TPU_WORKER_HOSTNAMES), so no JMID_* variables are set.
# Each worker needs the repository at JMID_REMOTE_DIR (default: jmid, under the home directory)
# and its environment; JMID_PYTHON (default python) picks the interpreter, e.g. .venv/bin/python.
# JMID_DRY_RUN=1 prints the gcloud command instead of running it.
#
# Multislice (several slices joined over the data-center network) is not covered: the slices come
# from `gcloud compute tpus queued-resources create ... --node-count=N`, the platform sets the
# MEGASCALE_* variables on each worker, and the command would go to every node with
# `gcloud compute tpus queued-resources ssh QR --node=all --worker=all --command=...`; but jmid's
# mesh (jax.make_mesh) does not yet put the `data` axis across slices (see launch/README.md).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: TPU_NAME=... ZONE=... [PROJECT=...] launch/tpu/train.sh CONFIG.py" \
    "[--config.key=value ...]" >&2
  exit 2
fi
for v in TPU_NAME ZONE; do
  if [[ -z ${!v:-} ]]; then
    echo "launch/tpu/train.sh: $v is not set; export TPU_NAME=<TPU VM name>" \
      "ZONE=<its zone> (PROJECT optional)" >&2
    exit 2
  fi
done

# The remote shell reads one string: quote every word so overrides with spaces arrive intact.
remote="cd $(printf '%q' "${JMID_REMOTE_DIR:-jmid}") && exec"
for w in "${JMID_PYTHON:-python}" -m jmid.train "--config=$1" "${@:2}"; do
  remote+=" $(printf '%q' "$w")"
done
gcloud=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE")
if [[ -n ${PROJECT:-} ]]; then gcloud+=(--project "$PROJECT"); fi
# --worker=all: every host of the slice at once; each process drives its host's chips.
gcloud+=(--worker=all --command "$remote")

# A word as a shell reads it: single-quoted only where it has to be.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then echo "$1"; else echo "'${1//\'/\'\\\'\'}'"; fi
}

if [[ ${JMID_DRY_RUN:-0} == 1 ]]; then
  line=""
  for w in "${gcloud[@]}"; do line+="${line:+ }$(quote "$w")"; done
  echo "$line"
  exit 0
fi
exec "${gcloud[@]}"
