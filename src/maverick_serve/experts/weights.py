"""Read routed-expert weights of chosen (layer, expert)s straight from a checkpoint.

Expert workers load only their share, sliced out of the fused tensors (`experts.gate_up_proj`
[E, hidden, 2·inter], `experts.down_proj` [E, inter, hidden]) or read from the split-per-expert
names, without materialising the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from maverick_serve.config.model import TEXT_ARCH, ModelSpec


class ExpertWeightReader:
    def __init__(self, model_dir: Path, spec: ModelSpec) -> None:
        self.model_dir = Path(model_dir)
        self.prefix = "model." if spec.architecture == TEXT_ARCH else "language_model.model."
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = (
                [self.model_dir / "model.safetensors"]
                if (self.model_dir / "model.safetensors").is_file()
                else sorted(self.model_dir.glob("*.safetensors"))
            )
            weight_map = {}
            for f in files:
                with safe_open(str(f), framework="pt") as handle:
                    weight_map.update({n: f.name for n in handle.keys()})  # noqa: SIM118
        self.weight_map = weight_map

    def _slice(self, name: str, index: int) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise KeyError(name)
        with safe_open(str(self.model_dir / file), framework="pt") as handle:
            return handle.get_slice(name)[index]

    def _tensor(self, name: str) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise KeyError(f"checkpoint {self.model_dir} has no tensor {name}")
        with safe_open(str(self.model_dir / file), framework="pt") as handle:
            return handle.get_tensor(name)

    def read(self, layer: int, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [hidden, 2·inter], down [inter, hidden]) of one expert."""
        base = f"{self.prefix}layers.{layer}.feed_forward.experts"
        if f"{base}.gate_up_proj" in self.weight_map:
            gate_up = self._slice(f"{base}.gate_up_proj", expert)
            down = self._slice(f"{base}.down_proj", expert)
        else:  # split-per-expert naming (nn.Linear layout [out, in])
            gate = self._tensor(f"{base}.{expert}.gate_proj.weight")
            up = self._tensor(f"{base}.{expert}.up_proj.weight")
            gate_up = torch.cat([gate.t(), up.t()], dim=1)
            down = self._tensor(f"{base}.{expert}.down_proj.weight").t()
        return gate_up.to(dtype).contiguous(), down.to(dtype).contiguous()
