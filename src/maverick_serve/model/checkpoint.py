"""Checkpoint loading by Hugging Face tensor name.

Reads single-file and sharded (`model.safetensors.index.json`) safetensors, maps text-only
(`Llama4ForCausalLM`) names onto the multimodal layout, fuses the split-per-expert naming of
quantisation-friendly checkpoints into the fused expert tensors, and checks every name and
shape before any weight is used, so a bad checkpoint fails with the tensor's name and both shapes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from maverick_serve.config.model import TEXT_ARCH, ModelSpec
from maverick_serve.model.llama4 import Llama4Model

_SPLIT_EXPERT = re.compile(r"^(.*\.feed_forward\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """The checkpoint lacks a tensor, has one of the wrong shape, or one we cannot use."""


def is_routed_expert(name: str) -> bool:
    return ".feed_forward.experts." in name


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {model_dir}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"shards named in model.safetensors.index.json are missing: {missing}")
    return files


def iter_checkpoint_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in _shard_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def _canonical_name(name: str, text_only: bool) -> str:
    if text_only and not name.startswith("language_model."):
        return "language_model." + name
    return name


def read_state_dict(model_dir: Path, spec: ModelSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors under their multimodal names, split experts fused, cast to `dtype`."""
    text_only = spec.architecture == TEXT_ARCH
    state: dict[str, torch.Tensor] = {}
    split: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for raw_name, tensor in iter_checkpoint_tensors(model_dir):
        name = _canonical_name(raw_name, text_only)
        if name.endswith(("weight_scale", "input_scale", "weight_scale_inv")) or tensor.dtype in (
            getattr(torch, "float8_e4m3fn", None),
        ):
            raise CheckpointError(
                f"tensor {raw_name} is FP8-quantised; the native engine loads bf16/fp32 weights "
                "(FP8 weights are not supported yet: convert the checkpoint to bf16)"
            )
        m = _SPLIT_EXPERT.match(name)
        if m:
            split.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = tensor
        else:
            state[name] = tensor.to(dtype)
    num_experts = spec.text.num_local_experts
    for prefix, experts in split.items():
        ids = sorted(experts)
        if ids != list(range(num_experts)):
            missing = sorted(set(range(num_experts)) - set(ids))
            raise CheckpointError(f"{prefix}: split expert tensors missing for experts {missing[:8]}")
        gate_up, down = [], []
        for i in ids:
            parts = experts[i]
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if proj not in parts:
                    raise CheckpointError(f"missing tensor {prefix}.{i}.{proj}.weight")
            # nn.Linear stores [out, in]; the fused layout is [in, out].
            gate_up.append(torch.cat([parts["gate_proj"].t(), parts["up_proj"].t()], dim=1))
            down.append(parts["down_proj"].t())
        state[f"{prefix}.gate_up_proj"] = torch.stack(gate_up).to(dtype)
        state[f"{prefix}.down_proj"] = torch.stack(down).to(dtype)
    return state


def load_model(
    model_dir: Path,
    spec: ModelSpec | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    skip_routed_experts: bool = False,
) -> Llama4Model:
    """Build the model on the meta device and assign the checkpoint's tensors to it.

    `skip_routed_experts` leaves the routed experts unloaded (on meta): with the expert-parallel
    tier they live on expert workers, and engine replicas never hold them.
    """
    model_dir = Path(model_dir)
    spec = spec or ModelSpec.from_pretrained_dir(model_dir)
    dev = torch.device(device)
    with torch.device("meta"):
        model = Llama4Model(spec)
    expected = {
        n: p.shape for n, p in model.named_parameters() if not (skip_routed_experts and is_routed_expert(n))
    }
    state = read_state_dict(model_dir, spec, dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {model_dir} is missing tensors: {missing[:5]}{more}")
    unexpected = sorted(
        n for n in set(state) - set(expected) if not (skip_routed_experts and is_routed_expert(n))
    )
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"checkpoint {model_dir} has tensors this model does not use: {unexpected[:5]}{more}"
        )
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(state[name].shape)} in the checkpoint but the config "
                f"expects {tuple(shape)}"
            )
    model.load_state_dict({n: state[n].to(dev) for n in expected}, strict=False, assign=True)
    model.materialize_buffers(dev)
    return model.eval()
