"""Prometheus metrics in the text exposition format, without a client library."""

from __future__ import annotations

import threading
from typing import Callable

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0)


def _fmt(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) and not float(v).is_integer() else str(int(v))


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1


class Metrics:
    """Counters and histograms updated by the request handlers; gauges read at scrape time."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}  # by HTTP status (499: the client went away)
        self.aborts: dict[str, int] = {}  # by reason
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.visual_prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def add_gauge(self, name: str, help: str, fn: Callable[[], float]) -> None:
        self.gauges[name] = (help, fn)

    def request_done(self, status: int, prompt_tokens: int = 0, generation_tokens: int = 0,
                     latency: float | None = None, cached_prompt_tokens: int = 0, visual_prompt_tokens: int = 0
                     ) -> None:
        with self._lock:
            key = str(status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.cached_prompt_tokens += cached_prompt_tokens
            self.visual_prompt_tokens += visual_prompt_tokens
            self.generation_tokens += generation_tokens
            if latency is not None:
                self.latency.observe(latency)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def aborted(self, reason: str) -> None:
        with self._lock:
            self.aborts[reason] = self.aborts.get(reason, 0) + 1

    def render(self) -> str:
        m = {"model_name": self.model_name}
        lines: list[str] = []

        def head(name, typ, help):
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {typ}")

        with self._lock:
            head("qwen2vl_requests_total", "counter", "Finished chat completion requests by HTTP status "
                 "(499: the client disconnected).")
            for code in sorted(self.requests):
                lines.append(f"qwen2vl_requests_total{_labels({**m, 'status': code})} {self.requests[code]}")
            head("qwen2vl_request_aborts_total", "counter", "Requests aborted before they finished, by reason.")
            for reason in sorted(self.aborts):
                lines.append(f"qwen2vl_request_aborts_total{_labels({**m, 'reason': reason})} {self.aborts[reason]}")
            head("qwen2vl_prompt_tokens_total", "counter", "Prompt tokens of served requests.")
            lines.append(f"qwen2vl_prompt_tokens_total{_labels(m)} {self.prompt_tokens}")
            head("qwen2vl_prompt_tokens_cached_total", "counter", "Prompt tokens of served requests whose KV came "
                 "from the prefix cache (not computed again).")
            lines.append(f"qwen2vl_prompt_tokens_cached_total{_labels(m)} {self.cached_prompt_tokens}")
            head("qwen2vl_prompt_tokens_visual_total", "counter", "Prompt tokens of served requests that stand for "
                 "images and videos (their pad tokens).")
            lines.append(f"qwen2vl_prompt_tokens_visual_total{_labels(m)} {self.visual_prompt_tokens}")
            head("qwen2vl_generation_tokens_total", "counter", "Generated tokens of served requests.")
            lines.append(f"qwen2vl_generation_tokens_total{_labels(m)} {self.generation_tokens}")
            for name, hist, help in (("qwen2vl_time_to_first_token_seconds", self.ttft,
                                      "Time from a request's arrival to its first generated token."),
                                     ("qwen2vl_request_latency_seconds", self.latency,
                                      "Time from a request's arrival to its end.")):
                head(name, "histogram", help)
                for b, c in zip(hist.buckets, hist.counts):
                    lines.append(f"{name}_bucket{_labels({**m, 'le': _fmt(b)})} {c}")
                lines.append(f"{name}_bucket{_labels({**m, 'le': '+Inf'})} {hist.count}")
                lines.append(f"{name}_sum{_labels(m)} {hist.sum!r}")
                lines.append(f"{name}_count{_labels(m)} {hist.count}")
        for name, (help, fn) in self.gauges.items():
            head(name, "gauge", help)
            lines.append(f"{name}{_labels(m)} {_fmt(fn())}")
        return "\n".join(lines) + "\n"
