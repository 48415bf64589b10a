"""Checkpoint writing and loading: determinism, sharding, split experts, clear errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from maverick_serve.config import preset
from maverick_serve.model.checkpoint import CheckpointError, load_model
from maverick_serve.model.make_model import make_model

EXPERT = "language_model.model.layers.1.feed_forward.experts"


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(tmp_path: Path, tiny_model: Path) -> None:
    # A separate process, so nothing cached in this one can make the files agree.
    code = (
        "from pathlib import Path; from maverick_serve.config import preset; "
        "from maverick_serve.model.make_model import make_model; "
        f"make_model(preset('tiny'), Path({str(tmp_path / 'again')!r}), seed=1234, text_only_variant=True)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert _digest(tmp_path / "again") == _digest(tiny_model)
    make_model(preset("tiny"), tmp_path / "other", seed=1235)
    assert _digest(tmp_path / "other")["model.safetensors"] != _digest(tiny_model)["model.safetensors"]


def test_checkpoint_files_and_names(tiny_model: Path) -> None:
    names = set(load_file(str(tiny_model / "model.safetensors")))
    for expected in [
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",
        "language_model.model.layers.3.self_attn.q_proj.weight",
        f"{EXPERT}.gate_up_proj",
        f"{EXPERT}.down_proj",
        "language_model.model.layers.1.feed_forward.router.weight",
        "language_model.model.layers.1.feed_forward.shared_expert.gate_proj.weight",
        "language_model.model.layers.0.feed_forward.gate_proj.weight",
        "vision_model.patch_embedding.linear.weight",
        "multi_modal_projector.linear_1.weight",
    ]:
        assert expected in names
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "generation_config.json",
        "text-only/config.json",
        "text-only/model.safetensors",
    ]:
        assert (tiny_model / f).is_file(), f
    text_names = set(load_file(str(tiny_model / "text-only" / "model.safetensors")))
    assert "model.embed_tokens.weight" in text_names and "lm_head.weight" in text_names
    assert not any(n.startswith("vision_model") for n in text_names)
    assert json.loads((tiny_model / "text-only" / "config.json").read_text())["architectures"] == [
        "Llama4ForCausalLM"
    ]


def _copy_with(tiny_model: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    dst.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (dst / f).write_bytes((tiny_model / f).read_bytes())
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(tiny_model: Path, tmp_path: Path) -> None:
    state = load_file(str(tiny_model / "model.safetensors"))
    del state["language_model.model.layers.5.self_attn.k_proj.weight"]
    with pytest.raises(
        CheckpointError, match=r"missing tensors: \['language_model.model.layers.5.self_attn.k_proj"
    ):
        load_model(_copy_with(tiny_model, tmp_path / "m", state))


def test_wrong_shape_names_tensor_and_both_shapes(tiny_model: Path, tmp_path: Path) -> None:
    state = load_file(str(tiny_model / "model.safetensors"))
    state["language_model.model.norm.weight"] = torch.ones(255)
    with pytest.raises(
        CheckpointError, match=r"language_model.model.norm.weight has shape \(255,\) .* expects \(256,\)"
    ):
        load_model(_copy_with(tiny_model, tmp_path / "m", state))


def test_unexpected_tensor_is_named(tiny_model: Path, tmp_path: Path) -> None:
    state = load_file(str(tiny_model / "model.safetensors"))
    state["language_model.model.layers.0.mystery.weight"] = torch.ones(2)
    with pytest.raises(CheckpointError, match="mystery"):
        load_model(_copy_with(tiny_model, tmp_path / "m", state))


def test_sharded_and_split_expert_checkpoint_loads_identically(tiny_model: Path, tmp_path: Path) -> None:
    """The FP8-style split-per-expert names, spread over two shards with an index."""
    state = load_file(str(tiny_model / "model.safetensors"))
    split: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith("experts.gate_up_proj"):
            prefix = name.removesuffix(".gate_up_proj")
            inter = t.shape[2] // 2
            for e in range(t.shape[0]):
                split[f"{prefix}.{e}.gate_proj.weight"] = t[e, :, :inter].t().contiguous()
                split[f"{prefix}.{e}.up_proj.weight"] = t[e, :, inter:].t().contiguous()
        elif name.endswith("experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            for e in range(t.shape[0]):
                split[f"{prefix}.{e}.down_proj.weight"] = t[e].t().contiguous()
        else:
            split[name] = t
    dst = tmp_path / "sharded"
    dst.mkdir()
    (dst / "config.json").write_bytes((tiny_model / "config.json").read_bytes())
    names = sorted(split)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, part in halves.items():
        save_file({n: split[n] for n in part}, str(dst / fname))
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = load_model(tiny_model), load_model(dst)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb), na


def test_missing_split_expert_is_named(tiny_model: Path, tmp_path: Path) -> None:
    state = load_file(str(tiny_model / "model.safetensors"))
    gate_up = state.pop(f"{EXPERT}.gate_up_proj")
    down = state.pop(f"{EXPERT}.down_proj")
    for e in range(7):  # expert 7 missing
        state[f"{EXPERT}.{e}.gate_proj.weight"] = gate_up[e, :, :512].t().contiguous()
        state[f"{EXPERT}.{e}.up_proj.weight"] = gate_up[e, :, 512:].t().contiguous()
        state[f"{EXPERT}.{e}.down_proj.weight"] = down[e].t().contiguous()
    with pytest.raises(CheckpointError, match=r"split expert tensors missing for experts \[7\]"):
        load_model(_copy_with(tiny_model, tmp_path / "m", state))


def test_bf16_load(tiny_model: Path) -> None:
    model = load_model(tiny_model, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.language_model.model.layers[1].feed_forward.experts.gate_up_proj.dtype == torch.bfloat16


def test_no_weights(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_model / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights"):
        load_model(tmp_path)
