"""What the native engine asks of the tiers that live outside it: an external KV tier and routed
experts on other workers. The engine defines these contracts and is handed implementations
(`kvtier.native_connector.KVTierConnector`, `experts.tier.ExpertTier`), so the engine never imports the
tiers and the tiers may build on the engine's KV-cache types; `serving.engine_factory` wires them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from maverick_serve.config.model import ModelSpec
    from maverick_serve.engine.native.kv_cache import KVCacheManager
    from maverick_serve.engine.native.sequence import Sequence
    from maverick_serve.model.attention import PagedKVCache
    from maverick_serve.model.llama4 import Llama4Model


class KVTierHooks(ABC):
    """An external KV tier seen from the engine loop.

    Every method is called on the engine loop's thread, between model steps:
    - `extend_prefix(seq, local_hit)` once on admission, after the local prefix-cache lookup
      found `local_hit` tokens. It may allocate `seq`'s blocks and fill them from the tier; it
      returns the tokens now cached, or 0 to keep the local hit. A store failure is a miss, never
      an exception.
    - `after_step(seq, before)` after each step that computed prompt tokens of `seq` (`before`:
      tokens computed before that step). It copies what must be stored and queues it; it never
      waits on the store.
    - `flush(timeout_s)` waits until queued stores are written (drain, shutdown, tests).
    - `stats()` the counters `EngineStats.kvtier` reports.
    - `close()` last.
    `shared` says whether every replica reads the same store (routers then score tier hits for
    all replicas). `tier_events`, when a state publisher sets it, receives the 64-bit hash of each
    global-layer block queued for storing.
    """

    shared: bool = False
    tier_events: deque[bytes] | None = None

    @abstractmethod
    def extend_prefix(self, seq: Sequence, local_hit: int) -> int: ...

    @abstractmethod
    def after_step(self, seq: Sequence, before: int) -> None: ...

    @abstractmethod
    def flush(self, timeout_s: float = 30.0) -> None: ...

    @abstractmethod
    def stats(self) -> dict[str, int | float]: ...

    @abstractmethod
    def close(self) -> None: ...


# Builds the tier for one engine once its KV cache exists: (spec, KV dtype, block manager, cache).
KVTierFactory = Callable[["ModelSpec", str, "KVCacheManager", "PagedKVCache"], KVTierHooks]


class ExpertHooks(ABC):
    """Routed experts served outside the engine process (the disaggregated expert tier).

    - `attach(model)` once, before the first step, on a model loaded without its routed experts:
      replaces each MoE layer's expert executor with one that reaches the expert workers.
    - `end_step()` after every model step, on the engine loop's thread: load statistics, and a
      rebalance when the tier decides one is due, or the switch back to a replaced worker once
      it has loaded its experts (both finish before the next step starts).
      Returns the seconds the step's MoE layers spent waiting on the expert workers (traces).
    - `stats()` the expert fields of `EngineStats` (`expert_imbalance`, `expert_tokens`,
      `expert_rebalances_total`, `expert_failovers_total`, `expert_replacements_total`).
    - `shutdown()` stops the workers this engine uses (tests and benchmarks that own the tier).
    - `release()` when the engine stops serving (its replica is stopped): gives up its place in
      a tier that follows the engines (the tier stops workers no engine uses any more); a tier
      shared by every engine replica stays up. Never raises.
    """

    def release(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """See the class contract."""

    @abstractmethod
    def attach(self, model: Llama4Model) -> None: ...

    @abstractmethod
    def end_step(self) -> float: ...

    @abstractmethod
    def stats(self) -> dict[str, object]: ...

    @abstractmethod
    def shutdown(self) -> None: ...


# Builds the expert tier for a model spec; the engine then loads the model without routed experts.
ExpertTierFactory = Callable[["ModelSpec"], ExpertHooks]
