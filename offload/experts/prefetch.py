"""The prefetcher: predicts which experts a layer will use and starts copying those not resident into its cache
slots, and scores each prediction against what the layer then used.

- A decode step: at the step boundary (`after_step`), the experts each layer used in the step are the prediction
  for the next step (consecutive tokens share many experts); their copies run on the side stream while the next
  step is queued. Nothing is read back inside the step.
- A prefill chunk that decides per call: after layer L's attention, the current hidden state goes through the
  routers of the next MoE layers (`after_attention`), and the predicted experts are copied before those layers run.

Where prefetch is decided automatically the prefetcher also runs inactive (copying nothing): it still predicts
and scores at every step boundary, so the precision that decides whether copies pay is measured whether or not
they are made (`PrefetchReview`, re-evaluated at step boundaries).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .cost import REVIEW_MIN_CANDIDATES, PrefetchChoice, PrefetchPrice, review_prefetch

Router = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # h [T, H] -> (topk_ids, topk_weights)


class PrefetchTarget(Protocol):
    """What a layer's hybrid backend offers the prefetcher."""

    def is_resident(self, expert: int) -> bool: ...
    # True if a copy was started; wait=False: only if a staging buffer is free now
    def prefetch(self, expert: int, protected: set[int], wait: bool = True) -> bool: ...
    @property
    def cache_slots(self) -> int: ...


@dataclass
class PrefetchStats:
    predicted: int = 0  # experts predicted for a layer (summed over steps)
    useful: int = 0  # predicted experts the layer then used
    needed: int = 0  # experts the layers used, over steps that had a prediction
    copies: int = 0  # copies started by the prefetcher
    wasted_copies: int = 0  # prefetched experts the layer did not use on that step
    wasted_bytes: int = 0

    @property
    def precision(self) -> float:
        return self.useful / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.useful / self.needed if self.needed else 0.0


@dataclass(frozen=True)
class CopyCandidates:
    """What decode prefetch would copy, scored: at each step boundary, the step's experts that are not resident
    (as many as the layer has slots), and how many of them the next step used. used / scored is the precision
    that decides whether the copies pay (cost.review_prefetch)."""

    scored: int = 0
    used: int = 0

    def __sub__(self, other: "CopyCandidates") -> "CopyCandidates":
        return CopyCandidates(self.scored - other.scored, self.used - other.used)

    @property
    def precision(self) -> float:
        return self.used / self.scored if self.scored else 0.0


class Prefetcher:
    def __init__(self, moe_layers: list[int], routers: dict[int, Router], targets: dict[int, PrefetchTarget],
                 expert_bytes: int, lookahead: int = 1):
        self.moe_layers = moe_layers
        self.routers, self.targets = routers, targets
        self.expert_bytes = expert_bytes
        self.lookahead = lookahead
        self.next_of = {layer: moe_layers[i + 1 : i + 1 + lookahead] for i, layer in enumerate(moe_layers)}
        self.predicted: dict[int, set[int]] = {}  # layer -> experts predicted for its coming call
        self.copied: dict[int, set[int]] = {}  # layer -> experts the prefetcher copied for that call
        self.stats: dict[int, PrefetchStats] = {layer: PrefetchStats() for layer in moe_layers}
        self.active = True  # False: predict and score only, copy nothing
        self.candidates: dict[int, set[int]] = {}  # layer -> its copy candidates for the coming decode step
        self.outcomes = CopyCandidates()  # since load (not reset with the stats: reviews take differences)

    def after_attention(self, layer: int, h: torch.Tensor) -> None:
        """h [T, H]: the MoE input of `layer`. Predict and start copies for the next MoE layers."""
        if not self.active:
            return
        for target_layer in self.next_of.get(layer, ()):
            target = self.targets[target_layer]
            ids, _ = self.routers[target_layer](h)
            experts, counts = ids.reshape(-1).unique(return_counts=True)
            # Most-used first, and no more than the slots can hold: a prefill predicts nearly every expert.
            ranked = experts[counts.argsort(descending=True, stable=True)].tolist()
            predicted = set(ranked)
            self.predicted[target_layer] = predicted
            copied = self.copied.setdefault(target_layer, set())
            budget = target.cache_slots
            for expert in ranked:
                if budget == 0:
                    break
                if target.is_resident(expert):
                    continue
                if target.prefetch(expert, protected=predicted):
                    copied.add(expert)
                    self.stats[target_layer].copies += 1
                budget -= 1

    def after_step(self, layer: int, ranked: list[int]) -> None:
        """A decode step used `ranked` (most-used first) at `layer`: score the prediction made for it, predict that
        the next step uses them again, and start copies of the ones not resident while staging buffers are free
        (never waiting for one: the step boundary does not block)."""
        used = set(ranked)
        candidates = self.candidates.pop(layer, None)
        if candidates is not None:
            self.outcomes = CopyCandidates(self.outcomes.scored + len(candidates),
                                           self.outcomes.used + len(candidates & used))
        self.observe(layer, used)
        self.predicted[layer] = used
        target = self.targets[layer]
        wanted = [e for e in ranked if not target.is_resident(e)][: target.cache_slots]
        self.candidates[layer] = set(wanted)
        if not self.active:
            return
        copied = self.copied.setdefault(layer, set())
        for expert in wanted:
            if not target.prefetch(expert, protected=used, wait=False):
                break
            copied.add(expert)
            self.stats[layer].copies += 1

    def observe(self, layer: int, used: set[int]) -> None:
        """The experts `layer` actually used on this call: score the prediction made for it."""
        predicted = self.predicted.pop(layer, None)
        copied = self.copied.pop(layer, set())
        self.candidates.pop(layer, None)  # a decode step's candidates are scored by the next step only
        if predicted is None:
            return
        s = self.stats[layer]
        s.predicted += len(predicted)
        s.needed += len(used)
        s.useful += len(predicted & used)
        wasted = len(copied - used)
        s.wasted_copies += wasted
        s.wasted_bytes += wasted * self.expert_bytes


class PrefetchReview:
    """The automatic prefetch choice, reviewed at step boundaries from the precision the prefetcher measures: once
    at least `min_candidates` copy candidates were scored since the last review, their precision against the
    break-even hit rate of `price` turns the prefetcher on or off (cost.review_prefetch, with hysteresis)."""

    def __init__(self, prefetcher: Prefetcher, choice: PrefetchChoice, price: PrefetchPrice,
                 min_candidates: int = REVIEW_MIN_CANDIDATES):
        self.prefetcher, self.choice, self.price = prefetcher, choice, price
        self.min_candidates = min_candidates
        self.seen = prefetcher.outcomes  # the totals at the last review
        prefetcher.active = choice.on

    def review(self) -> PrefetchChoice:
        window = self.prefetcher.outcomes - self.seen
        if window.scored < self.min_candidates:
            return self.choice
        self.seen = self.prefetcher.outcomes
        on = review_prefetch(self.choice.on, window.precision, window.scored, self.price.break_even,
                             self.min_candidates)
        self.choice = PrefetchChoice(on, f"measured precision {window.precision:.2f} over {window.scored} "
                                         f"predictions against a break-even of {self.price.break_even:.2f} "
                                         f"({self.price.numbers()})")
        self.prefetcher.active = on
        return self.choice
