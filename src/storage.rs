//! What a tensor takes once stored: the dtype of its factors and its stored elements and
//! bytes. One rule for `convert` (manifest totals), `inspect` (bytes at each τ), `report`
//! (which draws inspect's numbers) and `merge` (totals after re-truncation).

use cersa_loader::{Dtype, TensorInfo, TensorKind};
use serde::{Deserialize, Serialize};

/// Dtype of stored factors (`--dtype`). Its names (`source`, `f32`, `f16`, `bf16`) come
/// from the variants, the same for the flag, the JSON and the manifest's `config.dtype`.
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
}

impl FactorDtype {
    /// The dtype named by the option; `None` for `source`.
    pub fn explicit(self) -> Option<Dtype> {
        (self != FactorDtype::Source).then(|| self.resolve(Dtype::BF16))
    }

    /// Dtype the factors of a tensor whose dense copy is `dense_dtype` are stored in.
    pub fn resolve(self, dense_dtype: Dtype) -> Dtype {
        match self {
            FactorDtype::Source if dense_dtype.is_factor_float() => dense_dtype,
            FactorDtype::Source => Dtype::BF16,
            FactorDtype::F32 => Dtype::F32,
            FactorDtype::F16 => Dtype::F16,
            FactorDtype::Bf16 => Dtype::BF16,
        }
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

    /// Rank-`r` factors of an m×n matrix: U [m, r] and Vᵀ [r, n] in `dtype`, σ [r] in F32.
    pub fn factored(m: usize, n: usize, r: usize, dtype: Dtype) -> Stored {
        let (m, n, r) = (m as u64, n as u64, r as u64);
        Stored {
            params: r * (m + n + 1),
            bytes: dtype.size() as u64 * r * (m + n) + Dtype::F32.size() as u64 * r,
        }
    }

    /// What the manifest entry `info` stores.
    pub fn of(info: &TensorInfo) -> Stored {
        match (info.kind, info.matrix_shape, info.rank) {
            (TensorKind::Factored, Some([m, n]), Some(r)) => {
                Stored::factored(m, n, r, info.stored_dtype)
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
        assert_eq!(names, ["source", "f32", "f16", "bf16"]);
    }

    #[test]
    fn stored_sizes() {
        assert_eq!(
            Stored::factored(4, 3, 2, Dtype::BF16),
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
        assert_eq!(FactorDtype::Source.resolve(Dtype::F16), Dtype::F16);
        assert_eq!(FactorDtype::Source.resolve(Dtype::I64), Dtype::BF16);
        assert_eq!(FactorDtype::F32.explicit(), Some(Dtype::F32));
        assert_eq!(FactorDtype::Source.explicit(), None);
    }
}
