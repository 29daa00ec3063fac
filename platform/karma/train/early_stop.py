"""When to stop training: a rule on the validation curve that one noisy epoch cannot fool.

With a few hundred validation users, one epoch's NDCG@10 moves by about +-0.008 from noise
alone. Counted on the raw curve, a lucky epoch sets a best that the next few cannot beat, and
patience runs out while the model is still improving; an unlucky dip does the same to the count.
So the stop watches the curve's trailing mean over `window` epochs (noise shrinks about as
1/sqrt(window)), never before `min_epochs`. The weights kept are still those of the best raw
epoch: smoothing decides only when to stop, not which epoch is tested.

Everything here is a function of the curve, which travels in the checkpoint, so a resumed run
decides exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StopRule:
    patience: int = 0  # epochs without a new high of the smoothed curve before stopping (0 = never)
    window: int = 1  # epochs in the trailing mean (1 = the raw curve)
    min_epochs: int = 0  # never stop before this many epochs

    def smoothed(self, curve: list[float]) -> np.ndarray:
        """The trailing mean of the last `window` epochs at each epoch (fewer at the start)."""
        x = np.asarray(curve, dtype=np.float64)
        sums = np.cumsum(np.concatenate([[0.0], x]))
        ends = np.arange(1, len(x) + 1)
        starts = np.maximum(ends - self.window, 0)
        return (sums[ends] - sums[starts]) / (ends - starts)

    def stale(self, curve: list[float]) -> int:
        """Epochs since the smoothed curve last set a strictly new high (0 on an empty curve)."""
        if not curve:
            return 0
        s = self.smoothed(curve)
        return len(s) - 1 - int(np.argmax(s))  # argmax: the first epoch reaching the maximum

    def should_stop(self, curve: list[float]) -> bool:
        return bool(self.patience and len(curve) >= self.min_epochs and self.stale(curve) >= self.patience)

    def describe(self) -> str:
        if not self.patience:
            return "no early stopping"
        smooth = f"its {self.window}-epoch trailing mean" if self.window > 1 else "it"
        floor = f", after at least {self.min_epochs} epochs" if self.min_epochs else ""
        return f"stop when validation NDCG@10 ({smooth}) has not risen for {self.patience} epochs{floor}"
