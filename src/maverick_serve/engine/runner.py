"""Turns a scheduled batch into one forward pass: embeddings, image features, paged addressing."""

from __future__ import annotations

import torch

from maverick_serve.engine.kv_cache import GROUPS, KVCacheManager
from maverick_serve.engine.scheduler import ScheduledChunk
from maverick_serve.engine.sequence import Sequence
from maverick_serve.model.attention import CHUNKED_GROUP, ForwardBatch, GroupBatch, PagedKVCache
from maverick_serve.model.llama4 import Llama4Model


class ModelRunner:
    def __init__(self, model: Llama4Model, cache: PagedKVCache, kv: KVCacheManager) -> None:
        self.model = model
        self.cache = cache
        self.kv = kv
        self.device = model.device
        self.block_size = kv.block_size
        self.chunk_size = kv.chunk_size

    def _slots(self, table: list[int | None], start: int, end: int) -> torch.Tensor:
        """Flat cache slots of positions [start, end) through a block table."""
        bs = self.block_size
        first, last = start // bs, (end + bs - 1) // bs
        blocks = table[first:last]
        assert all(b is not None for b in blocks), "positions outside the held blocks"
        base = torch.tensor(blocks, dtype=torch.long) * bs
        slots = (base[:, None] + torch.arange(bs)).flatten()
        return slots[start - first * bs : end - first * bs]

    def _image_rows(self, chunk: ScheduledChunk, row_offset: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        seq = chunk.seq
        if seq.patch_positions.numel() == 0:
            return None
        lo = int(torch.searchsorted(seq.patch_positions, chunk.start))
        hi = int(torch.searchsorted(seq.patch_positions, chunk.end))
        if lo == hi:
            return None
        if seq.image_features is None:
            pixels = torch.cat([img.pixel_values for img in seq.request.images])
            with torch.inference_mode():
                seq.image_features = self.model.encode_images(pixels.to(self.device))
        rows = seq.patch_positions[lo:hi] - chunk.start + row_offset
        return rows, seq.image_features[lo:hi]

    def build_batch(
        self, chunks: list[ScheduledChunk], all_logits: bool = False
    ) -> tuple[ForwardBatch, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        pad_index: list[torch.Tensor] = []
        logits_rows: list[int] = []
        images: list[tuple[torch.Tensor, torch.Tensor]] = []
        qmax = max(c.num_tokens for c in chunks)
        per_group: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {g: [] for g in GROUPS}
        row = 0
        for b, c in enumerate(chunks):
            seq = c.seq
            ids.extend(seq.all_token_ids[c.start : c.end])
            qpos = torch.arange(c.start, c.end)
            positions.append(qpos)
            pad_index.append(b * qmax + torch.arange(c.num_tokens))
            if all_logits:
                logits_rows.extend(range(row, row + c.num_tokens))
            elif c.samples:
                logits_rows.append(row + c.num_tokens - 1)
            img = self._image_rows(c, row)
            if img is not None:
                images.append(img)
            for group in GROUPS:
                table = seq.blocks.tables[group]
                kstart = self.kv.chunk_start(c.start) if group == CHUNKED_GROUP else 0
                keys = self._slots(table, kstart, c.end)
                kpos = torch.arange(kstart, c.end)
                mask = kpos[None, :] <= qpos[:, None]
                if group == CHUNKED_GROUP:
                    mask &= (kpos[None, :] // self.chunk_size) == (qpos[:, None] // self.chunk_size)
                per_group[group].append((self._slots(table, c.start, c.end), keys, mask))
            row += c.num_tokens

        groups = {}
        for group, items in per_group.items():
            kmax = max(k.numel() for _, k, _ in items)
            gather = torch.zeros(len(items), kmax, dtype=torch.long)
            mask = torch.zeros(len(items), 1, qmax, kmax, dtype=torch.bool)
            mask[:, 0, :, 0] = True  # padded query rows attend one key instead of none (no NaN)
            for b, (_, keys, m) in enumerate(items):
                gather[b, : keys.numel()] = keys
                mask[b, 0, : m.shape[0], :] = False
                mask[b, 0, : m.shape[0], : m.shape[1]] = m
            groups[group] = GroupBatch(
                slot_mapping=torch.cat([s for s, _, _ in items]).to(self.device),
                gather_index=gather.to(self.device),
                mask=mask.to(self.device),
            )
        batch = ForwardBatch(
            positions=torch.cat(positions).to(self.device),
            query_pad_index=torch.cat(pad_index).to(self.device),
            num_seqs=len(chunks),
            max_query_len=qmax,
            groups=groups,
            logits_index=torch.tensor(logits_rows, dtype=torch.long, device=self.device),
        )
        return batch, torch.tensor(ids, dtype=torch.long, device=self.device), images

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk], all_logits: bool = False) -> torch.Tensor:
        """Run the chunks; returns fp32 logits for sampling rows (or every row with all_logits)."""
        batch, ids, images = self.build_batch(chunks, all_logits)
        rows = torch.cat([r for r, _ in images]).to(self.device) if images else None
        feats = torch.cat([f for _, f in images]) if images else None
        embeds = self.model.embed(ids, rows, feats)
        return self.model(embeds, batch, self.cache)

    @staticmethod
    def drop_image_features_if_done(seq: Sequence) -> None:
        done = seq.patch_positions.numel() and seq.num_computed > int(seq.patch_positions[-1])
        if seq.image_features is not None and done:
            seq.image_features = None
