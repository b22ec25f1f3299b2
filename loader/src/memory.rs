//! Memory accounting of subspace fine-tuning: bytes held for frozen weights, trainable
//! parameters and optimizer state, per adaptation mode, against the same layer trained
//! as dense-frozen + LoRA of rank k. Pure arithmetic (no tensor library).

use crate::adapter::Mode;

/// Bytes held while training one m×n layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryUse {
    /// Frozen weights (never updated).
    pub frozen: u64,
    /// Trainable parameters.
    pub trainable: u64,
    /// Optimizer state (AdamW: two moments per trainable parameter, plus the gradient).
    pub optimizer: u64,
}

impl MemoryUse {
    /// frozen + trainable + optimizer.
    pub fn total(&self) -> u64 {
        self.frozen + self.trainable + self.optimizer
    }

    fn plus(self, o: MemoryUse) -> MemoryUse {
        MemoryUse {
            frozen: self.frozen + o.frozen,
            trainable: self.trainable + o.trainable,
            optimizer: self.optimizer + o.optimizer,
        }
    }
}

/// Element counts → bytes: frozen at `frozen_bytes` per element, trainable parameters in
/// f32 with an f32 gradient and AdamW's two f32 moments (3 × 4 bytes of state each).
fn account(frozen_elems: u64, frozen_bytes: u64, trainable_elems: u64) -> MemoryUse {
    MemoryUse {
        frozen: frozen_elems * frozen_bytes,
        trainable: trainable_elems * 4,
        optimizer: trainable_elems * 12,
    }
}

/// A CERSA layer [m, n] of rank r with factors of `factor_bytes` per element (σ is F32)
/// trained in `mode`.
pub fn cersa_layer(m: u64, n: u64, r: u64, factor_bytes: u64, mode: Mode) -> MemoryUse {
    let uv = r * (m + n);
    let sigma = account(r, 4, 0);
    match mode {
        Mode::Frozen => account(uv, factor_bytes, 0).plus(sigma),
        Mode::Scale => account(uv, factor_bytes, r),
        Mode::Core { k } => account(uv, factor_bytes, 2 * r * k as u64).plus(sigma),
        // Both factors become f32 variables; nothing stays frozen.
        Mode::Factors => account(0, 0, uv),
        // U, V and σ frozen; the t×t leading block of the core trainable.
        Mode::Cersa { trainable: t } => account(uv, factor_bytes, (t as u64).pow(2)).plus(sigma),
    }
}

/// The same layer kept dense and frozen (`weight_bytes` per element) plus LoRA of rank k
/// (A: k×n, B: m×k trainable).
pub fn dense_lora_layer(m: u64, n: u64, weight_bytes: u64, k: u64) -> MemoryUse {
    account(m * n, weight_bytes, k * (m + n))
}

/// Sum of [`cersa_layer`] over every factored tensor of `ckpt`, and of
/// [`dense_lora_layer`] over the same tensors at their source dtype size. Quantized factors
/// count as f32: the candle and PyTorch loaders dequantize them at load into the compute
/// dtype (f32 by default), so their U8 rows are not what a trainer holds.
pub fn checkpoint_totals(
    ckpt: &crate::Checkpoint,
    mode: Mode,
    lora_k: u64,
) -> (MemoryUse, MemoryUse) {
    let mut cersa = MemoryUse::default();
    let mut dense = MemoryUse::default();
    for name in ckpt.names() {
        let Some(info) = ckpt.manifest().tensors.get(name) else {
            continue;
        };
        let (Some([m, n]), Some(r)) = (info.matrix_shape, info.rank) else {
            continue;
        };
        let (m, n, r) = (m as u64, n as u64, r as u64);
        let source_bytes = crate::Dtype::parse(&info.source_dtype).map_or(4, |d| d.size() as u64);
        let mode = match mode {
            Mode::Core { k } => Mode::Core {
                k: k.min(r as usize),
            },
            Mode::Cersa { trainable } => Mode::Cersa {
                trainable: trainable.min(r as usize),
            },
            other => other,
        };
        let factor_bytes = if info.quant.is_some() {
            4
        } else {
            info.stored_dtype.size() as u64
        };
        cersa = cersa.plus(cersa_layer(m, n, r, factor_bytes, mode));
        dense = dense.plus(dense_lora_layer(m, n, source_bytes, lora_k));
    }
    (cersa, dense)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_the_shapes() {
        // 384×384, r = 200, f32 factors, core k = 8.
        let c = cersa_layer(384, 384, 200, 4, Mode::Core { k: 8 });
        assert_eq!(c.frozen, 200 * 768 * 4 + 200 * 4);
        assert_eq!(c.trainable, 2 * 200 * 8 * 4);
        assert_eq!(c.optimizer, 3 * c.trainable);
        let l = dense_lora_layer(384, 384, 4, 8);
        assert_eq!(l.frozen, 384 * 384 * 4);
        assert_eq!(l.trainable, 8 * 768 * 4);
        let f = cersa_layer(10, 20, 3, 2, Mode::Factors);
        assert_eq!((f.frozen, f.trainable), (0, 3 * 30 * 4));
        assert_eq!(cersa_layer(10, 20, 3, 2, Mode::Scale).trainable, 12);
        // The paper's core: 200×200 (or its leading 50×50 block) trainable, U, V, σ frozen.
        let p = cersa_layer(384, 384, 200, 4, Mode::Cersa { trainable: 200 });
        assert_eq!((p.frozen, p.trainable), (c.frozen, 200 * 200 * 4));
        let p = cersa_layer(384, 384, 200, 4, Mode::Cersa { trainable: 50 });
        assert_eq!(p.trainable, 50 * 50 * 4);
    }

    #[test]
    fn quantized_factors_count_as_f32() {
        // formats/vectors/valid/quant-q8_0: big.weight [40, 70] r 3, small.weight [20, 45]
        // r 2, both Q8_0 (stored U8), sources F32.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../formats/vectors/valid/quant-q8_0");
        let ckpt = crate::Checkpoint::open(&dir).unwrap();
        let (cersa, lora) = checkpoint_totals(&ckpt, Mode::Frozen, 8);
        assert_eq!(cersa.frozen, (3 * 110 + 2 * 65) * 4 + (3 + 2) * 4);
        assert_eq!(lora.frozen, (40 * 70 + 20 * 45) * 4);
        let (paper, _) = checkpoint_totals(
            &ckpt,
            Mode::Cersa {
                trainable: usize::MAX,
            },
            8,
        );
        assert_eq!(paper.trainable, (9 + 4) * 4);
    }
}
