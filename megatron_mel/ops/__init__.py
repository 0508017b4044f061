"""Fused output-layer + loss kernels (see fused_loss.py)."""

from megatron_mel.ops.fused_loss import CombinedLossOutput, fused_combined_loss

__all__ = ["CombinedLossOutput", "fused_combined_loss"]
