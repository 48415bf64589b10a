"""Resolve `model.path`: a given checkpoint, or the tiny preset built once into the cache folder.

Building writes into a temporary sibling folder and renames it into place, so replicas or
processes racing to build the same checkpoint never see a half-written one.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.config.presets import preset
from maverick_serve.model.make_model import TEXT_ONLY_SUBDIR, make_model


def built_model_dir(cache_dir: Path, preset_name: str, seed: int) -> Path:
    return Path(cache_dir).resolve() / f"{preset_name}-seed{seed}"


def ensure_model(config: ClusterConfig, log: bool = True) -> ClusterConfig:
    """Return a copy of `config` whose model.path is absolute and holds a checkpoint."""
    src = config.model
    if src.path is not None:
        path = Path(src.path).resolve()
        if not (path / "config.json").is_file():
            raise ValueError(f"model.path {path} has no config.json (a Hugging Face checkpoint folder)")
    else:
        path = built_model_dir(src.cache_dir, src.preset, src.seed)
        if not (path / "model.safetensors").is_file():
            if log:
                print(
                    f"building the {src.preset} Llama 4 checkpoint in {path} (seed {src.seed}) ...",
                    flush=True,
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
            try:
                make_model(preset(src.preset), tmp, seed=src.seed, text_only_variant=True)
                # Another process may have finished first: its checkpoint is identical.
                with contextlib.suppress(OSError):
                    tmp.rename(path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if src.text_only:
            path = path / TEXT_ONLY_SUBDIR
    return config.model_copy(update={"model": src.model_copy(update={"path": path})})
