//! Byte helpers shared by the GGML block decoders.

use half::f16;

/// Elements in a K-quant super-block.
pub(super) const QK_K: usize = 256;

/// The little-endian f16 at byte `at` of a block, as f32 (exact).
pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}
