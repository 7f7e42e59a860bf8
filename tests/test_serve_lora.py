"""Serving LoRA adapters without merging them: ``LLM(enable_lora=True)`` with ``lora_request=LoRARequest(...)``, a
batch mixing adapters, the caches keyed by adapter, and ``qwen2vl serve --lora-modules`` (the request's ``model``
picks the adapter). Reference: the same checkpoint with the adapter merged into its weights (float32, greedy).

Adapters are written here by hand in peft's file format (adapter_config.json + adapter_model.safetensors, keys
``base_model.model.<target>.lora_A.weight`` / ``lora_B.weight``)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2vl import LLM, InvalidInputError, LoRARequest, SamplingParams
from tests.server_common import blocky, data_url

LANGUAGE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")
GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True)
HELLO = [{"role": "user", "content": "Hello there"}]
OTHER = [{"role": "user", "content": "Tell me something else, please."}]


def _targets(cfg, vision: bool) -> dict[str, tuple[int, int]]:
    """target -> (out, in) of the tiny model: every language linear, and with ``vision`` the vision tower's qkv
    and fc2 and the merger's first linear."""
    t, v = cfg.text, cfg.vision
    hd = t.hidden_size // t.num_attention_heads
    q, kv, h, i = t.num_attention_heads * hd, t.num_key_value_heads * hd, t.hidden_size, t.intermediate_size
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    out = {f"model.layers.{n}.{k}": s for n in range(t.num_hidden_layers) for k, s in shapes.items()}
    if vision:
        d, mlp = v.embed_dim, int(v.embed_dim * v.mlp_ratio)
        width = d * v.spatial_merge_size ** 2
        out.update({f"visual.blocks.{n}.attn.qkv": (3 * d, d) for n in range(v.depth)})
        out.update({f"visual.blocks.{n}.mlp.fc2": (d, mlp) for n in range(v.depth)})
        out["visual.merger.mlp.0"] = (width, width)
    return out


def write_adapter(path, cfg, *, rank=4, alpha=8.0, seed=0, vision=False, scale=0.1, shapes=None):
    """A random peft LoRA adapter for the tiny model in ``path``; returns {target: (A, B)} and the scaling."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or _targets(cfg, vision)
    weights = {name: (torch.randn(rank, n_in, generator=g) * scale, torch.randn(n_out, rank, generator=g) * scale)
               for name, (n_out, n_in) in shapes.items()}
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in weights.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "use_rslora": False, "bias": "none", "target_modules": sorted({n.rsplit(".", 1)[-1] for n in shapes}),
              "base_model_name_or_path": "tiny", "fan_in_fan_out": False, "modules_to_save": None}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return weights, alpha / rank


def merged_checkpoint(src, dst, weights, scaling):
    """A copy of checkpoint ``src`` with every ``B @ A * scaling`` added to its target's weight."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for name, (a, b) in weights.items():
        w = tensors[name + ".weight"]
        tensors[name + ".weight"] = (w.double() + b.double() @ a.double() * scaling).to(w.dtype)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def image_chat(seed=1):
    return [{"role": "user", "content": [{"type": "image", "image": data_url(blocky(56, 56, seed))},
                                         {"type": "text", "text": "What is in the image?"}]}]


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    """Two adapters on the tiny model: "lang" (every language linear, rank 4) and "vis" (language and vision,
    rank 8), with their merged checkpoints."""
    from qwen2vl.config import Qwen2VLConfig
    cfg = Qwen2VLConfig.from_pretrained(tiny_checkpoint)
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for i, (name, rank, vision) in enumerate((("lang", 4, False), ("vis", 8, True))):
        weights, scaling = write_adapter(root / name, cfg, rank=rank, seed=i, vision=vision)
        out[name] = dict(request=LoRARequest(name, i + 1, str(root / name)),
                         merged=merged_checkpoint(tiny_checkpoint, root / f"{name}-merged", weights, scaling))
    out["cfg"], out["root"] = cfg, root
    return out


