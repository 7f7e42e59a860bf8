"""Float linears prepacked for oneDNN (qwen2vl.packed): same results as nn.Linear up to summation order, no extra
memory, and a lm_head that shares its matrix with the embedding left alone."""

import pytest
import torch

from qwen2vl import packed
from qwen2vl.loader import load_model
from qwen2vl.packed import PackedLinear
from tests.fixtures import write_checkpoint

needs_packing = pytest.mark.skipif(not packed.supported(torch.float32), reason="no oneDNN linear in this torch")


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@needs_packing
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_linear(dtype, tol, rows, bias):
    if not packed.supported(dtype):
        pytest.skip(f"no oneDNN {dtype} linear on this CPU")
    torch.manual_seed(0)
    lin = torch.nn.Linear(160, 96, bias=bias).to(dtype)
    x = torch.randn(2, rows, 160).to(dtype)
    p = PackedLinear(lin)
    y = p(x)
    assert y.shape == (2, rows, 96) and y.dtype == dtype
    assert _rel(y, lin(x)) < tol
    assert not any(t is lin.weight for t in p.buffers())  # the plain weight is not kept


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    return {v: write_checkpoint(root / v, variant=v) for v in ("tiny-hd32", "tiny-untied")}


@needs_packing
@pytest.mark.parametrize("variant", ["tiny-hd32", "tiny-untied"])
def test_prepacked_model_matches_plain(ckpts, variant):
    """Loading prepacks every float linear, lm_head included (the embedding stays in the file, so a tied head
    has a matrix of its own); logits agree with the plain model to float32 rounding, and the model holds no
    more bytes than before."""
    plain = load_model(str(ckpts[variant]), prepack=False)
    model = load_model(str(ckpts[variant]))
    linears = [m for m in plain.modules() if type(m) is torch.nn.Linear]
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == len(linears)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, PackedLinear)

    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in [*m.parameters(), *m.buffers()]}.values())
    assert nbytes(model) == nbytes(plain)
    ids = torch.arange(1000, 1040)
    with torch.no_grad():
        assert _rel(model(ids), plain(ids)) < 1e-5


@needs_packing
def test_prepack_leaves_a_shared_head_alone(ckpts):
    """With the embedding held in memory, a tied lm_head shares its plain matrix, so it is not packed."""
    model = load_model(str(ckpts["tiny-hd32"]), file_embedding=False)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].mlp.down_proj, PackedLinear)
