#!/usr/bin/env bash
# One jmid training job on a TPU VM slice: the same command on every worker (host) of the slice.
#   TPU_NAME=my-v5e ZONE=us-west4-a [PROJECT=my-project] \
#     launch/tpu/train.sh configs/x.py [--config.k=v ...]
# Multislice (several slices joined over the data-center network, made with `gcloud compute
# tpus queued-resources create QR ... --node-count=N`): QUEUED_RESOURCE=QR instead of TPU_NAME
# sends the command to every worker of every slice; the platform sets MEGASCALE_* on each, jax
# joins them, and jmid's mesh puts the data axis across the slices (mesh.dcn_data).
# jax finds the workers itself (TPU VM metadata), so no JMID_* variables are set.
# Each worker needs the repository at JMID_REMOTE_DIR (default: jmid, under the home directory)
# and its environment; JMID_PYTHON (default python) picks the interpreter, e.g. .venv/bin/python.
# JMID_DRY_RUN=1 prints the gcloud command instead of running it.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: TPU_NAME=... (or QUEUED_RESOURCE=...) ZONE=... [PROJECT=...]" \
    "launch/tpu/train.sh CONFIG.py [--config.key=value ...]" >&2
  exit 2
fi
if [[ -z ${TPU_NAME:-} && -z ${QUEUED_RESOURCE:-} ]] || [[ -z ${ZONE:-} ]]; then
  missing=ZONE
  if [[ -z ${TPU_NAME:-} && -z ${QUEUED_RESOURCE:-} ]]; then missing=TPU_NAME; fi
  echo "launch/tpu/train.sh: $missing is not set; export TPU_NAME=<TPU VM name> (or" \
    "QUEUED_RESOURCE=<multislice queued resource>) ZONE=<its zone> (PROJECT optional)" >&2
  exit 2
fi

# The remote shell reads one string: quote every word so overrides with spaces arrive intact.
remote="cd $(printf '%q' "${JMID_REMOTE_DIR:-jmid}") && exec"
for w in "${JMID_PYTHON:-python}" -m jmid.train "--config=$1" "${@:2}"; do
  remote+=" $(printf '%q' "$w")"
done
if [[ -n ${QUEUED_RESOURCE:-} ]]; then
  gcloud=(gcloud compute tpus queued-resources ssh "$QUEUED_RESOURCE" --zone "$ZONE")
  where=(--node=all --worker=all)  # every host of every slice
else
  gcloud=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE")
  where=(--worker=all)  # every host of the slice; each process drives its host's chips
fi
if [[ -n ${PROJECT:-} ]]; then gcloud+=(--project "$PROJECT"); fi
gcloud+=("${where[@]}" --command "$remote")

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
