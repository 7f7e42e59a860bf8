"""The embedding table left in the checkpoint file (qwen2vl.file_embedding): the same rows and logits as a table
read into memory, in every dtype; a tied lm_head gets its own copy; the table stays out of the process's memory."""

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qwen2vl import LLM, SamplingParams
from qwen2vl.file_embedding import FileEmbedding
from qwen2vl.loader import load_model
from tests.fixtures import write_checkpoint

ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fileemb")
    return {"tied": write_checkpoint(root / "tied", variant="tiny-hd32"),
            "untied": write_checkpoint(root / "untied", variant="tiny-untied", shards=2),
            "tied-bf16": write_checkpoint(root / "tied-bf16", variant="tiny-hd32", dtype="bfloat16", tokenizer=False)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["tied", "untied", "tied-bf16"])
def test_file_embedding_equals_the_table_in_memory(ckpts, name, dtype):
    m = load_model(str(ckpts[name]), dtype, prepack=False)
    ref = load_model(str(ckpts[name]), dtype, prepack=False, file_embedding=False)
    emb = m.model.embed_tokens
    assert isinstance(emb, FileEmbedding) and type(ref.model.embed_tokens) is torch.nn.Embedding
    assert emb.stored == (torch.bfloat16 if name == "tied-bf16" else torch.float32)
    assert not list(emb.parameters()) and not list(emb.buffers())
    every = torch.arange(emb.num_embeddings)
    rows = emb(every)
    assert rows.dtype == dtype and torch.equal(rows, ref.model.embed_tokens(every))
    ids = torch.tensor([[5, 7, 5], [9, 151000, 7]])  # repeats, any shape
    assert torch.equal(emb(ids), ref.model.embed_tokens(ids))
    assert torch.equal(m.lm_head.weight, ref.lm_head.weight)  # a tied head: its own copy of the table
    ids = torch.arange(1000, 1030)
    assert torch.equal(m(ids), ref(ids))


def test_bad_ids_and_copies(ckpts):
    emb = load_model(str(ckpts["tied"]), prepack=False).model.embed_tokens
    for bad in ([-1], [emb.num_embeddings]):
        with pytest.raises(IndexError):
            emb(torch.tensor(bad))
    assert emb(torch.tensor([], dtype=torch.long)).shape == (0, emb.embedding_dim)
    twin = copy.deepcopy(emb)  # reopens the file
    ids = torch.tensor([3, 151935])
    assert torch.equal(twin(ids), emb(ids))


def test_llm_generates_the_same_tokens(ckpts):
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = [LLM(str(ckpts["tied"]), prefix_cache_mb=0, **kw).chat([msgs, msgs[:1]], p)
            for kw in ({}, {"file_embedding": False})]
    assert [o.outputs[0].token_ids for o in outs[0]] == [o.outputs[0].token_ids for o in outs[1]]


def test_the_table_stays_out_of_memory(ckpts):
    """Loading grows the process by the weights it holds, not by the table (39 MB here, more than the rest of this
    model); looking rows up brings in only those rows. Measured in a fresh process."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        from qwen2vl.loader import load_model
        def rss():
            return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
        load_model({str(ckpts["tied"])!r})  # warm up the allocator and kernels
        base = rss()
        m = load_model({str(ckpts["untied"])!r})
        held = sum(t.numel() * t.element_size() for t in {{id(t): t for t in [*m.parameters(), *m.buffers()]}}.values())
        loaded = rss() - base
        for _ in range(3):
            m.model.embed_tokens(torch.arange(0, 152064, 1000))
        emb = m.model.embed_tokens
        print(held, loaded, rss() - base - loaded, emb.num_embeddings * emb.row_bytes)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    held, loaded, looked_up, table = map(int, out.split())
    assert table > held / 2
    assert loaded < held + table / 4, (held, loaded, table)
    assert looked_up < 4 << 20, looked_up  # 153 rows of 256 bytes
