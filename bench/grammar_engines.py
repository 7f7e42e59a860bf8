"""xgrammar vs llguidance on the Qwen2 vocabulary (151,936 ids): what chose qwen2vl.structured's grammar engine.

For each engine and a few schemas / regexes it measures the compile time (first compile, no cache) and the time
to compute one token mask while a matcher walks a valid answer token by token (median and p90 over the answer's
tokens; the mask is the whole-vocabulary bitmask the engine applies to the logits). Single-threaded, CPU.

    python bench/grammar_engines.py --tokenizer DIR     # a directory with the checkpoint's tokenizer.json

Needs both packages: ``pip install xgrammar llguidance``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB = 151936  # the Qwen2 logits' width
EOS = 151645  # <|im_end|>

CASES = {
    "invoice": ({"type": "object", "properties": {
        "total": {"type": "number", "minimum": 0}, "currency": {"enum": ["EUR", "USD", "GBP"]},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "items": {"type": "array", "minItems": 1, "maxItems": 5, "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}, "required": ["name", "qty"]}}},
        "required": ["total", "date", "items"]},
        {"total": 12.5, "currency": "EUR", "date": "2024-05-01", "items": [{"name": "Coffee beans", "qty": 2}]}),
    "nested_anyof": ({"type": "object", "properties": {
        "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
        "owner": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
            "name": {"type": "string"}, "email": {"type": "string"}}, "required": ["name"]}]},
        "score": {"type": "number", "minimum": -1, "maximum": 1}}, "required": ["id", "owner"]},
        {"id": 7, "tags": ["a", "bb"], "owner": {"name": "Ann Lee", "email": "ann@example.com"}, "score": 0.25}),
    "tool_call": ({"type": "object", "properties": {
        "name": {"const": "get_weather"}, "arguments": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"], "additionalProperties": False}}, "required": ["name", "arguments"]},
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}),
    "json_object": ({"type": "object"}, {"a": [1, 2, {"b": "text with spaces"}], "c": None}),
    "regex_date": (r"\d{4}-\d{2}-\d{2}", "2025-12-04"),
}


_LLG_OPTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _answer_ids(tok, doc) -> list[int]:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    return tok.encode(text)


def bench_llguidance(tok_dir: str, tok) -> dict:
    import llguidance as llg
    t0 = time.perf_counter()
    lt = llg.LLTokenizer(open(os.path.join(tok_dir, "tokenizer.json"), encoding="utf-8").read(), n_vocab=VOCAB,
                         eos_token=EOS)
    setup = time.perf_counter() - t0
    out = {}
    for name, (schema, doc) in CASES.items():
        t0 = time.perf_counter()
        if isinstance(schema, str):
            grammar = llg.LLMatcher.grammar_from_regex(schema)
        else:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=_LLG_OPTS)
        m = llg.LLMatcher(lt, grammar)
        compile_s = time.perf_counter() - t0
        assert not m.is_error(), m.get_error()
        times = []
        for t in _answer_ids(tok, doc) + [EOS]:
            t0 = time.perf_counter()
            mask = m.compute_bitmask()
            times.append(time.perf_counter() - t0)
            assert (mask[t // 8] >> (t % 8)) & 1, (name, t)
            assert m.consume_token(t), m.get_error()
        out[name] = (compile_s, times)
    return {"setup": setup, "cases": out}


def bench_xgrammar(tok) -> dict:
    import torch
    import xgrammar as xgr
    t0 = time.perf_counter()
    enc = [""] * VOCAB  # "" marks an id xgrammar never allows: the added (special) tokens and the padding
    for s, i in tok.backend.get_vocab(with_added_tokens=False).items():
        enc[i] = s
    info = xgr.TokenizerInfo(enc, xgr.VocabType.BYTE_LEVEL, vocab_size=VOCAB, stop_token_ids=[EOS])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    setup = time.perf_counter() - t0
    out = {}
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    for name, (schema, doc) in CASES.items():
        t0 = time.perf_counter()
        if isinstance(schema, str):
            cg = compiler.compile_regex(schema)
        else:
            cg = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                              separators=(", ", ": "))
        compile_s = time.perf_counter() - t0
        m = xgr.GrammarMatcher(cg)
        times = []
        for t in _answer_ids(tok, doc) + [EOS]:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(bitmask, 0)
            times.append(time.perf_counter() - t0)
            assert (int(bitmask[0, t // 32]) >> (t % 32)) & 1, (name, t)
            assert m.accept_token(t), (name, t)
        out[name] = (compile_s, times)
    del torch
    return {"setup": setup, "cases": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a directory with tokenizer.json (and tokenizer_config.json)")
    args = ap.parse_args(argv)
    from qwen2vl.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(args.tokenizer)
    import llguidance
    import xgrammar
    results = {f"llguidance {llguidance.get_version()}": bench_llguidance(args.tokenizer, tok),
               f"xgrammar {importlib.metadata.version('xgrammar')}": bench_xgrammar(tok)}
    print("| engine | case | compile ms | mask ms median | mask ms p90 | tokens |")
    print("|---|---|---:|---:|---:|---:|")
    for eng, r in results.items():
        print(f"| {eng} | tokenizer setup | {r['setup'] * 1e3:.0f} | | | |")
        for name, (c, ts) in r["cases"].items():
            ts = sorted(ts)
            p90 = ts[min(len(ts) - 1, int(0.9 * len(ts)))]
            print(f"| {eng} | {name} | {c * 1e3:.1f} | {statistics.median(ts) * 1e3:.3f} | {p90 * 1e3:.3f} "
                  f"| {len(ts)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
