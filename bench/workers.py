"""The bench's workers. Each configuration runs in its own process (``bench.py --worker SPEC.json``) so that peak
memory figures never mix and a crash or timeout costs only that row. A worker writes its JSON result after every
phase (``common.Result``), so a configuration that runs out of time still reports what it measured.

Kinds:
- ``engine``: one engine (transformers or qwen2vl) in one dtype / weight format: load, time to first token,
  decode rate, second turn, peak memory, quality artifacts (last-token logits, greedy tokens), concurrency.
- ``bandwidth``: streaming memory bandwidth and matrix-vector bandwidth per weight format.
- ``vision``: encode a 1280-token image and a 32-frame video with one engine's vision tower.
- ``llamacpp``: llama.cpp's ``llama-mtmd-cli`` on GGUF conversions of the checkpoint (``bench/llama_cpp.py``).
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

from bench.common import (CONCURRENT_SEED0, DECODE_SEED, ENDOFTEXT_ID, IMAGE_PAD_ID, PROMPT_SEED, STRESS_IMAGE_SIZE,
                          STRESS_MAX_PIXELS, VIDEO_PAD_ID, WARMUP_SEED, Result, Timer, conversation, lm_bytes_per_token,
                          make_image, model_weight_bytes, peak_rss_bytes, read_rate_GBps, reset_peak_rss, rss_bytes,
                          second_turn, set_threads, stress_video_frames)


class Unsupported(Exception):
    """The configuration is not available in this build (e.g. a quantization qwen2vl does not accept yet)."""


# ---------------------------------------------------------------------------------------------------- engines
def _images_of(conv: list[dict]) -> list:
    return [c["image"] for m in conv if isinstance(m.get("content"), list) for c in m["content"]
            if isinstance(c, dict) and c.get("type") == "image"]


class TransformersEngine:
    """transformers' Qwen2VLForConditionalGeneration with SDPA and its processor (the torchvision-free fallback
    from the test fixtures when torchvision is missing). mm_token_type_ids always go to generate."""

    def __init__(self, spec: dict):
        import torch
        from transformers import Qwen2VLForConditionalGeneration
        from transformers.utils import logging as hf_logging

        from tests.fixtures import load_processor

        hf_logging.set_verbosity_error()
        self.torch = torch
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(
            spec["model"], dtype=getattr(torch, spec["dtype"]), attn_implementation="sdpa").eval()
        self.proc = load_processor(spec["model"])

    def inputs(self, conv: list[dict]):
        text = self.proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        images = _images_of(conv)
        inputs = self.proc(text=[text], images=images or None, return_tensors="pt")
        ids = inputs["input_ids"]
        inputs["mm_token_type_ids"] = (ids == IMAGE_PAD_ID).int() + 2 * (ids == VIDEO_PAD_ID).int()
        return inputs

    def _generate(self, inputs, n: int, **kw):
        with self.torch.inference_mode():
            return self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       temperature=None, top_p=None, top_k=None, pad_token_id=ENDOFTEXT_ID, **kw)

    def run(self, conv: list[dict], n: int, *, logits: bool = False, stamps: bool = False) -> dict:
        from transformers import StoppingCriteria, StoppingCriteriaList

        torch = self.torch
        times: list[float] = []

        class Stamp(StoppingCriteria):  # called once per generated token, right after it is chosen
            def __call__(self, input_ids, scores, **kwargs):
                times.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        inputs = self.inputs(conv)
        kw: dict = {}
        if logits:
            kw.update(return_dict_in_generate=True, output_logits=True)
        if stamps:
            kw["stopping_criteria"] = StoppingCriteriaList([Stamp()])
        out = self._generate(inputs, n, **kw)
        seq = out.sequences if logits else out
        prompt_len = inputs["input_ids"].shape[1]
        toks = seq[0, prompt_len:].tolist()
        res = {"tokens": toks, "text": self.proc.decode(toks, skip_special_tokens=True), "prompt_tokens": prompt_len}
        if logits:
            res["logits"] = out.logits[0][0].float().clone()
        if stamps:
            res["stamps"] = [(t, i + 1) for i, t in enumerate(times)]
        return res

    def serve(self, convs: list[list[dict]], n: int) -> int:
        """One request at a time, as a transformers user serves them."""
        return sum(len(self.run(c, n)["tokens"]) for c in convs)

    def encode(self, kind: str, pixel_values, grid) -> "torch.Tensor":
        torch = self.torch
        grid_t = torch.tensor([list(g) for g in grid])
        with torch.inference_mode():
            if kind == "image":
                out = self.model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid_t)
            else:
                out = self.model.model.get_video_features(pixel_values_videos=pixel_values, video_grid_thw=grid_t)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats


class Qwen2VLEngine:
    def __init__(self, spec: dict):
        import torch

        from qwen2vl import LLM, InvalidInputError, SamplingParams

        self.torch, self.SamplingParams = torch, SamplingParams
        from qwen2vl.config import Qwen2VLConfig

        kw = {"dtype": spec["dtype"], "device": spec.get("device", "cpu")}
        if spec.get("max_model_len"):  # a cap, never above what the model allows
            limit = Qwen2VLConfig.from_pretrained(spec["model"]).text.max_position_embeddings
            kw["max_model_len"] = min(spec["max_model_len"], limit)
        if spec.get("max_num_seqs"):
            kw["max_num_seqs"] = spec["max_num_seqs"]
        if spec.get("compile"):
            kw["compile"] = True
        q = spec.get("quantization")
        if q:
            try:
                self.llm = LLM(spec["model"], quantization=q, **kw)
            except TypeError as e:
                if "quantization" not in str(e):
                    raise
                raise Unsupported(f"LLM() takes no quantization= yet ({e})") from None
            except InvalidInputError as e:
                if "quantiz" not in str(e).lower():
                    raise
                raise Unsupported(f"quantization={q!r} refused: {e}") from None
        else:
            self.llm = LLM(spec["model"], **kw)
        self.model = self.llm.model

    def params(self, n: int):
        # the text seeds the second turn: drop grounding tokens as transformers' decode(skip_special_tokens=True)
        # does, so both engines' second turns see the same prompt (an older qwen2vl lacks the option)
        kw = {"keep_grounding_tokens": False} \
            if "keep_grounding_tokens" in getattr(self.SamplingParams, "__dataclass_fields__", {}) else {}
        return self.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)

    def run(self, conv: list[dict], n: int, *, logits: bool = False, stamps: bool = False) -> dict:
        if stamps and hasattr(self.llm, "chat_stream"):
            marks, out = [], None
            for out in self.llm.chat_stream(conv, self.params(n)):
                marks.append((time.perf_counter(), len(out.outputs[0].token_ids)))
            res = {"stamps": marks}
        else:
            out = self.llm.chat(conv, self.params(n))[0]
            res = {}
        c = out.outputs[0]
        res.update(tokens=list(c.token_ids), text=c.text, prompt_tokens=len(out.prompt_token_ids),
                   cached_tokens=getattr(out, "num_cached_tokens", None))
        if logits:
            res["logits"] = self.last_logits(conv)
        return res

    def last_logits(self, conv: list[dict]):
        """Raw logits of the prompt's last token, from the model's full forward (an extra prefill, untimed)."""
        torch = self.torch
        p = self.llm.processor(conv)
        with torch.inference_mode():
            return self.model(torch.tensor(p.token_ids), p.vision)[-1].float().clone()

    def serve(self, convs: list[list[dict]], n: int) -> int:
        """All requests in one call: the engine batches them."""
        return sum(len(o.outputs[0].token_ids) for o in self.llm.chat(convs, self.params(n)))

    def encode(self, kind: str, pixel_values, grid):
        with self.torch.inference_mode():
            return self.model.encode_vision(pixel_values, grid)


ENGINES = {"transformers": TransformersEngine, "qwen2vl": Qwen2VLEngine}


# ---------------------------------------------------------------------------------------------------- engine worker
def engine_worker(spec: dict, res: Result) -> None:
    import torch

    n_decode = spec["decode_tokens"]
    art = Path(spec["artifacts"])
    gc.collect()
    res.update(rss_before_load=rss_bytes())
    with Timer() as t:
        eng = ENGINES[spec["engine"]](spec)
    gc.collect()
    res.update(load_s=t.s, peak_rss_load=peak_rss_bytes(), rss_after_load=rss_bytes(),
               weights_bytes=model_weight_bytes(eng.model), lm_bytes_per_token=lm_bytes_per_token(eng.model))

    # The machine's read rate now and again after the decode run (a probe buffer of its own, so only where the
    # serving peak below can be reset past it).
    probe = spec.get("read_probe_bytes", 256 << 20)
    if probe and reset_peak_rss():
        res.update(read_GBps_before=read_rate_GBps(probe))
        gc.collect()

    # Serving one image: the peak from here on, apart from loading (VmHWM reset where the kernel allows it).
    res.update(peak_reset=reset_peak_rss())
    with Timer() as t:
        eng.run(conversation(make_image(WARMUP_SEED, 56, 56), "Hi"), 2)  # first-call set-up, a 4-token image
    res.update(warmup_s=t.s)

    # Time to first token: one 448x448 image, a ~281-token prompt, one token out; the median of three runs, each
    # with a different image (so no cache helps), as a shared machine makes single runs swing by 20%.
    conv_a = conversation(make_image(PROMPT_SEED))
    runs = []
    for i in range(spec.get("ttft_runs", 3)):
        with Timer() as t:
            out = eng.run(conversation(make_image(PROMPT_SEED + 10 * i)), 1,
                          logits=i == 0 and spec["engine"] == "transformers")
        runs.append(t.s)
        if i == 0:
            first = out
    res.update(ttft_s=sorted(runs)[len(runs) // 2], ttft_runs_s=runs, prompt_tokens=first["prompt_tokens"])
    if "logits" in first:
        torch.save(first.pop("logits"), art / f"{spec['name']}.logits.pt")

    # Decode: N tokens for a different image of the same size (so no cache of the first request can help), three
    # times with three images; the rate of a run counts from its first token to its last (its prefill left out),
    # and the median is reported, as the machine's speed swings by a third within minutes.
    convs = [conversation(make_image(DECODE_SEED + 10 * i)) for i in range(spec.get("decode_runs", 3))]
    rates, runs = [], []
    for conv in convs:
        with Timer() as t:
            out = eng.run(conv, n_decode, stamps=True)
        runs.append((out, t.s))
        marks = out.get("stamps") or []
        if len(marks) >= 2 and marks[-1][1] > marks[0][1]:
            rates.append((marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0]))
    (dec, total), conv_b = runs[0], convs[0]  # the second turn and the quality tokens follow the first run
    res.update(decode_total_s=total, decode_tokens=len(dec["tokens"]), greedy_tokens=dec["tokens"],
               decode_tok_s=sorted(rates)[len(rates) // 2] if rates else None, decode_runs_tok_s=rates,
               decode_prompt_tokens=dec["prompt_tokens"])

    # Second turn about the same image: the first answer appended, a new question, one token out.
    conv2 = second_turn(conv_b, dec["text"])
    with Timer() as t:
        turn2 = eng.run(conv2, 1)
    res.update(turn2_ttft_s=t.s, turn2_prompt_tokens=turn2["prompt_tokens"], turn2_cached_tokens=turn2.get("cached_tokens"),
               peak_rss_serve=peak_rss_bytes())
    if res.get("read_GBps_before"):
        res.update(read_GBps_after=read_rate_GBps(probe))

    if spec["engine"] == "qwen2vl":  # quality reference / comparison: the first prompt's last-token logits
        try:
            torch.save(eng.last_logits(conv_a), art / f"{spec['name']}.logits.pt")
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            res.update(logits_error=f"{type(e).__name__}: {e}")

    # Concurrency: R requests, R different images, T tokens each.
    r, n = spec["concurrent_requests"], spec["concurrent_tokens"]
    if r > 0:
        convs = [conversation(make_image(CONCURRENT_SEED0 + i)) for i in range(r)]
        gc.collect()
        with Timer() as t:
            produced = eng.serve(convs, n)
        res.update(concurrent_requests=r, concurrent_tokens_each=n, concurrent_s=t.s, concurrent_tokens=produced,
                   concurrent_tok_s=produced / t.s)


# ---------------------------------------------------------------------------------------------------- bandwidth
def bandwidth_worker(spec: dict, res: Result) -> None:
    """Best read rates over several rounds that visit every probe in turn, so that a burst of load from other
    processes on a shared machine does not decide any one figure."""
    import torch
    import torch.nn.functional as F

    from qwen2vl import packed

    total = spec["bandwidth_bytes"]
    rounds, reps = spec.get("bandwidth_rounds", 5), spec.get("bandwidth_reps", 3)
    n_out, k_in = 8960, 1536  # the 2B's MLP matrices: many distinct ones, far more bytes than any cache
    gen = torch.Generator().manual_seed(0)

    def make(fmt: str):
        """(callable, bytes of weights it reads) for one format."""
        if fmt == "copy":  # random data: pages of one repeated value can be merged by the host and read from cache
            src = torch.rand(total // 4, generator=gen)
            dst = torch.empty_like(src)
            return (lambda: dst.copy_(src)), 2 * total  # read + write counted
        if fmt == "sum":
            src = torch.rand(total // 4, generator=gen)
            return (lambda: src.sum()), total
        if fmt in ("float32", "bfloat16"):  # the kernel qwen2vl's decode runs: prepacked when oneDNN can
            dt = getattr(torch, fmt)
            per = n_out * k_in * dt.itemsize
            ws = [torch.randn(n_out, k_in, generator=gen).mul_(0.02).to(dt) for _ in range(max(2, math.ceil(total / per)))]
            x = torch.randn(1, k_in, generator=gen).to(dt)
            if packed.supported(dt):
                ws = [packed.pack_weight(w) for w in ws]
                return (lambda: [packed.linear(x, w) for w in ws]), per * len(ws)
            return (lambda: [F.linear(x, w) for w in ws]), per * len(ws)
        x = torch.randn(1, k_in, generator=gen).to(torch.bfloat16)
        if fmt == "int8":  # the kernel int8 decode runs: qwen2vl's Int8Linear in the language model's layout
            from qwen2vl.quant import Int8Linear, linear_layout
            per = n_out * k_in + 4 * n_out
            ws = [Int8Linear(torch.randn(n_out, k_in, generator=gen).mul_(0.02), None, layout=linear_layout("lm_head"))
                  for _ in range(max(2, math.ceil(total / per)))]
            return (lambda: [w(x) for w in ws]), per * len(ws)
        if fmt == "int4":
            group = 128
            per = n_out * k_in // 2 + (k_in // group) * n_out * 2 * 2
            ws = []
            for _ in range(max(2, math.ceil(total / per))):
                q = torch.randint(0, 16, (n_out, k_in), generator=gen, dtype=torch.int32)
                sz = (torch.rand(k_in // group, n_out, 2, generator=gen) / 64).to(torch.bfloat16)
                ws.append((torch._convert_weight_to_int4pack_for_cpu(q, 2), sz))
            return (lambda: [torch._weight_int4pack_mm_for_cpu(x, p, group, sz) for p, sz in ws]), per * len(ws)
        raise ValueError(fmt)

    probes, best = {}, {}
    for fmt in ("copy", "sum", "float32", "bfloat16", "int8", "int4"):
        try:
            probes[fmt] = make(fmt)
            probes[fmt][0]()  # warm: page in, set up kernels
        except Exception as e:  # noqa: BLE001 - a kernel missing from this torch build
            probes.pop(fmt, None)
            res.update(**{f"{fmt}_error": f"{type(e).__name__}: {e}"})
    for _ in range(rounds):
        for fmt, (fn, nbytes) in probes.items():
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                best[fmt] = max(best.get(fmt, 0.0), nbytes / (time.perf_counter() - t0) / 1e9)
    res.update(gemm_GFLOPs=_gemm_peaks(reps if total >= (64 << 20) else 1))
    res.update(copy_GBps=best.get("copy"), sum_GBps=best.get("sum"), bandwidth_rounds=rounds, bandwidth_reps=reps,
               matvec_GBps={f: best.get(f) for f in ("float32", "bfloat16", "int8", "int4")})
    res.update(machine_GBps=max(v for k, v in best.items() if k != "copy"))


def _gemm_peaks(reps: int) -> dict[str, float]:
    """Best GEMM rate (GFLOP/s; GOP/s for int8) of each compute format on the prefill's two largest shapes:
    the vision MLP (1024 patches x 1280 -> 5120) and the 2B's fused gate/up (281 tokens x 1536 -> 17920)."""
    import torch
    import torch.nn.functional as F

    from qwen2vl import packed

    gen = torch.Generator().manual_seed(0)
    best: dict[str, float] = {}
    for m, k, n in ((1024, 1280, 5120), (281, 1536, 17920)):
        x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        xq = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
        wq = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        xb, wb = x.bfloat16(), w.bfloat16()
        fns = {"float32": lambda: F.linear(x, w), "bfloat16": lambda: F.linear(xb, wb),
               "int8": lambda: torch._int_mm(xq, wq.t())}
        for fmt, a, b in (("float32", x, w), ("bfloat16", xb, wb)):  # qwen2vl's kernel; F.linear kept as "(F.linear)"
            if packed.supported(a.dtype):
                fns[fmt + " (F.linear)"] = fns[fmt]
                fns[fmt] = lambda a=a, p=packed.pack_weight(b): packed.linear(a, p)
        for fmt, fn in fns.items():
            try:
                fn()
                for _ in range(max(1, reps)):
                    t0 = time.perf_counter()
                    fn()
                    best[fmt] = max(best.get(fmt, 0.0), 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
            except Exception:  # noqa: BLE001 - a kernel missing from this torch build
                pass
    return best


# ---------------------------------------------------------------------------------------------------- vision
def vision_worker(spec: dict, res: Result) -> None:
    import torch

    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.processor import Processor
    from qwen2vl.tokenizer import Tokenizer

    art = Path(spec["artifacts"])
    with Timer() as t:
        eng = ENGINES[spec["engine"]](spec)
    res.update(load_s=t.s, peak_rss_load=peak_rss_bytes(), weights_bytes=model_weight_bytes(eng.model))
    # Both engines get qwen2vl's preprocessing (transformers' video processor needs torchvision).
    proc = getattr(getattr(eng, "llm", None), "processor", None) or \
        Processor(Tokenizer.from_pretrained(spec["model"]), Qwen2VLConfig.from_pretrained(spec["model"]))

    warm = proc.load_media([{"type": "image", "image": make_image(WARMUP_SEED, 56, 56)}])
    eng.encode("image", warm.pixel_values, warm.image_grid_thw)

    cases = {
        "image": [{"type": "image", "image": make_image(7, *STRESS_IMAGE_SIZE), "max_pixels": STRESS_MAX_PIXELS}],
        "video": [{"type": "video", "video": stress_video_frames(spec["video_frames"])}],
    }
    for case, media in cases.items():
        with Timer() as tp:
            vis = proc.load_media(media)
        pv, grid = (vis.pixel_values, vis.image_grid_thw) if case == "image" else \
            (vis.pixel_values_videos, vis.video_grid_thw)
        gc.collect()
        before = rss_bytes()
        reset_peak_rss()
        with Timer() as te:
            feats = eng.encode(case, pv, grid)
        peak = peak_rss_bytes()
        torch.save(feats.float().clone(), art / f"{spec['name']}.{case}.pt")
        res.update(**{case: dict(grid=[list(g) for g in grid], patches=int(pv.shape[0]), tokens=int(feats.shape[0]),
                                 preprocess_s=tp.s, encode_s=te.s, rss_before=before, peak_rss=peak,
                                 peak_increase=peak - before)})
        del feats, vis, pv
        gc.collect()


def llamacpp_worker(spec: dict, res: Result) -> None:
    from bench.llama_cpp import worker

    worker(spec, res)


WORKERS = {"engine": engine_worker, "bandwidth": bandwidth_worker, "vision": vision_worker,
           "llamacpp": llamacpp_worker}


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    res = Result(spec["result"], name=spec["name"], kind=spec["kind"], started=time.time())
    try:
        res.update(threads=set_threads(), rss_start=rss_bytes())
        WORKERS[spec["kind"]](spec, res)
    except Unsupported as e:
        res.update(unsupported=str(e))
    except BaseException as e:  # noqa: BLE001 - the orchestrator shows it in the table
        res.update(error=f"{type(e).__name__}: {e}".strip())
        traceback.print_exc()
        return 1
    finally:
        res.update(finished=time.time())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
