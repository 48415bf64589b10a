"""Block values over Mooncake's distributed store (RDMA on GPU clusters; TCP where no NIC has it).

Optional: needs `pip install mooncake-transfer-engine` on the nodes and a `mooncake_master`
(started with `--enable_http_metadata_server=true`) reachable from every replica. Redis keeps
the index: the store writes a marker under each key after `put_many`, so `exists` and TTL/LRU
eviction stay Redis' job; Mooncake evicts on its own and an evicted value reads as a miss.

Not run on the CPU dev machines (the wheel needs RDMA user libraries); its integration test is
marked `mooncake` and skips unless `mooncake.store` imports and MAVERICK_MOONCAKE_MASTER is set.
"""

from __future__ import annotations

import threading
from typing import Any

from maverick_serve.config.kvtier import MooncakeBulkConfig
from maverick_serve.kvtier.store import KVStoreError, StoreValue, value_bytes
from maverick_serve.kvtier.transport import BulkTransport


class MooncakeBulkTransport(BulkTransport):
    holds_index = False

    def __init__(self, cfg: MooncakeBulkConfig) -> None:
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as exc:
            raise KVStoreError(
                "kvtier.store.bulk.type is 'mooncake' but the mooncake package is not installed "
                "(pip install mooncake-transfer-engine)"
            ) from exc
        self.cfg = cfg
        self.store: Any = MooncakeDistributedStore()
        rc = self.store.setup(
            cfg.local_hostname,
            cfg.metadata_server,
            cfg.global_segment_bytes,
            cfg.local_buffer_bytes,
            cfg.protocol,
            cfg.rdma_devices,
            cfg.master_server,
        )
        if rc != 0:
            raise KVStoreError(f"mooncake setup failed (code {rc}; master {cfg.master_server})")
        # The binding releases the GIL inside transfers but a store object is not documented as
        # safe for concurrent calls from several threads: serialise them.
        self.lock = threading.Lock()

    def put_many(self, items: list[tuple[str, StoreValue]], ttl_s: int | None) -> None:
        with self.lock:
            for key, parts in items:
                value = value_bytes(parts)
                rc = self.store.put(key, value)
                if rc != 0:
                    raise KVStoreError(f"mooncake put failed (code {rc}) for {len(value)} bytes")

    def get_many(self, keys: list[str]) -> list[bytes | bytearray | None]:
        with self.lock:
            present = self.store.batch_is_exist(keys)
            out: list[bytes | bytearray | None] = []
            for key, flag in zip(keys, present, strict=True):
                value = self.store.get(key) if flag == 1 else b""
                out.append(value or None)  # Mooncake answers b"" for a missing or evicted key
            return out

    def delete_many(self, keys: list[str]) -> None:
        with self.lock:
            for key in keys:
                self.store.remove(key)

    def close(self) -> None:
        self.store.close()
