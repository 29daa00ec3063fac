"""A progress line every N steps: losses, tokens/s, examples/s and ETA."""

from __future__ import annotations

import time


class Progress:
    def __init__(self, total_steps: int, every: int, log=print, prefix: str = ""):
        self.total, self.every, self.log, self.prefix = total_steps, every, log, prefix
        self.start = self.window_start = time.time()
        self.tokens = self.examples = 0
        self.done_at_start = None

    def update(self, step: int, parts: dict, examples: int) -> dict[str, float] | None:
        """Call after each optimizer step; returns the logged numbers on a logging step."""
        if self.done_at_start is None:
            self.done_at_start = step - 1
        self.tokens += int(parts.get("n_tokens", 0))
        self.examples += examples
        if not self.every or (step % self.every and step != self.total):
            return None
        now = time.time()
        span = max(now - self.window_start, 1e-9)
        rate = (step - self.done_at_start) / max(now - self.start, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        stats = {k: float(v) for k, v in parts.items() if k != "n_tokens"}
        stats.update(tokens_per_s=self.tokens / span, examples_per_s=self.examples / span)
        losses = " ".join(f"{k}={v:.4f}" for k, v in stats.items() if k.startswith("loss") or k == "tau")
        self.log(f"{self.prefix}step {step}/{self.total} {losses} "
                 f"tok/s={stats['tokens_per_s']:.0f} ex/s={stats['examples_per_s']:.1f} eta={eta:.0f}s")
        self.tokens = self.examples = 0
        self.window_start = now
        return stats
