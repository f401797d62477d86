#!/usr/bin/env bash
# Fills a JobSet manifest and submits it with kubectl (JMID_DRY_RUN=1: prints it instead).
#   IMAGE=<registry>/jmid:tag [NAME=jmid] [JMID_MANIFEST=launch/gke/jobset-gpu.yaml] \
#     launch/gke/render.sh configs/x.py [--config.key=value ...]
# JMID_MANIFEST defaults to the TPU manifest, launch/gke/jobset.yaml.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: IMAGE=... [NAME=jmid] launch/gke/render.sh CONFIG.py [--config.key=value ...]" >&2
  exit 2
fi
if [[ -z ${IMAGE:-} ]]; then
  echo "launch/gke/render.sh: IMAGE is not set; export IMAGE=<the jmid container image>" >&2
  exit 2
fi
here=.  # this script's folder: where the manifests are
if [[ ${BASH_SOURCE[0]} == */* ]]; then here=${BASH_SOURCE[0]%/*}; fi
manifest=$(<"${JMID_MANIFEST:-$here/jobset.yaml}")

# The arguments as a YAML flow list of double-quoted strings (\ and " escaped), so any override
# arrives intact, spaces and YAML's special characters included.
items=()
for w in "--config=$1" "${@:2}"; do
  w=${w//\\/\\\\}
  items+=("\"${w//\"/\\\"}\"")
done
printf -v args '%s, ' "${items[@]}"
args="[${args%, }]"

# Replaces the placeholder ${<name>}; the value quoted, or bash 5.2 reads a & in it as the match.
fill() { manifest=${manifest//"\${$1}"/"$2"}; }
fill NAME "${NAME:-jmid}"
fill IMAGE "$IMAGE"
fill ARGS "$args"

if [[ ${JMID_DRY_RUN:-0} == 1 ]]; then
  echo "$manifest"
  exit 0
fi
kubectl apply -f - <<< "$manifest"
