"""Server metrics in the Prometheus text format (GET /metrics), written by hand: counters,
gauges and histograms need no client library.

    meshlm_requests_running             sequences holding a cache slot (gauge)
    meshlm_requests_waiting             sequences queued for a slot, in the front and the engines (gauge)
    meshlm_cache_slots_in_use           KV-cache slots in use, over all replicas (gauge)
    meshlm_cache_slots_total            KV-cache slots, over the live replicas (gauge)
    meshlm_replicas_alive               engine replicas running (gauge)
    meshlm_prompt_tokens_total          prompt tokens of finished sequences (counter)
    meshlm_generation_tokens_total      tokens generated, aborted sequences included (counter)
    meshlm_requests_total{outcome=...}  finished HTTP generation requests by outcome: stop, length,
                                        aborted (client gone), rejected (429), failed (counter)
    meshlm_time_to_first_token_seconds  from arrival to the first token (histogram)
    meshlm_e2e_request_latency_seconds  from arrival to the last token (histogram)
"""

from __future__ import annotations

import bisect
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class ServerMetrics:
    """Counters and histograms the bridge updates on the event loop (no locks needed)."""

    def __init__(self):
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.outcomes: Counter[str] = Counter()
        self.ttft = Histogram()
        self.e2e = Histogram()

    def render(self, running: int, waiting: int, slots_total: int, replicas_alive: int) -> str:
        lines = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        metric(
            "meshlm_requests_running",
            "gauge",
            "Sequences holding a KV-cache slot.",
            [f"meshlm_requests_running {running}"],
        )
        metric(
            "meshlm_requests_waiting", "gauge", "Sequences waiting for a slot.", [f"meshlm_requests_waiting {waiting}"]
        )
        metric("meshlm_cache_slots_in_use", "gauge", "KV-cache slots in use.", [f"meshlm_cache_slots_in_use {running}"])
        metric(
            "meshlm_cache_slots_total",
            "gauge",
            "KV-cache slots of the live replicas.",
            [f"meshlm_cache_slots_total {slots_total}"],
        )
        metric(
            "meshlm_replicas_alive", "gauge", "Engine replicas running.", [f"meshlm_replicas_alive {replicas_alive}"]
        )
        metric(
            "meshlm_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            [f"meshlm_prompt_tokens_total {self.prompt_tokens}"],
        )
        metric(
            "meshlm_generation_tokens_total",
            "counter",
            "Tokens generated.",
            [f"meshlm_generation_tokens_total {self.generation_tokens}"],
        )
        outcomes = ("stop", "length", "aborted", "rejected", "failed")
        metric(
            "meshlm_requests_total",
            "counter",
            "Finished generation requests by outcome.",
            [f'meshlm_requests_total{{outcome="{o}"}} {self.outcomes[o]}' for o in outcomes],
        )
        metric(
            "meshlm_time_to_first_token_seconds",
            "histogram",
            "Time to the first token.",
            self.ttft.lines("meshlm_time_to_first_token_seconds"),
        )
        metric(
            "meshlm_e2e_request_latency_seconds",
            "histogram",
            "Request latency.",
            self.e2e.lines("meshlm_e2e_request_latency_seconds"),
        )
        return "\n".join(lines) + "\n"
