"""What an engine measured over its recent steps, for admission control in the routers.

Each step is recorded as a `StepRecord`. From a window of them come the rates a router predicts
queue waits from, and a model of step time as a function of batch size:
`step(b) = step_base_s + step_per_seq_s * b`.
The model matters under a rising load: a mean step time measured while a few requests ran
under-predicts the steps of the batch that a burst is about to build, and requests admitted on it
miss their deadlines together (`routing/admission.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class StepRecord(NamedTuple):
    end: float  # monotonic time the step ended
    prompt_tokens: int  # prompt tokens computed
    generated: int  # tokens sampled (one per sequence that decoded)
    busy_s: float  # the step and the engine loop's work since the previous one
    finished: int  # requests that finished
    seqs: int = 0  # sequences in the step (decoding or prefilling: the seats taken)
    seat_s: float = 0.0  # seconds the finished requests held a seat (scheduled → finished)


# Below this much step time in the window a rate is noise: report it as unknown (0).
MIN_BUSY_S = 0.5
# The batch sizes seen must span at least this ratio (largest / smallest) for the slope of step
# time over batch size to be fitted; below it the slope is not identifiable and step time is
# taken as proportional to the batch (which over-predicts small batches: the safe side).
MIN_BATCH_SPAN = 1.5

UNMEASURED = {
    "prefill_tokens_per_s": 0.0,
    "step_s": 0.0,
    "finished_per_s": 0.0,
    "step_base_s": 0.0,
    "step_per_seq_s": 0.0,
    "batch_p90": 0.0,
}


def step_model(rates: Sequence[StepRecord]) -> tuple[float, float]:
    """(base seconds, seconds per sequence) of a decode step, fitted by least squares over the
    window's steps with prompt tokens as a second regressor (a step that also prefills is longer
    for its prompt, not for its batch). The base includes the prompt work of the window's mean
    step: under a sustained load every step also prefills some arrivals, and that slows the
    decode of every request in the batch. Both are ≥ 0; (0, 0) without decoding steps."""
    decoding = [r for r in rates if r.generated > 0]
    if not decoding:
        return 0.0, 0.0
    batch = np.array([r.generated for r in decoding], dtype=np.float64)
    prompt = np.array([r.prompt_tokens for r in decoding], dtype=np.float64)
    busy = np.array([r.busy_s for r in decoding], dtype=np.float64)
    mean_prompt = float(prompt.mean())
    if batch.max() >= MIN_BATCH_SPAN * batch.min():
        design = np.column_stack([np.ones_like(batch), batch, prompt])
        (base, per_seq, per_token), *_ = np.linalg.lstsq(design, busy, rcond=None)
        if base >= 0 and per_seq > 0:
            return float(base + max(0.0, per_token) * mean_prompt), float(per_seq)
    # Through the origin: all of a step's time is charged to its sequences and prompt tokens.
    design = np.column_stack([batch, prompt])
    (per_seq, per_token), *_ = np.linalg.lstsq(design, busy, rcond=None)
    if per_seq <= 0:  # prompt tokens explain it all (tiny batches next to long prefills)
        return 0.0, float(busy.sum() / batch.sum())
    return float(max(0.0, per_token) * mean_prompt), float(per_seq)


def finish_rate(rates: Sequence[StepRecord], busy: float) -> float:
    """Requests finished per second of step time. By Little's law where the steps say how long
    the finished requests held their seats: mean seats taken / mean seat time. Counting finishes
    in the window instead under-predicts a burst's drain many times over: requests admitted
    together finish together, so a window that has just seen the first few finish counts a
    fraction of the rate (a 128-request burst here: 0.8/s counted, 5.7/s real)."""
    finished = sum(r.finished for r in rates)
    seat_s = sum(r.seat_s for r in rates)
    seats = sum(r.seqs * r.busy_s for r in rates) / busy
    if finished and seat_s > 0 and seats > 0:
        return seats / (seat_s / finished)
    return finished / busy


def measured_rates(rates: Sequence[StepRecord]) -> dict[str, float]:
    """What admission control predicts queue waits from (0 = not measured yet): prompt tokens per
    second of the steps that computed prompt tokens (all tokens over all step time would mostly
    measure how many decodes were batched: a decode adds one token to a step), the mean step
    time, requests finished per second of step time (not wall time: idle gaps in the window would
    make a busy queue look slow to drain), the step-time model and the 90th percentile of the
    batch (sequences per step)."""
    busy = sum(r.busy_s for r in rates)
    if busy < MIN_BUSY_S:
        return dict(UNMEASURED)
    prefill_s = sum(r.busy_s for r in rates if r.prompt_tokens)
    base, per_seq = step_model(rates)
    batches = sorted(r.generated for r in rates)
    return {
        "prefill_tokens_per_s": sum(r.prompt_tokens for r in rates) / prefill_s if prefill_s else 0.0,
        "step_s": busy / len(rates),
        "finished_per_s": finish_rate(rates, busy),
        "step_base_s": base,
        "step_per_seq_s": per_seq,
        # The batch this replica ran at lately: under a sustained load a request admitted into a
        # momentarily small batch decodes at this one once the next arrivals fill it.
        "batch_p90": float(batches[int(0.9 * (len(batches) - 1))]),
    }
