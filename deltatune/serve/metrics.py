"""The server's counters, written in Prometheus' text exposition format (version 0.0.4).

Counters and histograms are kept here (touched by the server's asyncio thread only); gauges are
read when ``/metrics`` is scraped. Format: ``# HELP`` / ``# TYPE`` lines, then ``name{labels} value``;
a histogram has cumulative ``_bucket{le=...}`` lines, ``_sum`` and ``_count``
(https://prometheus.io/docs/instrumenting/exposition_formats/).
"""

from __future__ import annotations

import bisect
from collections import Counter

__all__ = ["Metrics", "LATENCY_BUCKETS"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Upper bounds (seconds) of the request latency histogram's buckets (+Inf added)."""


class Metrics:
    """Requests by endpoint and status, tokens, and a latency histogram per endpoint."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.requests: Counter = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self._hist: dict[str, list[int]] = {}  # endpoint -> counts per bucket (+Inf last)
        self._sum: Counter = Counter()

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request and its latency."""
        self.requests[(endpoint, str(status))] += 1
        counts = self._hist.setdefault(endpoint, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self._sum[endpoint] += seconds

    def tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens += prompt
        self.generation_tokens += generated

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; ``gauges``: name -> (help, value)."""
        lines = ["# HELP deltatune_requests_total HTTP requests by endpoint and status code.",
                 "# TYPE deltatune_requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'deltatune_requests_total{{endpoint="{_escape(endpoint)}",status="{status}"}} {n}')
        for name, about, value in (("deltatune_prompt_tokens_total", "Prompt tokens of finished requests.",
                                    self.prompt_tokens),
                                   ("deltatune_generation_tokens_total", "Tokens generated for finished requests.",
                                    self.generation_tokens)):
            lines += [f"# HELP {name} {about}", f"# TYPE {name} counter", f"{name} {value}"]
        for name, (about, value) in gauges.items():
            lines += [f"# HELP {name} {about}", f"# TYPE {name} gauge", f"{name} {value}"]
        name = "deltatune_request_latency_seconds"
        lines += [f"# HELP {name} Seconds from a request's arrival to its last byte, by endpoint.",
                  f"# TYPE {name} histogram"]
        for endpoint, counts in sorted(self._hist.items()):
            label, total = f'endpoint="{_escape(endpoint)}"', 0
            for bound, n in zip([*map(repr, self.buckets), "+Inf"], counts):
                total += n
                lines.append(f'{name}_bucket{{{label},le="{bound}"}} {total}')
            lines += [f"{name}_sum{{{label}}} {self._sum[endpoint]}", f"{name}_count{{{label}}} {total}"]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
