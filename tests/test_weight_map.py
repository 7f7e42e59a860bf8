"""Weights read through a memory map of the checkpoint (qwen2vl.weight_map) and the load cache's dropped pages
(load_cache.drop_unkept): the values are the file's, the layers built from them are those a plain read builds, and
no mapped page of the checkpoint or of an int8 matrix the kernels repacked stays in the process after a load,
except the file's pages that bf16 layers on the package's kernel keep as their weight, while they live."""

import gc
import os

import pytest
import torch

from qwen2vl import loader
from qwen2vl.loader import load_model
from qwen2vl.packed import PackedLinear
from qwen2vl.weight_map import WeightMaps

IDS = torch.arange(1000, 1020)


def _mapped_rss(file: str) -> int | None:
    """Resident bytes of this process's maps of ``file`` (None: not mapped at all)."""
    total, inside = None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's first line
                inside = line.rstrip().endswith(os.path.basename(str(file)))
                if inside and total is None:
                    total = 0
            elif inside and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")


def test_a_view_reads_the_file_and_reads_it_again_after_its_pages_are_dropped(tmp_path):
    data = torch.arange(3 * 4096, dtype=torch.int32)
    path = tmp_path / "blob"
    path.write_bytes(b"\0" * 100 + data.numpy().tobytes())
    maps = WeightMaps()
    with open(path, "rb") as f:
        t, span = maps.view(f, 100, 100 + data.numel() * 4, torch.int32, (3, 4096))
        assert torch.equal(t.view(-1), data)
        assert _mapped_rss(path) >= 8192  # the pages just read are in the process
        maps.drop([span])
        assert _mapped_rss(path) <= 4096 * 2  # at most the two partial pages at the ends stay
        assert torch.equal(t.view(-1), data)  # read from the file again
    del t, span  # the span holds the map too
    maps.close()
    assert _mapped_rss(path) is None


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
@pytest.mark.parametrize("threads", [False, True])
def test_a_mapped_load_is_the_read_load_and_leaves_no_map(checkpoint_factory, monkeypatch, quantization, threads):
    # stored in bf16 as loaded (a cast is read); the 2B's vocabulary: a 19 MB tied lm_head, mapped
    ckpt = str(checkpoint_factory(variant="tiny", dtype=torch.bfloat16))
    monkeypatch.setattr(loader, "_pack_in_background", lambda: threads)
    monkeypatch.setattr(loader, "_pack_workers", lambda: 2)
    views = []
    view = WeightMaps.view
    monkeypatch.setattr(WeightMaps, "view", lambda *a: views.append(view(*a)) or views[-1])
    mapped = load_model(ckpt, torch.bfloat16, quantization=quantization)
    assert len([v for v in views if v is not None]) > 20  # every linear's weight
    views.clear()
    file = os.path.join(ckpt, "model.safetensors")
    kept = [m.weight for m in mapped.modules() if isinstance(m, PackedLinear) and m.kernel]  # bf16 on the
    # package's kernel: whole (unfused) weights stay views of the file, the fused ones are copies
    if kept:
        assert quantization is None and _mapped_rss(file) is not None  # mapped while the model lives
        del mapped, kept
        gc.collect()
    assert _mapped_rss(file) is None
    monkeypatch.setattr(loader._Reader, "_mappable", lambda *a: False)
    read = load_model(ckpt, torch.bfloat16, quantization=quantization)
    mapped = load_model(ckpt, torch.bfloat16, quantization=quantization)
    assert [type(m) for m in mapped.modules()] == [type(m) for m in read.modules()]
    assert torch.equal(mapped(IDS), read(IDS))


def test_a_cached_int8_load_keeps_no_page_of_the_matrices_it_repacked(checkpoint_factory, monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN2VL_CACHE", str(tmp_path / "cache"))
    ckpt = str(checkpoint_factory(variant="tiny"))
    fresh = load_model(ckpt, torch.bfloat16, quantization="int8", cache=True)  # writes the entry
    cached = load_model(ckpt, torch.bfloat16, quantization="int8", cache=True)
    if not cached.lm_head.prepacked:
        pytest.skip("no int8 kernel layout here: the matrices are kept as they are")
    (entry,) = os.listdir(tmp_path / "cache")
    q_bytes = cached.lm_head.out_features * cached.lm_head.in_features  # 9.7 MB, read to be repacked
    assert _mapped_rss(tmp_path / "cache" / entry) < q_bytes // 4
    assert torch.equal(cached(IDS), fresh(IDS))


def test_a_file_that_cannot_be_mapped_is_read(checkpoint_factory, monkeypatch):
    import mmap

    from qwen2vl import weight_map
    ckpt = str(checkpoint_factory(variant="tiny", dtype=torch.bfloat16))
    read = load_model(ckpt, torch.bfloat16)

    tried = []

    def refuse(*a, **k):
        tried.append(a)
        raise OSError("no mmap on this file system")

    monkeypatch.setattr(weight_map.mmap, "mmap", refuse)
    unmapped = load_model(ckpt, torch.bfloat16)
    monkeypatch.setattr(weight_map.mmap, "mmap", mmap.mmap)
    assert len(tried) == 1  # once per file, then every tensor is read
    assert torch.equal(unmapped(IDS), read(IDS))
