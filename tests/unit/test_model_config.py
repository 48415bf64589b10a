from __future__ import annotations

import json
from pathlib import Path

import pytest

from maverick_serve.config import ModelConfigError, ModelSpec, preset


@pytest.mark.parametrize("name", ["tiny", "tiny-qknorm", "scout", "maverick"])
def test_preset_round_trips_through_hf_config(name: str) -> None:
    spec = preset(name)
    assert ModelSpec.from_hf(json.loads(json.dumps(spec.to_hf()))) == spec


def test_real_model_numbers() -> None:
    mav, scout = preset("maverick"), preset("scout")
    assert mav.text.num_local_experts == 128 and scout.text.num_local_experts == 16
    assert mav.text.moe_layers == tuple(range(1, 48, 2))
    assert scout.text.moe_layers == tuple(range(48))
    assert mav.text.global_layers == tuple(range(3, 48, 4))
    assert scout.text.use_qk_norm and not mav.text.use_qk_norm
    assert scout.text.max_position_embeddings == 10_485_760
    assert mav.vision is not None and mav.vision.tokens_per_tile == 144


def test_tiny_keeps_every_llama4_feature() -> None:
    t = preset("tiny").text
    assert t.num_hidden_layers >= 8
    assert t.global_layers == (3, 7)
    assert t.moe_layers == (1, 3, 5, 7)
    assert t.num_local_experts == 8 and t.num_experts_per_tok == 1
    assert t.head_dim == 64 and t.attention_chunk_size == 64
    assert preset("tiny-qknorm").text.use_qk_norm and preset("tiny-qknorm").text.rope_scaling is not None


def test_transformers_accepts_our_config() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Llama4Config(**preset("tiny-qknorm").to_hf())
    assert cfg.text_config.layer_types[3] == "full_attention"
    assert cfg.text_config.layer_types[0] == "chunked_attention"
    assert cfg.text_config.rope_parameters["rope_type"] == "llama3"


def _hf(**text_overrides: object) -> dict:
    cfg = preset("tiny").to_hf()
    cfg["text_config"].update(text_overrides)
    return cfg


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"moe_layers": [1, 99]}, "moe_layers"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"sliding_window": 4096}, "text_config.sliding_window"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_bad_text_fields_are_named(overrides: dict, needle: str) -> None:
    with pytest.raises((ModelConfigError, ValueError), match=needle):
        ModelSpec.from_hf(_hf(**overrides))


def test_vision_intermediate_must_match_pixel_shuffle() -> None:
    cfg = preset("tiny").to_hf()
    cfg["vision_config"]["intermediate_size"] = 128
    with pytest.raises(ValueError, match=r"intermediate_size must equal hidden_size / pixel_shuffle_ratio"):
        ModelSpec.from_hf(cfg)


def test_projector_dims_must_agree() -> None:
    cfg = preset("tiny").to_hf()
    cfg["vision_config"]["vision_output_dim"] = 64
    with pytest.raises(ValueError, match="vision_output_dim"):
        ModelSpec.from_hf(cfg)


def test_unknown_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"]}))
    with pytest.raises(ModelConfigError, match="MixtralForCausalLM"):
        ModelSpec.from_pretrained_dir(tmp_path)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match=r"config\.json not found"):
        ModelSpec.from_pretrained_dir(tmp_path)


def test_unknown_preset() -> None:
    with pytest.raises(ModelConfigError, match="unknown preset 'huge'"):
        preset("huge")
