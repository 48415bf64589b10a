"""Keys of stored KV blocks: namespaced by model fingerprint, layout version and layer group.

A block is only ever used by the model, weights and layout that wrote it: the fingerprint hashes
the model config, the compute dtype and the weights (each shard's size, safetensors header and
first/last MiB — cheap even for 800 GB checkpoints, and different for any re-trained or
re-seeded weights).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from maverick_serve.config.model import ModelSpec

LAYOUT_VERSION = 1  # bump when what a block holds changes (layers, shape, group rules)
_SAMPLE = 1 << 20


def model_fingerprint(model_dir: Path, spec: ModelSpec, dtype: str) -> str:
    h = hashlib.sha256()
    h.update(spec.model_dump_json().encode())
    h.update(dtype.encode())
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        size = shard.stat().st_size
        h.update(shard.name.encode() + struct.pack("<Q", size))
        with shard.open("rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            h.update(f.read(min(header_len, 16 << 20)))
            h.update(f.read(_SAMPLE))
            f.seek(max(0, size - _SAMPLE))
            h.update(f.read(_SAMPLE))
    return h.hexdigest()[:32]


def block_key(prefix: str, fingerprint: str, group: str, block_hash: bytes) -> str:
    return f"{prefix}:{fingerprint}:v{LAYOUT_VERSION}:{group}:{block_hash.hex()}"
