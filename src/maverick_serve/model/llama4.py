"""The whole Llama 4 model: text stack, optional vision tower and projector, image-feature merge."""

from __future__ import annotations

import torch
from torch import nn

from maverick_serve.config.model import ModelSpec
from maverick_serve.model.attention import ForwardBatch, PagedKVCache
from maverick_serve.model.cpu_gemm import cpu_gemm_supported
from maverick_serve.model.layers import rope_inverse_frequencies
from maverick_serve.model.text import CausalLM
from maverick_serve.model.vision import MultiModalProjector, VisionModel, vision_rope_frequencies


class Llama4Model(nn.Module):
    """Parameter names equal `Llama4ForConditionalGeneration`'s checkpoint names."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.language_model = CausalLM(spec.text)
        self.vision_model: VisionModel | None = None
        self.multi_modal_projector: MultiModalProjector | None = None
        if spec.vision is not None:
            self.vision_model = VisionModel(spec.vision)
            self.multi_modal_projector = MultiModalProjector(spec.vision, spec.text.hidden_size)

    def materialize_buffers(self, device: torch.device) -> None:
        """Recompute non-persistent buffers (models are built on the meta device, then loaded)."""
        self.language_model.model.rotary_emb.inv_freq = rope_inverse_frequencies(self.spec.text).to(device)
        if self.vision_model is not None and self.spec.vision is not None:
            self.vision_model.rope_freqs = vision_rope_frequencies(self.spec.vision).to(device)

    def pack_cpu_gemms(self) -> bool:
        """Route the text stack's linear layers through oneDNN with prepacked weights (`cpu_gemm`);
        call after loading. Local routed experts are packed too; remote ones are not ours to pack.
        Returns False (nothing changed) where oneDNN cannot run this device and dtype."""
        if not cpu_gemm_supported(self.device, self.dtype):
            return False
        for module in self.language_model.modules():
            pack = getattr(module, "pack_cpu_gemms", None)
            if pack is not None:
                pack()
        return True

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [N, 3, t, t] → text-width features [N * tokens_per_tile, hidden]."""
        if self.vision_model is None or self.multi_modal_projector is None:
            raise ValueError("this checkpoint is text-only (Llama4ForCausalLM); it cannot take images")
        feats = self.vision_model(pixel_values.to(self.device))
        return self.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))

    def embed(
        self,
        token_ids: torch.Tensor,
        image_rows: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features written over the `<|patch|>` rows `image_rows`."""
        embeds = self.language_model.embed(token_ids)
        if image_rows is not None and image_features is not None and image_rows.numel():
            embeds = embeds.index_copy(0, image_rows, image_features.to(embeds.dtype))
        return embeds

    def forward(self, embeds: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        return self.language_model(embeds, batch, cache)
