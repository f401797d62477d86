"""Tokenizers and every source format: real text through a real (tiny) BPE and back."""

from __future__ import annotations

import glob
import json
import os
import pickle

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jmid.config import SourceConfig
from jmid.errors import UserError
from jmid.data.chat import render_chat
from jmid.data.formats import write_arrayrecord
from jmid.data.sources import open_source
from jmid.data.tokenfile import TokenFile, write_token_file
from jmid.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from tests.bpe import sentences, train_bpe

EOT = "<|endoftext|>"
CHATS = [[{"role": "user", "content": f"What is {i} + {i}?"},
          {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}] for i in range(6)]


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory) -> str:
  return train_bpe(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture(scope="module")
def bpe(bpe_path) -> Tokenizer:
  return load_tokenizer(bpe_path)


@pytest.fixture(scope="module")
def texts() -> list[str]:
  docs = sentences(40, seed=1)
  docs[3] = "über 数学 café\n\n  two  spaces, a tab\tand an emoji 🙂"
  docs[5] = f"a literal {EOT} inside a document stays text"
  return docs


def check_text_source(src, tok: Tokenizer, texts: list[str]) -> None:
  assert len(src) == len(texts)
  for i, text in enumerate(texts):
    doc = src[i]
    assert doc["tokens"].dtype == np.int32 and doc["mask"].dtype == np.int32
    assert doc["tokens"][-1] == tok.eos_id and (doc["tokens"] == tok.eos_id).sum() == 1
    assert (doc["mask"] == 1).all() and len(doc["mask"]) == len(doc["tokens"])
    assert tok.decode(doc["tokens"]) == text + (EOT if isinstance(tok, HFTokenizer) else "")
    assert src.num_bytes(i) == len(text.encode("utf-8"))


def flat_tokens(tok: Tokenizer, texts: list[str], dtype: str) -> np.ndarray:
  return np.concatenate([np.append(tok.encode(t), tok.eos_id) for t in texts]).astype(dtype)


# Tokenizers ------------------------------------------------------------------------------------

def test_hf_tokenizer_interface(bpe, bpe_path):
  assert isinstance(bpe, HFTokenizer) and isinstance(bpe, Tokenizer)
  assert bpe.vocab_size == 300 and bpe.eos_id == bpe.token_to_id(EOT) == 0 and bpe.bos_id is None
  assert bpe.token_to_id("<|im_end|>") == 2 and bpe.token_to_id("no such token") is None
  ids = bpe.encode(f"über {EOT}")
  assert ids.dtype == np.int32 and bpe.eos_id not in ids  # special text stays text
  assert bpe.decode(ids) == f"über {EOT}"
  assert bpe.decode([*bpe.encode("hi"), bpe.eos_id]) == "hi" + EOT
  assert bpe.decode([*bpe.encode("hi"), bpe.eos_id], skip_special=True) == "hi"
  again = pickle.loads(pickle.dumps(bpe))
  assert again.encode(f"über {EOT}").tolist() == ids.tolist()
  assert [a.tolist() for a in bpe.encode_batch(["a cat", "dog"])] == [
      bpe.encode("a cat").tolist(), bpe.encode("dog").tolist()]
  assert load_tokenizer(os.path.dirname(bpe_path)).vocab_size == 300  # a model folder works
  assert isinstance(load_tokenizer("byte"), ByteTokenizer) and ByteTokenizer().eos_id == 256


def test_bad_tokenizers_are_user_errors(tmp_path):
  with pytest.raises(UserError, match=r"data.tokenizer='nope.json': no such file"):
    load_tokenizer("nope.json")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(UserError, match="not a valid tokenizer.json"):
    load_tokenizer(str(bad))
  no_eos = train_bpe(str(tmp_path / "noeos.json"), specials=["<pad>"])
  with pytest.raises(UserError, match="has no EOS token"):
    load_tokenizer(no_eos)


# Flat token arrays -----------------------------------------------------------------------------

def test_npy_source_carries_text_through_bpe(tmp_path, bpe, texts):
  arr = flat_tokens(bpe, texts, "uint16")
  tail = bpe.encode("a last document without EOS")
  np.save(tmp_path / "part-0.npy", np.concatenate([arr, tail]).astype(np.uint16))
  src = open_source("web", SourceConfig(path=str(tmp_path / "part-0.npy"), format="npy"), bpe)
  check_text_source(src, bpe, texts + ["a last document without EOS"])
  assert src.max_token_id() == int(np.concatenate([arr, tail]).max())
  again = pickle.loads(pickle.dumps(src))
  assert again._arrays == [None] and again[7]["tokens"].tolist() == src[7]["tokens"].tolist()


def test_bin_uint32_glob_and_custom_eos(tmp_path, texts):
  tok = ByteTokenizer()
  eos = 1000  # an EOS the file uses that is not the tokenizer's: docs still end with the file's
  parts = [texts[:15], texts[15:]]
  for k, part in enumerate(parts):
    body = [np.append(tok.encode(t), eos) for t in part]
    np.concatenate(body).astype(np.uint32).tofile(tmp_path / f"shard-{k}.bin")

  class Wide(ByteTokenizer):
    vocab_size = 1001

  spec = SourceConfig(path=str(tmp_path / "shard-*.bin"), format="bin", dtype="uint32", eos_id=eos)
  src = open_source("web", spec, Wide())
  assert len(src) == len(texts)
  for i, t in enumerate(texts):
    assert src[i]["tokens"][-1] == eos and tok.decode(src[i]["tokens"]) == t
  assert src.max_token_id() == eos
  with pytest.raises(UserError, match=r"looks like 32-bit tokens; set data.sources.web.dtype="):
    open_source("web", SourceConfig(path=spec.path, format="bin", dtype="uint16"), Wide())
  narrow = flat_tokens(tok, texts, "uint16")
  narrow[:len(narrow) // 2 * 2].tofile(tmp_path / "narrow.bin")  # a whole number of uint32s
  with pytest.raises(UserError, match=r"narrow.bin holds token id \d+, outside the "
                     r"tokenizer's 258 ids; check data.sources.web.dtype"):
    open_source("web", SourceConfig(path=str(tmp_path / "narrow.bin"), format="bin",
                                    dtype="uint32"), tok)


def test_flat_source_errors(tmp_path, bpe):
  np.arange(10, dtype=np.uint16).tofile(tmp_path / "raw.npy")  # Dolma-style: no header
  with pytest.raises(UserError, match=r"no .npy header.*data.sources.web.format='bin'"):
    open_source("web", SourceConfig(path=str(tmp_path / "raw.npy"), format="npy"), bpe)
  (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
  with pytest.raises(UserError, match=r"not a whole number of uint16 tokens; fix "
                     r"data.sources.web.dtype"):
    open_source("web", SourceConfig(path=str(tmp_path / "odd.bin"), format="bin"), bpe)
  np.save(tmp_path / "f.npy", np.zeros((2, 2), np.float32))
  with pytest.raises(UserError, match="expected a 1-D integer token array"):
    open_source("web", SourceConfig(path=str(tmp_path / "f.npy"), format="npy"), bpe)
  (tmp_path / "empty.bin").write_bytes(b"")
  with pytest.raises(UserError, match="no documents"):
    open_source("web", SourceConfig(path=str(tmp_path / "empty.bin"), format="bin"), bpe)


# Text formats, tokenized on the fly ------------------------------------------------------------

def test_parquet_source_row_groups_glob_and_pickle(tmp_path, bpe, texts):
  for k, part in enumerate([texts[:25], texts[25:]]):
    table = pa.table({"id": list(range(len(part))), "body": part})
    pq.write_table(table, tmp_path / f"p{k}.parquet", row_group_size=4)
  spec = SourceConfig(path=str(tmp_path / "p*.parquet"), format="parquet", field="body")
  src = open_source("books", spec, bpe)
  check_text_source(src, bpe, texts)
  assert src.max_token_id() == bpe.vocab_size - 1
  again = pickle.loads(pickle.dumps(src))
  assert [again[i]["tokens"].tolist() for i in (30, 0)] == [src[i]["tokens"].tolist()
                                                            for i in (30, 0)]
  lengths = grain.MapDataset.source(again).map(lambda d: len(d["tokens"]))
  assert list(lengths) == [len(src[i]["tokens"]) for i in range(len(src))]
  with pytest.raises(UserError, match=r"p0.parquet: no column 'text' \(columns: id, body\)"):
    open_source("books", SourceConfig(path=spec.path, format="parquet"), bpe)
  with pytest.raises(UserError, match="column 'id' has type int64, but kind 'text' needs"):
    open_source("books", SourceConfig(path=spec.path, format="parquet", field="id"), bpe)


def test_jsonl_source_text_and_errors(tmp_path, bpe, texts):
  path = tmp_path / "docs.jsonl"
  lines = [json.dumps({"text": t, "meta": i}) for i, t in enumerate(texts)]
  path.write_text("\n".join(lines[:10]) + "\n\n\r\n" + "\n".join(lines[10:]))  # no final \n
  src = open_source("web", SourceConfig(path=str(tmp_path), format="jsonl"), bpe)  # a directory
  check_text_source(src, bpe, texts)
  assert pickle.loads(pickle.dumps(src))[39]["tokens"].tolist() == src[39]["tokens"].tolist()
  bad = tmp_path / "bad" / "x.jsonl"
  bad.parent.mkdir()
  bad.write_text('{"text": "ok"}\n\n{"body": "no text field"}\n{"text": 5}\n{oops\n')
  src = open_source("web", SourceConfig(path=str(bad), format="jsonl"), bpe)
  assert len(src) == 4 and bpe.decode(src[0]["tokens"]) == "ok" + EOT
  with pytest.raises(UserError, match=rf"{bad}:3: no field 'text' \(fields: body\)"):
    src[1]
  with pytest.raises(UserError, match=rf"{bad}:4: field 'text' is int, expected a string"):
    src[2]
  with pytest.raises(UserError, match=rf"{bad}:5: not valid JSON"):
    src.num_bytes(3)
  with pytest.raises(UserError, match=rf"{bad}:1: no field 'content'"):  # checked at open
    open_source("web", SourceConfig(path=str(bad), format="jsonl", field="content"), bpe)


def test_jsonl_chat_source_masks(tmp_path, bpe):
  path = tmp_path / "chat.jsonl"
  path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
  src = open_source("sft", SourceConfig(path=str(path), format="jsonl", kind="chat"), bpe)
  assert len(src) == len(CHATS)
  for i, convo in enumerate(CHATS):
    tokens, mask = render_chat(convo, bpe)
    assert src[i]["tokens"].tolist() == tokens.tolist() and src[i]["mask"].tolist() == mask.tolist()
    assert bpe.decode(src[i]["tokens"][src[i]["mask"] == 1]) == (
        convo[1]["content"] + "<|im_end|>" + EOT)
    assert src.num_bytes(i) == len(bpe.decode(tokens, skip_special=True).encode())
  path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
  with pytest.raises(UserError, match=rf"{path}:1: field 'messages': the conversation has no "
                     "assistant message"):
    open_source("sft", SourceConfig(path=str(path), format="jsonl", kind="chat"), bpe)


# ArrayRecord and token files -------------------------------------------------------------------

def test_arrayrecord_round_trip(tmp_path, bpe, texts):
  docs = [bpe.encode(t) for t in texts]
  docs[0] = np.append(docs[0], bpe.eos_id)  # a stored EOS is not doubled
  assert write_arrayrecord(str(tmp_path / "a-0.arrayrecord"), docs[:20]) == 20
  write_arrayrecord(str(tmp_path / "a-1.arrayrecord"), docs[20:])
  spec = SourceConfig(path=str(tmp_path / "a-*.arrayrecord"), format="arrayrecord")
  src = pickle.loads(pickle.dumps(open_source("ar", spec, bpe)))
  check_text_source(src, bpe, texts)
  write_arrayrecord(str(tmp_path / "wide.arrayrecord"), [[1, 2, 5000]])
  src = open_source("ar", SourceConfig(path=str(tmp_path / "wide.arrayrecord"),
                                       format="arrayrecord"), bpe)
  with pytest.raises(UserError, match="record 0 holds token id 5000"):
    src[0]


def test_token_file_masks_round_trip_and_old_files_still_load(tmp_path):
  docs = [(np.array([5, 6, 7]), np.array([0, 1, 1])), (np.array([], np.int64), np.array([])),
          ([9], [1])]
  meta = write_token_file(str(tmp_path / "m"), iter(docs), 258, extra_meta={"kind": "chat"})
  assert meta["has_mask"] and meta["max_token_id"] == 9 and meta["kind"] == "chat"
  tf = TokenFile(str(tmp_path / "m"))
  assert os.path.getsize(tmp_path / "m" / "mask.bin") == 4
  assert [tf.mask(i).tolist() for i in range(3)] == [[0, 1, 1], [], [1]]
  assert pickle.loads(pickle.dumps(tf)).mask(-1).tolist() == [1]
  for bad, match in (([(np.array([1]), np.array([2]))], "0 or 1"),
                     ([(np.array([1, 2]), np.array([1]))], "must be 2 values"),
                     ([(np.array([1]), np.array([1])), [2]], "masks go with every document")):
    with pytest.raises(UserError, match=match):
      write_token_file(str(tmp_path / "bad"), bad, 258)
    assert not glob.glob(str(tmp_path / "bad*"))
  # A file from before masks: no has_mask / max_token_id in meta.json.
  write_token_file(str(tmp_path / "old"), [[1, 2], [300]], 1000)
  meta_path = tmp_path / "old" / "meta.json"
  old = {k: v for k, v in json.loads(meta_path.read_text()).items()
         if k not in ("has_mask", "max_token_id")}
  meta_path.write_text(json.dumps(old))
  tf = TokenFile(str(tmp_path / "old"))
  assert tf.mask(0) is None and tf.max_token_id() == 300 and tf[1].tolist() == [300]
  os.truncate(tmp_path / "m" / "mask.bin", 2)
  with pytest.raises(UserError, match=r"mask.bin is 2 bytes but meta.json promises a mask of 4"):
    TokenFile(str(tmp_path / "m"))


def test_token_file_sources_text_chat_and_errors(tmp_path, bpe, texts):
  meta = {"eos_id": bpe.eos_id, "tokenizer": "tiny-bpe"}
  for k, part in enumerate([texts[:9], texts[9:]]):
    write_token_file(str(tmp_path / f"t-{k}"), [np.append(bpe.encode(t), 0) for t in part],
                     bpe.vocab_size, extra_meta=meta)
  src = open_source("tf", SourceConfig(path=str(tmp_path / "t-*")), bpe)
  check_text_source(src, bpe, texts)
  assert src.max_token_id() == max(int(src[i]["tokens"].max()) for i in range(len(src)))
  # A hand-written file is served as stored (no EOS added, ids checked only against the model).
  write_token_file(str(tmp_path / "raw"), [[5000, 5001]], 10_000)
  raw = open_source("raw", SourceConfig(path=str(tmp_path / "raw")), bpe)
  assert raw[0]["tokens"].tolist() == [5000, 5001] and raw.max_token_id() == 5001
  write_token_file(str(tmp_path / "wide"), [[5000, 0]], 10_000, extra_meta=meta)
  with pytest.raises(UserError, match=r"wide holds token id 5000 but data.tokenizer has 300 ids"):
    open_source("wide", SourceConfig(path=str(tmp_path / "wide")), bpe)
  write_token_file(str(tmp_path / "chat"), [render_chat(c, bpe) for c in CHATS], bpe.vocab_size)
  chat = open_source("c", SourceConfig(path=str(tmp_path / "chat"), kind="chat"), bpe)
  assert chat[2]["mask"].tolist() == render_chat(CHATS[2], bpe)[1].tolist()
  with pytest.raises(UserError, match=r"has a loss mask\); set data.sources.c.kind='chat'"):
    open_source("c", SourceConfig(path=str(tmp_path / "chat")), bpe)
  with pytest.raises(UserError, match="has no loss mask, so kind='chat'"):
    open_source("tf", SourceConfig(path=str(tmp_path / "t-0"), kind="chat"), bpe)
  with pytest.raises(UserError, match=r"prepared with EOS id 0 \(tokenizer tiny-bpe\) but "
                     "data.tokenizer's EOS is 256"):
    open_source("tf", SourceConfig(path=str(tmp_path / "t-0")), ByteTokenizer())
  with pytest.raises(UserError, match=r"^data.sources.tf.eval_path='.*/nope': no file matches"):
    open_source("tf", SourceConfig(path=str(tmp_path / "t-0"), eval_path=str(tmp_path / "nope")),
                bpe, eval=True)
  (tmp_path / "half").mkdir()  # an interrupted write: no meta.json
  with pytest.raises(UserError, match=r"^data.sources.tf.path: .*half/meta.json is missing"):
    open_source("tf", SourceConfig(path=str(tmp_path / "half")), bpe)
  ev = open_source("tf", SourceConfig(path="unused", eval_path=str(tmp_path / "t-1")), bpe,
                   eval=True)
  assert len(ev) == len(texts) - 9


def test_path_and_format_errors_name_the_key(tmp_path, bpe):
  with pytest.raises(UserError, match=r"^data.sources.web.path='.*/nothing-\*.jsonl': no file "
                     "matches"):
    open_source("web", SourceConfig(path=str(tmp_path / "nothing-*.jsonl"), format="jsonl"), bpe)
  (tmp_path / "e.jsonl").write_text("\n\n")
  with pytest.raises(UserError, match="no documents"):
    open_source("web", SourceConfig(path=str(tmp_path / "e.jsonl"), format="jsonl"), bpe)
  with pytest.raises(UserError, match=r"data.sources.web.format='csv': unknown"):
    open_source("web", SourceConfig(path=str(tmp_path), format="csv"), bpe)
  with pytest.raises(UserError, match="kind='chat' needs a loss mask"):
    open_source("web", SourceConfig(path=str(tmp_path), format="npy", kind="chat"), bpe)
  with pytest.raises(UserError, match=r"directory .* holds no \*.parquet file"):
    open_source("web", SourceConfig(path=str(tmp_path), format="parquet"), bpe)