def _llm(path, **kw):
    return LLM(str(path), dtype="float32", device="cpu", **kw)


def _same(got, want):
    """Same greedy tokens and the same logprobs (float32 tolerance)."""
    g, w = got.outputs[0], want.outputs[0]
    assert g.token_ids == w.token_ids
    for lg, lw in zip(g.logprobs, w.logprobs):
        assert lg.keys() == lw.keys()
        assert all(abs(lg[t] - lw[t]) < 2e-4 for t in lg), [(lg[t], lw[t]) for t in lg]


@pytest.fixture(scope="module")
def lora_llm(tiny_checkpoint):
    return _llm(tiny_checkpoint, enable_lora=True, max_loras=2, max_lora_rank=8, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def base_llm(tiny_checkpoint):
    return _llm(tiny_checkpoint)


@pytest.fixture(scope="module")
def merged_outputs(adapters, base_llm):
    """What the merged checkpoints (and the base) answer to HELLO, OTHER and an image."""
    out = {}
    for name in ("lang", "vis", None):
        llm = _llm(adapters[name]["merged"]) if name else base_llm
        out[name] = llm.chat([HELLO, OTHER, image_chat()], GREEDY)
    return out


def test_adapter_output_equals_the_merged_model(lora_llm, adapters, merged_outputs):
    for name in ("lang", "vis"):
        req = adapters[name]["request"]
        got = lora_llm.chat([HELLO, OTHER, image_chat()], GREEDY, lora_request=req)
        for g, w in zip(got, merged_outputs[name]):
            _same(g, w)
        assert got[0].outputs[0].token_ids != merged_outputs[None][0].outputs[0].token_ids  # the adapter matters
        streamed = [o for o in lora_llm.chat_stream(HELLO, GREEDY, lora_request=req)][-1]
        assert streamed.outputs[0].token_ids == merged_outputs[name][0].outputs[0].token_ids
    raw = lora_llm.generate({"prompt_token_ids": merged_outputs["lang"][0].prompt_token_ids}, GREEDY,
                            lora_request=adapters["lang"]["request"])
    _same(raw[0], merged_outputs["lang"][0])
    _same(lora_llm.chat(HELLO, GREEDY)[0], merged_outputs[None][0])  # no adapter: the base model


def test_a_batch_mixing_adapters_equals_each_request_alone(lora_llm, adapters, merged_outputs):
    lang, vis = adapters["lang"]["request"], adapters["vis"]["request"]
    convs = [HELLO, OTHER, image_chat(), HELLO, image_chat()]
    loras = [lang, vis, None, vis, lang]
    batch = lora_llm.chat(convs, GREEDY, lora_request=loras)
    index = {id(HELLO): 0, id(OTHER): 1}
    for conv, lora, got in zip(convs, loras, batch):
        alone = lora_llm.chat(conv, GREEDY, lora_request=lora)[0]
        _same(got, alone)
        _same(got, merged_outputs[lora.lora_name if lora else None][index.get(id(conv), 2)])


def test_more_adapters_than_slots_wait_for_a_free_one(tiny_checkpoint, adapters, merged_outputs):
    """One slot for two adapters, and prompts prefilled in chunks of at most 6 tokens."""
    llm = _llm(tiny_checkpoint, enable_lora=True, max_loras=1, max_lora_rank=8, max_num_batched_tokens=6,
               enable_prefix_caching=False)
    lang, vis = adapters["lang"]["request"], adapters["vis"]["request"]
    got = llm.chat([HELLO, HELLO, HELLO, OTHER, image_chat()], GREEDY, lora_request=[lang, vis, None, lang, vis])
    for out, name, i in zip(got, ("lang", "vis", None, "lang", "vis"), (0, 0, 0, 1, 2)):
        _same(out, merged_outputs[name][i])
    # alone, the image prompt (its image at tokens 15..18) runs in chunks [0, 6), ..., [12, 18), [18, 24), ...
    _same(llm.chat(image_chat(), GREEDY, lora_request=vis)[0], merged_outputs["vis"][2])
    assert len(llm.engine.lora.slots) == 1


def test_prefix_and_vision_caches_never_cross_adapters(tiny_checkpoint, adapters, merged_outputs):
    llm = _llm(tiny_checkpoint, enable_lora=True, max_loras=2, max_lora_rank=8)
    lang, vis = adapters["lang"]["request"], adapters["vis"]["request"]
    img = image_chat()
    first = llm.chat(img, GREEDY, lora_request=lang)[0]  # caches its KV and the image's features
    assert first.num_cached_tokens == 0
    for lora, name in ((None, None), (vis, "vis"), (lang, "lang")):
        vision_cached = llm.engine.runner.stats["vision_cached"]
        out = llm.chat(img, GREEDY, lora_request=lora)[0]
        _same(out, merged_outputs[name][2])
        if lora is lang:  # the same adapter reuses its own KV
            assert out.num_cached_tokens > 0
        else:
            assert out.num_cached_tokens == 0
        # "lang" leaves the vision tower alone, so the base request reuses the image's features; "vis" encodes its
        # own; "lang" again reuses its KV, the image block included, and needs no features
        assert llm.engine.runner.stats["vision_cached"] - vision_cached == (1 if lora is None else 0)


def test_bad_adapters_and_requests_are_refused(lora_llm, base_llm, tiny_checkpoint, adapters, tmp_path):
    cfg, llm = adapters["cfg"], lora_llm
    write_adapter(tmp_path / "r16", cfg, rank=16)
    with pytest.raises(InvalidInputError, match="rank 16, over max_lora_rank 8"):
        llm.chat(HELLO, GREEDY, lora_request=LoRARequest("r16", 6, str(tmp_path / "r16")))
    wrong = {"model.layers.0.self_attn.q_proj": (64, 96)}  # made for a wider model
    write_adapter(tmp_path / "wrong", cfg, shapes=wrong)
    with pytest.raises(InvalidInputError, match="another base model"):
        llm.chat(HELLO, GREEDY, lora_request=LoRARequest("wrong", 7, str(tmp_path / "wrong")))
    with pytest.raises(InvalidInputError):
        llm.chat(HELLO, GREEDY, lora_request=LoRARequest("missing", 8, str(tmp_path / "nothing-here")))
    with pytest.raises(InvalidInputError, match="one per prompt"):
        llm.chat([HELLO, OTHER], GREEDY, lora_request=[adapters["lang"]["request"]])
    llm.add_lora(adapters["lang"]["request"])
    with pytest.raises(InvalidInputError, match="id of its own"):
        llm.add_lora(LoRARequest("other", adapters["lang"]["request"].lora_int_id, str(tmp_path / "wrong")))
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(InvalidInputError, match="enable_lora"):
        base_llm.chat(HELLO, GREEDY, lora_request=adapters["lang"]["request"])
    with pytest.raises(InvalidInputError, match="compile"):
        _llm(tiny_checkpoint, enable_lora=True, compile=True)
    for bad in (dict(lora_int_id=0), dict(lora_name=""), dict(lora_path="")):
        with pytest.raises(InvalidInputError):
            LoRARequest(**{"lora_name": "x", "lora_int_id": 1, "lora_path": "p", **bad})


# ------------------------------------------------------------------------------------------------ the server


def test_lora_modules_forms():
    from qwen2vl.server.models import LoRAModule, parse_lora_module
    assert parse_lora_module("sql=/a/b") == LoRAModule("sql", "/a/b")
    assert parse_lora_module('{"name": "sql", "path": "/a=b", "base_model_name": "base"}') == \
        LoRAModule("sql", "/a=b", "base")
    for bad in ("sql", "=/a", "sql=", '{"name": "sql"}', '{"name": "x", "path": "p", "rank": 8}', "{nope"):
        with pytest.raises(InvalidInputError, match="lora-modules"):
            parse_lora_module(bad)
    from qwen2vl.cli import build_parser
    args = build_parser().parse_args(["serve", "--model", "m", "--lora-modules", "a=/p", '{"name":"b","path":"/q"}',
                                      "--max-loras", "2", "--max-lora-rank", "8"])
    assert args.lora_modules == ["a=/p", '{"name":"b","path":"/q"}'] and args.max_loras == 2
    assert args.max_lora_rank == 8 and args.enable_lora is False


@pytest.fixture(scope="module")
def lora_server(tiny_checkpoint, adapters):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from qwen2vl.server import ServerConfig, build_app
    from qwen2vl.server.models import LoRAModule
    from tests.server_common import serve_in_thread
    llm = _llm(tiny_checkpoint, enable_lora=True, max_loras=2, max_lora_rank=8)
    mods = [LoRAModule("lang", adapters["lang"]["request"].lora_path),
            LoRAModule("vis", adapters["vis"]["request"].lora_path, "tiny")]
    app = build_app(llm, ServerConfig(served_model_names=["tiny", "alias"], lora_modules=mods))
    with serve_in_thread(app) as port:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)


