"""python -m jmid.data.prepare end to end: real files in, a token file out, errors as one line,
and no finished-looking output after a crash."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jmid.config import SourceConfig
from jmid.errors import UserError
from jmid.data import prepare
from jmid.data.chat import render_chat
from jmid.data.sources import open_source
from jmid.data.tokenfile import TokenFile
from jmid.data.tokenizer import ByteTokenizer, load_tokenizer
from tests.bpe import sentences, train_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = "<|endoftext|>"


def run_prepare(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "jmid.data.prepare", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory) -> str:
  return train_bpe(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture(scope="module")
def texts() -> list[str]:
  docs = sentences(3000, seed=2)
  docs[7] = "über 数学 café 🙂\n\twith \"quotes\" and a literal <|endoftext|>"
  return docs


def write_jsonl(path: str, records: list[dict]) -> str:
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return path


def test_jsonl_and_parquet_with_bpe_and_two_workers(tmp_path, bpe_path, texts):
  write_jsonl(str(tmp_path / "a.jsonl"), [{"text": t} for t in texts[:1800]])
  pq.write_table(pa.table({"text": texts[1800:]}), tmp_path / "b.parquet", row_group_size=500)
  out = tmp_path / "out"
  r = run_prepare(f"--input={tmp_path}/a.jsonl,{tmp_path}/*.parquet", f"--tokenizer={bpe_path}",
                  f"--out={out}", "--workers=2")
  assert r.returncode == 0, r.stderr
  assert f"wrote {out}: 3,000 documents" in r.stdout and "tokens/s" in r.stdout
  tok = load_tokenizer(bpe_path)
  tf = TokenFile(str(out))
  assert len(tf) == len(texts) and not tf.has_mask and tf.meta["eos_id"] == tok.eos_id
  assert tf.meta["tokenizer"] == bpe_path and tf.meta["max_token_id"] < tok.vocab_size
  for i in (0, 7, 1799, 1800, 2999):
    assert tok.decode(tf[i]) == texts[i] + EOT
  assert all(tf[i][-1] == tok.eos_id for i in range(len(tf)))
  # The same output for any worker count: order is preserved.
  one = tmp_path / "one"
  r = run_prepare(f"--input={tmp_path}/a.jsonl,{tmp_path}/*.parquet", f"--tokenizer={bpe_path}",
                  f"--out={one}", "--workers=1")
  assert r.returncode == 0, r.stderr
  for name in ("tokens.bin", "offsets.npy"):
    assert (one / name).read_bytes() == (out / name).read_bytes()
  src = open_source("web", SourceConfig(path=str(out)), tok)
  assert src.num_bytes(7) == len(texts[7].encode("utf-8"))


def test_chat_and_txt_in_process(tmp_path, capsys):
  chats = [[{"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"{i} squared?"},
            {"role": "assistant", "content": f"{i * i}."}] for i in range(50)]
  pq.write_table(pa.table({"conv": chats}), tmp_path / "c.parquet")
  assert prepare.main([f"--input={tmp_path}/c.parquet", "--kind=chat", "--field=conv",
                       f"--out={tmp_path}/chat", "--workers=1"]) == 0
  tok = ByteTokenizer()
  src = open_source("sft", SourceConfig(path=str(tmp_path / "chat"), kind="chat"), tok)
  for i in (0, 49):
    tokens, mask = render_chat(chats[i], tok)
    assert src[i]["tokens"].tolist() == tokens.tolist() and src[i]["mask"].tolist() == mask.tolist()
    assert tok.decode(tokens[mask == 1]) == f"{i * i}.<|im_end|>"
  (tmp_path / "docs").mkdir()
  for k in range(3):
    (tmp_path / "docs" / f"{k}.txt").write_text(f"document {k}\nsecond line ü\n")
  assert prepare.main([f"--input={tmp_path}/docs", f"--out={tmp_path}/txt", "--workers=1"]) == 0
  tf = TokenFile(str(tmp_path / "txt"))
  assert [tok.decode(tf[k]) for k in range(3)] == [f"document {k}\nsecond line ü\n"
                                                  for k in range(3)]
  assert "3 documents" in capsys.readouterr().out


@pytest.mark.parametrize("make,args,match", [
    (None, ["--input={d}/missing*.jsonl"], r"--input=.*missing\*.jsonl.: no file matches"),
    ("x.csv", ["--input={d}/x.csv"], r"cannot tell the format of .*x.csv.*--format"),
    ("a.jsonl", ["--input={d}/a.jsonl", "--tokenizer={d}/nope.json"],
     r"--tokenizer='.*nope.json': no such file"),
    ("a.jsonl", ["--input={d}/a.jsonl", "--field=body"], r"a.jsonl:2: no field 'body'"),
    ("a.jsonl", ["--input={d}/a.jsonl", "--kind=chat"], r"a.jsonl:2: no field 'messages'"),
    ("a.jsonl", ["--input={d}/a.jsonl", "--format=xml"], r"argument --format: invalid choice"),
    ("a.jsonl", ["--input={d}/a.jsonl", "--out={d}"], r"already exists; pass --overwrite"),
    ("bad.jsonl", ["--input={d}/bad.jsonl"], r"bad.jsonl:3: not valid JSON"),
    ("a.txt", ["--input={d}/a.txt", "--kind=chat"], r"--kind=chat needs jsonl or parquet"),
])
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, make, args, match):
  if make:
    body = '\n{"text": "fine"}\n{"text": "ok"\n' if make == "bad.jsonl" else '\n{"text": "x"}\n'
    (tmp_path / make).write_text(body)
  argv = [a.format(d=tmp_path) for a in args]
  if not any(a.startswith("--out") for a in argv):
    argv.append(f"--out={tmp_path}/out")
  assert prepare.main(argv + ["--workers=1"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jmid: error: ") and "\n" not in err and "Traceback" not in err
  assert __import__("re").search(match, err), err
  assert not glob.glob(str(tmp_path / "out*"))  # no output, not even a temp dir


def test_failure_in_a_worker_mid_file_leaves_nothing(tmp_path):
  records = [{"text": t} for t in sentences(6000)]
  records[5000] = {"body": "the record that breaks it"}
  write_jsonl(str(tmp_path / "a.jsonl"), records)
  r = run_prepare(f"--input={tmp_path}/a.jsonl", f"--out={tmp_path}/out", "--workers=2")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith(f"jmid: error: {tmp_path}/a.jsonl:5001: "
                                                      "no field 'text'")
  assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]


def _marked(marker: str, cmd: str = "") -> list[int]:
  """Pids of processes whose environment carries `marker` (the prepare run and its workers)
  and whose command line contains `cmd`."""
  pids = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/environ", "rb") as f, open(f"/proc/{pid}/cmdline", "rb") as g:
        if marker.encode() in f.read() and cmd.encode() in g.read():
          pids.append(int(pid))
    except OSError:
      pass
  return pids


@pytest.mark.parametrize("sig,target", [(signal.SIGKILL, "parent"), (signal.SIGTERM, "parent"),
                                        (signal.SIGINT, "parent"), (signal.SIGKILL, "worker")])
def test_killed_mid_way_leaves_no_complete_directory(tmp_path, sig, target):
  """Input comes through a FIFO, so the run is provably mid-way (tokens written, more input
  pending) when the signal lands on prepare, or on one of its workers (the OOM killer)."""
  fifo = str(tmp_path / "stream.jsonl")
  os.mkfifo(fifo)
  out = tmp_path / "out"
  marker = f"JMID_TEST_{uuid.uuid4().hex}"
  scratch = tmp_path / "scratch"  # results in flight; a SIGKILLed run leaves them here
  scratch.mkdir()
  proc = subprocess.Popen([sys.executable, "-m", "jmid.data.prepare", f"--input={fifo}",
                           f"--out={out}", "--workers=2"], cwd=ROOT, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT, marker: "1",
                                          "TMPDIR": str(scratch)})
  stop = threading.Event()

  def feed() -> None:
    line = (json.dumps({"text": " ".join(sentences(20))}) + "\n").encode()
    try:
      with open(fifo, "wb") as f:
        while not stop.is_set():
          f.write(line * 64)
    except (BrokenPipeError, OSError):
      pass

  feeder = threading.Thread(target=feed, daemon=True)
  feeder.start()
  try:
    deadline = time.time() + 60
    while not any(os.path.getsize(p) for p in glob.glob(f"{out}.tmp-*/tokens.bin")):
      assert time.time() < deadline and proc.poll() is None, "prepare never got going"
      time.sleep(0.05)
    if target == "parent":
      proc.send_signal(sig)
    else:
      os.kill(_marked(marker, "spawn_main")[0], sig)
    _, err = proc.communicate(timeout=60)
  finally:
    stop.set()
    proc.kill()
    proc.wait()
  expect = {signal.SIGKILL: -9, signal.SIGTERM: 143, signal.SIGINT: 130}[sig]
  assert proc.returncode == (2 if target == "worker" else expect), err
  if target == "worker":
    assert err.strip().splitlines()[-1] == ("jmid: error: a worker process died (killed, or "
                                            "out of memory?); try fewer workers")
  assert not out.exists()
  leftovers = glob.glob(f"{out}.tmp-*")
  assert all(not os.path.exists(os.path.join(p, "meta.json")) for p in leftovers)
  if proc.returncode != -9:
    assert leftovers == [] and os.listdir(scratch) == []  # an error or a polite stop cleans up
  with pytest.raises(UserError):
    TokenFile(str(out))
  deadline = time.time() + 20  # orphaned workers notice the parent is gone and exit
  while _marked(marker) and time.time() < deadline:
    time.sleep(0.1)
  assert _marked(marker) == []
