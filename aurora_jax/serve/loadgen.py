"""A load generator for an OpenAI-compatible server: Poisson arrivals, streamed completions.

Each request is sent at its arrival time (exponential gaps at `rate` requests/s, seeded) by
the official `openai` async client and streamed; per request it records the time to the first
token, the mean gap between tokens after it ((end - first) / (tokens - 1)), the end-to-end
latency, and what the server's usage reports (tokens, acceptance length, draft version,
the speculation setting that served it).
`summarize` gives throughput and latency percentiles; the rows keep the time order, so
acceptance can be followed over the run.
"""

from __future__ import annotations

import asyncio
import collections
import time

import numpy as np


async def _one(client, model: str, prompt: str, max_tokens: int, t0: float) -> dict:
    sent = time.perf_counter()
    first = None
    usage = None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, stream=True,
                                             stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage else 0
    extra = usage.model_extra if usage else {}
    first = first or end
    return {"sent_s": sent - t0, "ttft_s": first - sent, "e2e_s": end - sent,
            "itl_s": (end - first) / (tokens - 1) if tokens > 1 else None, "tokens": tokens,
            "acceptance_length": extra.get("acceptance_length"),
            "target_forwards": extra.get("target_forwards"),
            "draft_version": extra.get("draft_version"),
            "speculation": extra.get("speculation"), "done_s": end - t0}


def scrape(url: str, api_key: str | None = None) -> dict[str, float]:
    """The server's /metrics, parsed by prometheus_client: sample name (with its labels, as
    `name{k=v,...}` sorted by key) -> value."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = httpx.get(url.rstrip("/") + "/metrics", headers=headers).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


async def drive(url: str, model: str, prompts: list[str], *, rate: float, max_tokens: int,
                seed: int = 0, api_key: str = "none") -> list[dict]:
    """Sends every prompt once, at Poisson arrival times; rows in arrival order."""
    import openai

    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key,
                                max_retries=0, timeout=600)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(prompts))
    t0 = time.perf_counter()

    async def later(delay: float, prompt: str) -> dict:
        await asyncio.sleep(delay)
        return await _one(client, model, prompt, max_tokens, t0)

    rows = await asyncio.gather(*(later(float(d), p)
                                  for d, p in zip(np.cumsum(gaps), prompts, strict=True)))
    await client.close()
    return list(rows)


def summarize(rows: list[dict]) -> dict:
    """Throughput and latency percentiles over a run's rows."""
    wall = max(r["done_s"] for r in rows) - min(r["sent_s"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)

    def pct(key: str, q: float) -> float | None:
        xs = [r[key] for r in rows if r[key] is not None]
        return float(np.percentile(xs, q)) if xs else None

    forwards = sum(r["target_forwards"] or 0 for r in rows)
    steps = sum((r["target_forwards"] or 1) - 1 for r in rows)
    committed = sum((r["acceptance_length"] or 1.0) * ((r["target_forwards"] or 1) - 1)
                    for r in rows)
    return {"requests": len(rows), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall if wall > 0 else None,
            "ttft_p50_s": pct("ttft_s", 50), "ttft_p99_s": pct("ttft_s", 99),
            "itl_p50_s": pct("itl_s", 50), "itl_p99_s": pct("itl_s", 99),
            "e2e_p50_s": pct("e2e_s", 50), "e2e_p99_s": pct("e2e_s", 99),
            "acceptance_length": committed / steps if steps else None,
            "target_forwards": forwards,
            "speculation": dict(collections.Counter(str(r.get("speculation")) for r in rows))}