def test_server_model_field_picks_the_adapter(lora_server, merged_outputs, base_llm):
    tok = base_llm.tokenizer
    for model, name in (("lang", "lang"), ("vis", "vis"), ("tiny", None), ("alias", None)):
        r = lora_server.chat.completions.create(model=model, messages=HELLO, temperature=0, max_tokens=8,
                                                extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == tok.decode(merged_outputs[name][0].outputs[0].token_ids,
                                                          skip_special_tokens=True)
        assert r.model == (model if name else "tiny")
    stream = lora_server.chat.completions.create(model="vis", messages=HELLO, temperature=0, max_tokens=8,
                                                 extra_body={"ignore_eos": True}, stream=True)
    chunks = list(stream)
    assert {c.model for c in chunks} == {"vis"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        tok.decode(merged_outputs["vis"][0].outputs[0].token_ids, skip_special_tokens=True)


def test_server_lists_adapters_and_404s_unknown_names(lora_server):
    import openai
    cards = {m.id: m for m in lora_server.models.list().data}
    assert list(cards) == ["tiny", "alias", "lang", "vis"]
    assert cards["tiny"].parent is None and cards["lang"].parent == "tiny" and cards["vis"].parent == "tiny"
    assert lora_server.models.retrieve("lang").parent == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        lora_server.chat.completions.create(model="nope", messages=HELLO, max_tokens=2)
    assert e.value.status_code == 404
    assert e.value.body == {"message": "The model `nope` does not exist.", "type": "NotFoundError", "param": "model",
                            "code": "model_not_found"}
    with pytest.raises(openai.NotFoundError):
        lora_server.models.retrieve("nope")


def test_server_refuses_bad_lora_modules(lora_llm, base_llm, adapters, tmp_path):
    from qwen2vl.server import ServerConfig, build_app
    from qwen2vl.server.models import LoRAModule
    path, llm = adapters["lang"]["request"].lora_path, lora_llm
    with pytest.raises(InvalidInputError, match="enable_lora"):
        build_app(base_llm, ServerConfig(served_model_names=["tiny"], lora_modules=[LoRAModule("a", path)]))
    for mods, words in (([LoRAModule("tiny", path)], "used twice"),
                        ([LoRAModule("a", path, "other")], "not a served model name"),
                        ([LoRAModule("l", path), LoRAModule("v", adapters["vis"]["request"].lora_path),
                          LoRAModule("a", str(tmp_path / "missing"))], "not a directory")):
        with pytest.raises(InvalidInputError, match=words):
            build_app(llm, ServerConfig(served_model_names=["tiny"], lora_modules=mods))


def test_per_row_lora_beside_any_base_linear(lora_llm):
    """Rows [slot 5, none, slot 6] of one forward, over a float, prepacked, int8 and int4 base: each row gets
    exactly its own delta on the output slices of its targets, the base's output untouched elsewhere."""
    from qwen2vl.packed import PackedLinear
    from qwen2vl.quant import Int4Linear, Int8Linear
    multi = lora_llm.engine.lora.multi
    g = torch.Generator().manual_seed(3)
    q, k = "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"
    rows_q, rows_k = (multi.parts[t] for t in (q, k))
    ab = {t: (torch.randn(r, 64, generator=g), torch.randn(p.end - p.start, r, generator=g))
          for t, p, r in ((q, rows_q, 2), (k, rows_k, 3))}
    multi.load(5, {q: ab[q]}, 0.5)  # slot 5: q only; slot 6: q and k
    multi.load(6, ab, 2.0)
    wrapper = lora_llm.model.model.layers[1].self_attn.qkv_proj
    loaded = wrapper.base
    lin = torch.nn.Linear(64, loaded.out_features)
    x = torch.randn(3, 1, 64, generator=g)
    try:
        for base in (lin, PackedLinear(lin), Int8Linear(lin.weight, lin.bias),
                     Int4Linear(lin.weight, lin.bias, group_size=32)):
            wrapper.base = base
            with multi.rows([5, None, 6]):
                y = wrapper(x)
            want = base(x).float()
            want[0, :, rows_q.start:rows_q.end] += x[0] @ ab[q][0].T @ ab[q][1].T * 0.5
            for t, p in ((q, rows_q), (k, rows_k)):
                want[2, :, p.start:p.end] += x[2] @ ab[t][0].T @ ab[t][1].T * 2.0
            torch.testing.assert_close(y.float(), want, rtol=2e-2 if base.__class__ is Int4Linear else 1e-5,
                                       atol=5e-2 if base.__class__ is Int4Linear else 1e-4)
            assert not torch.equal(y[0], base(x)[0]) and torch.equal(y[1], base(x)[1])
    finally:
        wrapper.base = loaded
        multi.unload(5)
        multi.unload(6)


def test_an_adapter_that_fails_to_load_fails_only_its_request(tiny_checkpoint, adapters, merged_outputs,
                                                               monkeypatch):
    """Loading an adapter into a slot fails (e.g. out of memory): that request is dropped, the step raises, and the
    requests admitted beside it go back to the queue and finish as they would have."""
    from qwen2vl.engine.sequence import Sequence, Status
    llm = _llm(tiny_checkpoint, enable_lora=True, max_loras=2, max_lora_rank=8, enable_prefix_caching=False)
    engine, lang, vis = llm.engine, adapters["lang"]["request"], adapters["vis"]["request"]
    real = engine.lora.activate

    def activate(req, pinned):
        if req.lora_name == "vis":
            raise MemoryError("no memory for the adapter")
        return real(req, pinned)

    monkeypatch.setattr(engine.lora, "activate", activate)
    p = llm.processor(HELLO)
    seqs = [Sequence(p.token_ids, GREEDY, p.vision, request_id=rid, lora_request=req)
            for rid, req in (("a", lang), ("b", vis), ("c", None))]
    for s in seqs:
        engine.add_request(s)
    with pytest.raises(MemoryError):
        engine.step()
    assert seqs[1].status is Status.FINISHED and seqs[1].finish_reason == "abort"
    assert [s.request_id for s in engine.scheduler.waiting] == ["a", "c"]
    assert all(s.status is Status.WAITING for s in (seqs[0], seqs[2]))
    while engine.has_unfinished_requests():
        engine.step()
    assert seqs[0].output_token_ids == merged_outputs["lang"][0].outputs[0].token_ids
    assert seqs[2].output_token_ids == merged_outputs[None][0].outputs[0].token_ids
