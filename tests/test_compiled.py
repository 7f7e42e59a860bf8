"""Decode steps through torch.compile (qwen2vl.compiled): the same tokens as the eager steps, the opaque packed
weights kept out of the graph, and a model that cannot compile left eager."""

import pytest
import torch

from qwen2vl import LLM, SamplingParams, compiled
from qwen2vl.language import KVView

pytestmark = pytest.mark.skipif(not hasattr(torch.library, "custom_op"), reason="torch without custom ops")

CONVS = [[{"role": "user", "content": "Why is the sky blue? Explain in detail."}],
         [{"role": "user", "content": "Hi"}]]


@pytest.fixture(scope="module")
def ckpt(checkpoint_factory):
    return checkpoint_factory(variant="tiny-hd32", num_hidden_layers=3)


@pytest.mark.parametrize("dtype,quantization", [("float32", None), ("bfloat16", "int8")])
def test_compiled_decode_gives_the_eager_tokens(ckpt, dtype, quantization):
    kw = dict(dtype=dtype, device="cpu", quantization=quantization, prefix_cache_mb=0)
    eager = LLM(str(ckpt), **kw)
    llm = LLM(str(ckpt), compile=True, **kw)
    assert llm.compiled and llm.model.model.decode_layer is not None and eager.model.model.decode_layer is None
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    # one row, and a batch of two rows of different lengths (the padding-mask variant)
    for convs in (CONVS[:1], CONVS):
        got = [o.outputs[0].token_ids for o in llm.chat(convs, params)]
        want = [o.outputs[0].token_ids for o in eager.chat(convs, params)]
        assert got == want


def test_compiled_step_matches_the_eager_step(ckpt):
    """Logits of one batched decode step: bit for bit in bf16 with int8 weights (the compiled code rounds where
    eager does), and to float32 rounding in float32."""
    for dtype, quantization, tol in ((torch.bfloat16, "int8", 0.0), (torch.float32, None, 1e-5)):
        llm = LLM(str(ckpt), dtype=str(dtype).split(".")[1], device="cpu", quantization=quantization)
        m, t = llm.model, llm.model.cfg.text
        g = torch.Generator().manual_seed(0)
        k = [torch.randn(2, t.num_key_value_heads, 12, t.head_dim, generator=g).to(dtype)
             for _ in range(t.num_hidden_layers)]
        v = [torch.randn(z.shape, generator=g).to(dtype) for z in k]
        lengths, tokens = torch.tensor([7, 4]), torch.tensor([11, 5000])

        def step():
            kc, vc = [z.clone() for z in k], [z.clone() for z in v]
            with torch.inference_mode():
                return m.decode(tokens, lengths, KVView(kc, vc, lengths=lengths)), kc

        ref, ref_k = step()
        assert compiled.compile_decode_(m)
        got, got_k = step()
        torch.testing.assert_close(got, ref, rtol=0, atol=tol * ref.abs().max().item())
        assert all(torch.equal(a, b) for a, b in zip(got_k, ref_k))  # the new keys were written into the cache


def test_packed_weights_stay_out_of_the_graph(ckpt, monkeypatch):
    from qwen2vl import quant
    layout = quant.linear_layout  # the decoder in fbgemm's layout, as where the package's kernels do not run
    monkeypatch.setattr(quant, "linear_layout", lambda p: "fbgemm" if p.startswith("model.layers.") else layout(p))
    llm = LLM(str(ckpt), dtype="bfloat16", device="cpu", quantization="int8", load_cache=False)
    if not any(getattr(m, "prepacked", False) for m in llm.model.model.layers.modules()):
        pytest.skip("no prepacked int8 layer here (plain on the package's kernels, or no packed kernel passes its check)")
    assert compiled.compile_decode_(llm.model, warmup=False)
    handles = [int(mod.handle) for mod in llm.model.model.layers.modules() if hasattr(mod, "handle")]
    assert len(handles) == 4 * 3 and len(set(handles)) == len(handles)  # qkv, o, gate_up, down per layer
    mod = next(mod for mod in llm.model.model.layers.modules() if hasattr(mod, "handle"))
    assert compiled._layer(mod.handle) is mod


def test_a_failed_compile_leaves_the_model_eager(ckpt, monkeypatch):
    llm = LLM(str(ckpt), dtype="float32", device="cpu")

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler\nmore")
    monkeypatch.setattr(compiled, "_warmup", broken)
    assert not compiled.compile_decode_(llm.model)
    assert llm.model.model.decode_layer is None
    out = llm.chat(CONVS[1], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
