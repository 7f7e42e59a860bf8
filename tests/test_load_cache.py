"""The load cache (qwen2vl.load_cache): a load from an entry is the model a fresh load builds, bit for bit, without
quantizing; entries are memory-mapped, keyed by checkpoint and setting, rebuilt when they do not match, and a cache
that cannot be written never fails a load. ``qwen2vl quantize`` builds an entry ahead of time."""

import os
import warnings

import pytest
import torch

from qwen2vl import LLM, load_cache, quant
from qwen2vl.cli import main
from qwen2vl.loader import load_model
from qwen2vl.quant import Int4Linear, Int8Embedding, Int8Linear
from tests.fixtures import write_checkpoint, write_prequantized_checkpoint

IDS = torch.arange(1000, 1020)


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory):
    return checkpoint_factory(variant="tiny-hd32")


@pytest.fixture
def root(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("QWEN2VL_CACHE", str(d))
    return d


def _entries(root) -> list[str]:
    return sorted(os.listdir(root)) if root.exists() else []


def _no_quantizing(monkeypatch):
    """From here on, quantizing a float weight fails the test: a load must come from the cache."""
    def boom(*a, **k):
        raise AssertionError("quantized a weight the cache holds")
    monkeypatch.setattr(quant, "int8_rows", boom)
    monkeypatch.setattr(Int4Linear, "__init__", boom)
    monkeypatch.setattr(Int4Linear, "from_int4", boom)


def _same_modules(a, b) -> None:
    for (name, x), y in zip(a.named_modules(), b.modules()):
        assert type(x) is type(y), name
        if isinstance(x, (Int4Linear, Int8Embedding)) or (isinstance(x, Int8Linear) and not x.prepacked):
            for t, u in zip(x.state_dict().values(), y.state_dict().values()):
                assert t.dtype == u.dtype and torch.equal(t, u), name
        if isinstance(x, Int8Linear):
            assert x.layout == y.layout and torch.equal(x.scales, y.scales), name


def _mapped(t: torch.Tensor, file: str) -> bool:
    """Whether ``t``'s memory lies in a memory map of ``file``."""
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(os.path.basename(file)):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= ptr < hi:
                    return True
    return False


@pytest.mark.parametrize("quantization, dtype, variant, file_embedding", [
    ("int8", torch.bfloat16, "tiny-hd32", True), ("int4", torch.bfloat16, "tiny-hd32", True),
    ("int8", torch.float32, "tiny-untied", True), ("int4", torch.float32, "tiny-untied", True),
    ("int8", torch.bfloat16, "tiny-hd32", False),  # the tied lm_head shares the int8 embedding's matrix
    ("int4", torch.bfloat16, "tiny-untied", False)])
def test_a_cached_load_is_the_fresh_load_bit_for_bit(checkpoint_factory, root, monkeypatch, quantization, dtype,
                                                     variant, file_embedding):
    ck = str(checkpoint_factory(variant=variant))
    kw = dict(quantization=quantization, file_embedding=file_embedding)
    fresh = load_model(ck, dtype, **kw)
    first = load_model(ck, dtype, cache=True, **kw)  # builds and writes the entry
    (entry,) = _entries(root)
    _no_quantizing(monkeypatch)
    cached = load_model(ck, dtype, cache=True, **kw)
    for m in (first, cached):
        _same_modules(fresh, m)
        assert torch.equal(m(IDS), fresh(IDS))
    if not file_embedding and variant == "tiny-hd32":  # tied
        assert cached.model.embed_tokens.weight is cached.lm_head.weight
    if quantization == "int4" and os.path.exists("/proc/self/maps"):  # zero-copy: the kernels read the file's pages
        assert _mapped(cached.model.layers[0].mlp.down_proj.weight, entry)
    assert _entries(root) == [entry]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_loads_write_no_entry(ckpt, root, dtype):
    """Float layers are read from the checkpoint (prepacking is oneDNN's opaque layout, redone): nothing to keep."""
    a = load_model(str(ckpt), dtype, cache=True)
    assert _entries(root) == []
    assert torch.equal(a(IDS), load_model(str(ckpt), dtype)(IDS))


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("quantization", [None, "int4"])
def test_prequantized_checkpoints_come_back_bit_for_bit(tmp_path, root, monkeypatch, method, quantization):
    q, _ = write_prequantized_checkpoint(tmp_path / "q", tmp_path / "ref", method=method)
    fresh = load_model(str(q), torch.bfloat16, quantization=quantization)
    load_model(str(q), torch.bfloat16, quantization=quantization, cache=True)
    assert len(_entries(root)) == 1
    _no_quantizing(monkeypatch)
    cached = load_model(str(q), torch.bfloat16, quantization=quantization, cache=True)
    _same_modules(fresh, cached)
    assert torch.equal(cached(IDS), fresh(IDS))


def _entry_file(root) -> str:
    (name,) = _entries(root)
    return str(root / name)


@pytest.mark.parametrize("damage", ["truncate", "header", "foreign"])
def test_a_damaged_or_foreign_entry_is_rebuilt_never_used(checkpoint_factory, root, damage):
    ck = str(checkpoint_factory(variant="tiny-hd32"))
    fresh = load_model(ck, torch.bfloat16, quantization="int4", cache=True)
    file = _entry_file(root)
    if damage == "truncate":
        os.truncate(file, os.path.getsize(file) - 100)
    elif damage == "header":
        with open(file, "r+b") as f:
            f.seek(20)
            f.write(b"\x00garbage")
    else:  # another setting's complete entry under this one's name
        load_model(ck, torch.bfloat16, quantization="int8", cache=True)
        other = next(str(root / n) for n in _entries(root) if str(root / n) != file)
        os.replace(other, file)
    with pytest.warns(UserWarning, match="ignoring the load cache entry"):
        again = load_model(ck, torch.bfloat16, quantization="int4", cache=True)
    assert torch.equal(again(IDS), fresh(IDS))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="qwen2vl")  # rebuilt: the next load uses it quietly
        assert torch.equal(load_model(ck, torch.bfloat16, quantization="int4", cache=True)(IDS), fresh(IDS))


