"""Linear layers through oneDNN with weights reordered once into its blocked layout (CPU only).

Decode-sized matmuls ([16, 256] × [256, 1024] on the tiny model) are not compute-bound on CPU:
torch's default GEMM re-reads a plain row-major weight that has left the cache each step and
reaches ~4 GB/s of it; oneDNN on a pre-blocked weight streams it ~1.8× faster at batch 16 (and
~1.2× at prefill sizes). vLLM's CPU backend does the same (`create_onednn_mm`). Weights that are
always applied to the same input are concatenated first (q/k/v, gate/up) so one call reads them.

The packed tensor is an opaque mkldnn tensor held outside the module's parameters: state dicts,
checkpoint loading and `named_parameters` are unchanged, and the original weights stay (a second
copy of the packed layers' bytes). Per-row results do not depend on how many rows are in the call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The batch size oneDNN blocks the weight for; any row count works with it (vLLM uses 32 too).
_BATCH_HINT = 32


def cpu_gemm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `PackedGemm` can run here: a CPU tensor of a dtype oneDNN's linear takes."""
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedGemm:
    """y = x · concat(weights)ᵀ for x [N, in]; `weights` are [out_i, in] (nn.Linear layout)."""

    def __init__(self, weights: Sequence[torch.Tensor]) -> None:
        weight = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _BATCH_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
