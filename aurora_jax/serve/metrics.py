"""The server's Prometheus metrics (prometheus_client), on a registry of its own.

Names follow vLLM's where the concept is the same (`spec_decode_num_drafts`,
`spec_decode_num_draft_tokens`, `spec_decode_num_accepted_tokens`,
`spec_decode_num_accepted_tokens_per_pos`, `time_to_first_token_seconds`, ...), under the
`aurora_jax:` prefix; the rest are this system's own (draft version, hot swaps, learner).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_GAP = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """Every metric /metrics exposes."""

    def __init__(self, max_depth: int):
        r = self.registry = CollectorRegistry()
        p = "aurora_jax:"
        self.requests = Counter(p + "request_success", "Finished requests, by finish reason",
                                ["finished_reason"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated",
                                         registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY, registry=r)
        self.inter_token = Histogram(p + "inter_token_latency_seconds",
                                     "Time between streamed tokens (per token)",
                                     buckets=_TOKEN_GAP, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Request latency, end to end",
                             buckets=_LATENCY, registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests queued for a slot",
                             registry=r)
        self.running = Gauge(p + "num_requests_running", "Requests in a slot", registry=r)
        self.drafts = Counter(p + "spec_decode_num_drafts",
                              "Verification steps that checked a draft", registry=r)
        self.draft_tokens = Counter(p + "spec_decode_num_draft_tokens",
                                    "Draft tokens proposed along the verified depth (one per "
                                    "depth per step)", registry=r)
        self.accepted_tokens = Counter(p + "spec_decode_num_accepted_tokens",
                                       "Draft tokens accepted", registry=r)
        self.accepted_per_pos = Counter(p + "spec_decode_num_accepted_tokens_per_pos",
                                        "Steps that accepted a draft token at this depth",
                                        ["position"], registry=r)
        for pos in range(max_depth):
            self.accepted_per_pos.labels(position=str(pos))
        self.draft_version = Gauge(p + "draft_version", "Version of the serving draft",
                                   registry=r)
        self.swaps = Counter(p + "draft_hot_swaps", "Drafts swapped in while serving",
                             registry=r)
        self.swap_latency = Histogram(p + "draft_hot_swap_latency_seconds",
                                      "From a draft's publication to the serving loop's next step "
                                      "boundary, where it takes effect",
                                      buckets=_TOKEN_GAP + (5.0, 10.0), registry=r)
        self.rollbacks = Counter(p + "draft_rollbacks",
                                 "Swapped-in drafts the collapse guard rolled back", registry=r)
        self.learner_steps = Gauge(p + "learner_steps", "Online learner steps taken",
                                   registry=r)
        self.learner_loss = Gauge(p + "learner_loss", "Online learner's last loss", registry=r)
        self.learner_sim_acceptance = Gauge(
            p + "learner_sim_acceptance_length",
            "Acceptance length the learner simulates on its last batch", registry=r)
        self.spec_mode = Gauge(p + "spec_mode_info",
                               "Engine new requests go to (1 = this one): the adaptive "
                               "policy's choice for the current window",
                               ["mode", "setting"], registry=r)
        self.adaptive_windows = Counter(p + "adaptive_windows",
                                        "Adaptive windows served, by mode", ["mode"],
                                        registry=r)
        self.compiled_programs = Gauge(p + "compiled_programs",
                                       "Device programs compiled so far (one per step function "
                                       "and shape bucket), by engine", ["mode"], registry=r)
        self.compile_seconds = Gauge(p + "compile_seconds",
                                     "Seconds spent compiling device programs so far, warm-up "
                                     "included, by engine", ["mode"], registry=r)
        self.adaptive_rate = Gauge(p + "adaptive_tokens_per_second",
                                   "Measured tokens/s per mode (moving average) at the load "
                                   "of the last window", ["mode"], registry=r)