def test_a_changed_checkpoint_replaces_its_entry_and_settings_get_their_own(tmp_path, root):
    ck = str(write_checkpoint(tmp_path / "ck", variant="tiny-hd32"))
    load_model(ck, torch.bfloat16, quantization="int4", cache=True)
    old = _entries(root)
    load_model(ck, torch.float32, quantization="int4", cache=True)
    assert len(_entries(root)) == 2  # another dtype: another entry beside it
    write_checkpoint(tmp_path / "ck", variant="tiny-hd32", seed=1)  # new weights in place
    changed = load_model(ck, torch.bfloat16, quantization="int4", cache=True)
    now = _entries(root)
    assert len(now) == 2 and old[0] not in now  # the stale entry is gone, not used
    assert torch.equal(changed(IDS), load_model(ck, torch.bfloat16, quantization="int4")(IDS))


def test_a_cache_that_cannot_be_written_never_fails_the_load(ckpt, root, monkeypatch):
    def full(self, name, t):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(load_cache.EntryWriter, "_write", full)
    with pytest.warns(UserWarning, match="could not write the load cache entry"):
        m = load_model(str(ckpt), torch.bfloat16, quantization="int8", cache=True)
    assert _entries(root) == []  # no entry, no temporary file left
    assert torch.equal(m(IDS), load_model(str(ckpt), torch.bfloat16, quantization="int8")(IDS))


def test_a_killed_writers_temporary_file_is_removed_later(ckpt, root):
    load_model(str(ckpt), torch.bfloat16, quantization="int8", cache=True)
    entry = _entry_file(root)
    os.remove(entry)
    old, fresh = entry + ".tmp-1-deadbeef", entry + ".tmp-2-cafef00d"
    for f in (old, fresh):
        open(f, "wb").close()
    os.utime(old, (0, 0))  # untouched for ages: its writer is gone
    load_model(str(ckpt), torch.bfloat16, quantization="int8", cache=True)
    assert not os.path.exists(old) and os.path.exists(fresh) and os.path.exists(entry)


def test_a_failed_load_leaves_no_file(tmp_path, root):
    ck = write_checkpoint(tmp_path / "ck", variant="tiny-hd32")
    os.truncate(ck / "model.safetensors", os.path.getsize(ck / "model.safetensors") - 1000)
    with pytest.raises(Exception):
        load_model(str(ck), torch.bfloat16, quantization="int8", cache=True)
    assert _entries(root) == []


def test_quantize_command_builds_the_entry_llm_then_loads(ckpt, root, monkeypatch, capsys):
    assert main(["quantize", "--model", str(ckpt), "--quantization", "int4", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert _entry_file(root) in out and "built in" in out
    assert main(["quantize", "--model", str(ckpt), "--quantization", "int4", "--dtype", "bfloat16"]) == 0
    assert "already cached" in capsys.readouterr().out
    _no_quantizing(monkeypatch)
    llm = LLM(str(ckpt), dtype="bfloat16", quantization="int4")  # the cache is on by default
    assert isinstance(llm.model.model.layers[0].mlp.down_proj, Int4Linear)
    assert main(["quantize", "--model", str(ckpt), "--quantization", "int3"]) == 1


def test_load_cache_off_writes_nothing(ckpt, root):
    LLM(str(ckpt), dtype="bfloat16", quantization="int8", load_cache=False)
    assert _entries(root) == []
