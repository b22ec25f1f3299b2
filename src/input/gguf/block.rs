//! Byte helpers shared by the GGML block decoders.

/// Elements in a K-quant super-block.
pub(super) const QK_K: usize = 256;

pub(super) use cersa_loader::quant::f16_at;
