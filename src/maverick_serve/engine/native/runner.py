"""Turns a scheduled batch into one forward pass: embeddings, image features, paged addressing."""

from __future__ import annotations

import torch

from maverick_serve.engine.native.kv_cache import GROUPS, KVCacheManager, flat_slots
from maverick_serve.engine.native.scheduler import ScheduledChunk
from maverick_serve.engine.native.sequence import Sequence
from maverick_serve.model.attention import (
    CHUNKED_GROUP,
    GLOBAL_GROUP,
    AttentionPart,
    ForwardBatch,
    GroupBatch,
    PagedKVCache,
    QueryLayout,
)
from maverick_serve.model.llama4 import Llama4Model


class ModelRunner:
    def __init__(
        self, model: Llama4Model, cache: PagedKVCache, kv: KVCacheManager, key_block: int = 16384
    ) -> None:
        self.model = model
        self.key_block = key_block
        self.cache = cache
        self.kv = kv
        self.device = model.device
        self.block_size = kv.block_size
        self.chunk_size = kv.chunk_size

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
        # Rows are laid out part after part (decodes, then prefill chunks) so each part attends
        # without padding to the other's query length; logits rows keep the chunks' order.
        decodes = [i for i, c in enumerate(chunks) if c.num_tokens == 1]
        others = [i for i, c in enumerate(chunks) if c.num_tokens != 1]
        part_order = [p for p in (decodes, others) if p]
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: dict[str, list[torch.Tensor]] = {g: [] for g in GROUPS}
        images: list[tuple[torch.Tensor, torch.Tensor]] = []
        first_row: dict[int, int] = {}
        parts: list[AttentionPart] = []
        row = 0
        for members in part_order:
            if members is decodes and self._decodes_batchable(chunks, members):
                part = self._decode_part(chunks, members, row, ids, positions, slots)
                first_row.update((i, row + b) for b, i in enumerate(members))
                parts.append(part)
                row = part.row_end
                continue
            qmax = max(chunks[i].num_tokens for i in members)
            part_start = row
            pad_index: list[torch.Tensor] = []
            per_group: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {g: [] for g in GROUPS}
            for b, i in enumerate(members):
                c = chunks[i]
                seq = c.seq
                first_row[i] = row
                ids.extend(seq.all_token_ids[c.start : c.end])
                qpos = torch.arange(c.start, c.end)
                positions.append(qpos)
                pad_index.append(b * qmax + torch.arange(c.num_tokens))
                img = self._image_rows(c, row)
                if img is not None:
                    images.append(img)
                for group in GROUPS:
                    table = seq.blocks.tables[group]
                    kstart = self.kv.chunk_start(c.start) if group == CHUNKED_GROUP else 0
                    keys = flat_slots(table, self.block_size, kstart, c.end)
                    # The new tokens' slots are the tail of the keys' slots (kstart <= c.start).
                    slots[group].append(keys[c.start - kstart :])
                    if group == CHUNKED_GROUP:
                        per_group[group].extend(self._chunk_pieces(keys, kstart, c.start, c.end))
                    else:
                        per_group[group].append((keys, qpos, kstart))
                row += c.num_tokens
            parts.append(
                AttentionPart(
                    row_start=part_start,
                    row_end=row,
                    query_pad_index=torch.cat(pad_index).to(self.device),
                    num_seqs=len(members),
                    max_query_len=qmax,
                    groups=self._group_batches(per_group, qmax),
                )
            )
        logits_rows: list[int] = []
        for i, c in enumerate(chunks):
            if all_logits:
                logits_rows.extend(range(first_row[i], first_row[i] + c.num_tokens))
            elif c.samples:
                logits_rows.append(first_row[i] + c.num_tokens - 1)
        batch = ForwardBatch(
            positions=torch.cat(positions).to(self.device),
            slot_mapping={g: torch.cat(s).to(self.device) for g, s in slots.items()},
            parts=parts,
            logits_index=torch.tensor(logits_rows, dtype=torch.long, device=self.device),
        )
        return batch, torch.tensor(ids, dtype=torch.long, device=self.device), images

    def _group_batches(
        self, per_group: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]], qmax: int
    ) -> dict[str, GroupBatch]:
        groups = {}
        for group, items in per_group.items():
            if group == CHUNKED_GROUP:
                layout = self._piece_layout(items)
                groups[group] = self._group_batch(group, items, layout.max_query_len)
                groups[group].queries = layout
            else:
                groups[group] = self._group_batch(group, items, qmax)
        return groups

    def _chunk_pieces(
        self, keys: torch.Tensor, kstart: int, start: int, end: int
    ) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Queries [start, end) of a chunked layer cut at attention-chunk boundaries: each piece
        sees keys from its own chunk's start only. `keys` are the slots of [kstart, end)."""
        pieces = []
        lo = start
        while lo < end:
            kbegin = self.kv.chunk_start(lo)
            hi = min(end, kbegin + self.chunk_size)
            pieces.append((keys[kbegin - kstart : hi - kstart], torch.arange(lo, hi), kbegin))
            lo = hi
        return pieces

    def _piece_layout(self, pieces: list[tuple[torch.Tensor, torch.Tensor, int]]) -> QueryLayout:
        """[B, Q] padding of the pieces, which cover the part's rows in order."""
        qmax = max(q.numel() for _, q, _ in pieces)
        index = torch.cat([b * qmax + torch.arange(q.numel()) for b, (_, q, _) in enumerate(pieces)])
        return QueryLayout(index.to(self.device), len(pieces), qmax)

    def _decodes_batchable(self, chunks: list[ScheduledChunk], members: list[int]) -> bool:
        """Every member is a decode in the strict sense (its one query is past any image patch)
        and no global key range needs the block-wise path: one batched layout covers them."""
        for i in members:
            c = chunks[i]
            patches = c.seq.patch_positions
            if patches.numel() and int(patches[-1]) >= c.start:
                return False
            if c.end > self.key_block:
                return False
        return True

    def _decode_part(
        self,
        chunks: list[ScheduledChunk],
        members: list[int],
        row: int,
        ids: list[int],
        positions: list[torch.Tensor],
        slots: dict[str, list[torch.Tensor]],
    ) -> AttentionPart:
        """The decode part in a handful of batched ops instead of a dozen small ones per sequence:
        the same gather index, new-token slots and masks as the general path (queries of length
        1 see every key of their range, so the mask is key index < key count)."""
        bs = self.block_size
        n = len(members)
        ends = [chunks[i].end for i in members]
        for i in members:  # the token at each query's position, without joining prompt + output
            seq, at = chunks[i].seq, chunks[i].start
            prompt = seq.request.prompt_token_ids
            ids.append(prompt[at] if at < len(prompt) else seq.output_ids[at - len(prompt)])
        positions.append(torch.tensor([e - 1 for e in ends], dtype=torch.long))
        groups: dict[str, GroupBatch] = {}
        for group in GROUPS:
            kstarts = [self.kv.chunk_start(e - 1) if group == CHUNKED_GROUP else 0 for e in ends]
            tables = []
            for i, kstart, end in zip(members, kstarts, ends, strict=True):
                held = chunks[i].seq.blocks.tables[group][kstart // bs : (end + bs - 1) // bs]
                assert all(b is not None for b in held), "positions outside the held blocks"
                tables.append(held)
            width = max(len(t) for t in tables)
            blocks = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
            flat = (blocks[:, :, None] * bs + torch.arange(bs)).reshape(n, width * bs)
            # Key ranges start on a block boundary (block_size divides attention_chunk_size).
            counts = torch.tensor([e - k for k, e in zip(kstarts, ends, strict=True)], dtype=torch.long)
            kmax = int(counts.max())
            j = torch.arange(kmax)
            valid = j[None, :] < counts[:, None]
            gather = flat[:, :kmax].masked_fill(~valid, 0)
            slots[group].append(gather[torch.arange(n), counts - 1])
            groups[group] = GroupBatch(gather.to(self.device), valid[:, None, None, :].to(self.device))
        return AttentionPart(
            row_start=row,
            row_end=row + n,
            query_pad_index=torch.arange(n, device=self.device),
            num_seqs=n,
            max_query_len=1,
            groups=groups,
        )

    def _group_batch(
        self, group: str, items: list[tuple[torch.Tensor, torch.Tensor, int]], qmax: int
    ) -> GroupBatch:
        """Key addressing of one layer group in one part. Global groups with many keys skip the
        dense mask (its Q × K booleans alone would be gigabytes at millions of keys) and attend
        block-wise."""
        kmax = max(keys.numel() for keys, _, _ in items)
        gather = torch.zeros(len(items), kmax, dtype=torch.long)
        for b, (keys, _, _) in enumerate(items):
            gather[b, : keys.numel()] = keys
        if group == GLOBAL_GROUP and kmax > self.key_block:
            qpos = torch.zeros(len(items), qmax, dtype=torch.long)
            for b, (_, q, _) in enumerate(items):
                qpos[b, : q.numel()] = q
            lengths = torch.tensor([keys.numel() for keys, _, _ in items], dtype=torch.long)
            return GroupBatch(
                gather.to(self.device), None, qpos.to(self.device), lengths.to(self.device), self.key_block
            )
        mask = torch.zeros(len(items), 1, qmax, kmax, dtype=torch.bool)
        mask[:, 0, :, 0] = True  # padded query rows attend one key instead of none (no NaN)
        for b, (keys, qpos_b, kstart) in enumerate(items):
            kpos = torch.arange(kstart, kstart + keys.numel())
            m = kpos[None, :] <= qpos_b[:, None]
            if group == CHUNKED_GROUP:
                m &= (kpos[None, :] // self.chunk_size) == (qpos_b[:, None] // self.chunk_size)
            mask[b, 0, : m.shape[0], :] = False
            mask[b, 0, : m.shape[0], : m.shape[1]] = m
        return GroupBatch(gather.to(self.device), mask.to(self.device))

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
