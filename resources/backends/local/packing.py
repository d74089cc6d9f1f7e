"""Packing several sequences into one training row. Rows are filled first-fit decreasing;
the model sees restarted position ids and a block-diagonal causal mask, so each packed
sequence attends only to itself and its loss equals the unpacked loss."""

from __future__ import annotations

import torch


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices per row, longest first, ties by index (deterministic). No sequence is split."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def auto_capacity(lengths: list[int], attention_scale: float) -> int:
    """Row length with the least estimated compute: rows x length x (1 + length / scale).
    Padding costs linear layers; longer rows cost masked attention, which grows with row
    length. Candidates are 1-4x the longest sequence (so uniform lengths stay unpacked)."""
    longest = max(lengths)

    def cost(capacity: int) -> float:
        return len(pack(lengths, capacity)) * capacity * (1 + capacity / attention_scale)

    return min((longest * k for k in (1, 2, 3, 4)), key=cost)


def padding_fraction(lengths: list[int], rows: list[list[int]]) -> float:
    """Share of the padded (rows x longest row) grid that is padding."""
    width = max(sum(lengths[i] for i in row) for row in rows)
    return 1.0 - sum(lengths) / (len(rows) * width)


def block_causal_mask(segments_R_L: torch.Tensor) -> torch.Tensor:
    """(R, 1, L, L) boolean: query i sees key j when both belong to the same sequence and
    j <= i. Padding (segment -1) sees only itself, so no attention row is empty (NaN-free)."""
    L = segments_R_L.shape[1]
    causal_L_L = torch.tril(torch.ones(L, L, dtype=torch.bool))
    same_R_L_L = segments_R_L[:, :, None] == segments_R_L[:, None, :]
    mask_R_L_L = (same_R_L_L & causal_L_L & (segments_R_L[:, :, None] >= 0)) | torch.eye(L, dtype=torch.bool)
    return mask_R_L_L[:, None]
