//! What a tensor takes once stored: the dtype of its factors and its stored elements and
//! bytes. One rule for `convert` (manifest totals), `inspect` (bytes at each τ), `report`
//! (which draws inspect's numbers) and `merge` (totals after re-truncation).

use cersa_loader::{Dtype, FactorEncoding, Quant, TensorInfo, TensorKind};
use serde::{Deserialize, Serialize};

/// Dtype of stored factors (`--dtype`). Its names (`source`, `f32`, `f16`, `bf16`,
/// `q8_0`, `q5_0`, `q4_0`) come from the variants, the same for the flag, the JSON and
/// the manifest's `config.dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FactorDtype {
    /// The source float dtype (BF16 for quantized sources).
    Source,
    /// f32.
    F32,
    /// f16.
    F16,
    /// bf16.
    Bf16,
    /// GGML Q8_0 blocks along each singular vector (8.5 bits per value).
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
    /// GGML Q5_0 blocks (5.5 bits per value).
    #[value(name = "q5_0")]
    #[serde(rename = "q5_0")]
    Q5_0,
    /// GGML Q4_0 blocks (4.5 bits per value).
    #[value(name = "q4_0")]
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl FactorDtype {
    /// The float dtype named by the option; `None` for `source` and the quantized types.
    /// (`--dtype` also sets the dtype quantized source tensors are dequantized into when
    /// they stay dense; with a quantized factor type they keep the default, BF16.)
    pub fn explicit(self) -> Option<Dtype> {
        match self.resolve(Dtype::BF16) {
            FactorEncoding::Float(d) if self != FactorDtype::Source => Some(d),
            _ => None,
        }
    }

    /// How the factors of a tensor whose dense copy is `dense_dtype` are stored.
    pub fn resolve(self, dense_dtype: Dtype) -> FactorEncoding {
        FactorEncoding::Float(match self {
            FactorDtype::Source if dense_dtype.is_factor_float() => dense_dtype,
            FactorDtype::Source => Dtype::BF16,
            FactorDtype::F32 => Dtype::F32,
            FactorDtype::F16 => Dtype::F16,
            FactorDtype::Bf16 => Dtype::BF16,
            FactorDtype::Q8_0 => return FactorEncoding::Quant(Quant::Q8_0),
            FactorDtype::Q5_0 => return FactorEncoding::Quant(Quant::Q5_0),
            FactorDtype::Q4_0 => return FactorEncoding::Quant(Quant::Q4_0),
        })
    }
}

impl std::fmt::Display for FactorDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = clap::ValueEnum::to_possible_value(self).expect("no variant is skipped");
        f.write_str(value.get_name())
    }
}

/// Elements and bytes of one tensor as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stored {
    /// Elements stored.
    pub params: u64,
    /// Bytes stored.
    pub bytes: u64,
}

impl Stored {
    /// A dense copy of `numel` elements of `dtype`.
    pub fn dense(numel: u64, dtype: Dtype) -> Stored {
        Stored {
            params: numel,
            bytes: numel * dtype.size() as u64,
        }
    }

    /// Rank-`r` factors of an m×n matrix: U and Vᵀ as `enc` stores them, σ [r] in F32.
    /// `params` counts the factors' values (r·(m+n+1)), not quantization padding.
    pub fn factored(m: usize, n: usize, r: usize, enc: FactorEncoding) -> Stored {
        let factors = enc
            .factor_bytes(m, n, r)
            .expect("factor sizes of a matrix that fits in memory");
        let (m, n, r) = (m as u64, n as u64, r as u64);
        Stored {
            params: r * (m + n + 1),
            bytes: factors + Dtype::F32.size() as u64 * r,
        }
    }

    /// What the manifest entry `info` stores (an experts tensor: the sum of its experts).
    pub fn of(info: &TensorInfo) -> Stored {
        if info.kind == TensorKind::Experts {
            return (0..info.expert_count())
                .filter_map(|e| info.expert(e))
                .map(|x| Stored::of(&x))
                .fold(Stored::default(), |a, b| Stored {
                    params: a.params + b.params,
                    bytes: a.bytes + b.bytes,
                });
        }
        match (info.kind, info.matrix_shape, info.rank) {
            (TensorKind::Factored, Some([m, n]), Some(r)) => {
                Stored::factored(m, n, r, FactorEncoding::of(info))
            }
            _ => Stored::dense(
                info.shape.iter().map(|&d| d as u64).product(),
                info.stored_dtype,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn one_name_per_dtype_for_flag_json_and_manifest() {
        for d in FactorDtype::value_variants() {
            let json = serde_json::to_value(d).unwrap();
            assert_eq!(json.as_str(), Some(d.to_string().as_str()));
            assert_eq!(FactorDtype::from_str(&d.to_string(), false), Ok(*d));
        }
        let names: Vec<String> = FactorDtype::value_variants()
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(
            names,
            ["source", "f32", "f16", "bf16", "q8_0", "q5_0", "q4_0"]
        );
    }

    #[test]
    fn stored_sizes() {
        assert_eq!(
            Stored::factored(4, 3, 2, FactorEncoding::Float(Dtype::BF16)),
            Stored {
                params: 2 * 8,
                bytes: 2 * 2 * 7 + 4 * 2
            }
        );
        assert_eq!(
            Stored::dense(12, Dtype::F16),
            Stored {
                params: 12,
                bytes: 24
            }
        );
        let float = FactorEncoding::Float;
        assert_eq!(FactorDtype::Source.resolve(Dtype::F16), float(Dtype::F16));
        assert_eq!(FactorDtype::Source.resolve(Dtype::I64), float(Dtype::BF16));
        assert_eq!(FactorDtype::F32.explicit(), Some(Dtype::F32));
        assert_eq!(FactorDtype::Source.explicit(), None);
        assert_eq!(FactorDtype::Q8_0.explicit(), None);
        // Q4_0 rows of 40 and 70 values: 2 and 3 blocks of 18 bytes, per rank.
        assert_eq!(
            Stored::factored(40, 70, 3, FactorDtype::Q4_0.resolve(Dtype::F32)),
            Stored {
                params: 3 * 111,
                bytes: 3 * 5 * 18 + 4 * 3
            }
        );
    }
}
