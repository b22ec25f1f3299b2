//! Which tensors are factored (formats/cersa-v1.md §4, "Selection").

use crate::error::{ConvertError, Result};
use crate::input::TensorMeta;
use cersa_loader::DenseReason;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Names never factored by default, whatever the format (matched case-insensitively, so
/// `LayerNorm` counts as `*norm*`).
pub const DEFAULT_EXCLUDES: &[&str] = &["*embed*", "*lm_head*", "*wte*", "*wpe*", "*norm*"];

/// Names of stacked mixture-of-experts weights (GGUF `blk.N.ffn_up_exps.weight`, Hugging
/// Face fused `mlp.experts.gate_up_proj`): with ≥ 3 dims they hold one matrix per expert,
/// `[E, m, n]`. Such a tensor, when selected, is factored one expert at a time (format
/// revision 1.3), never as the `[E, m·n]` view of §4 rule 1 that would put every expert in
/// one subspace. Selected by default even when the name does not end in `weight` (fused
/// Hugging Face experts are `…experts.down_proj`).
pub const STACKED_EXPERTS: &[&str] = &["*_exps*", "*experts*"];

/// How a selected tensor is decomposed: one `m`×`n` matrix, or `experts` of them (the
/// slices of a stacked experts tensor `[E, m, …]`, m the second dimension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatrixView {
    /// `Some(E)` for a stacked experts tensor.
    pub experts: Option<usize>,
    /// Rows of each matrix.
    pub m: usize,
    /// Columns of each matrix (the product of the remaining dimensions).
    pub n: usize,
}

impl MatrixView {
    /// Number of matrices (1, or E).
    pub fn count(&self) -> usize {
        self.experts.unwrap_or(1)
    }
}

/// Compiled selection rules.
#[derive(Debug, Clone)]
pub struct Selection {
    include: Option<GlobSet>,
    exclude: GlobSet,
    default_exclude: GlobSet,
    stacked_experts: GlobSet,
}

fn build(globs: &[String], case_insensitive: bool) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        let glob = GlobBuilder::new(g)
            .case_insensitive(case_insensitive)
            .literal_separator(false)
            .build()
            .map_err(|e| ConvertError::Options(format!("bad glob {g:?}: {e}")))?;
        b.add(glob);
    }
    b.build().map_err(|e| ConvertError::Options(e.to_string()))
}

impl Selection {
    /// Rules from `--include` (replaces the default name rule when non-empty), `--exclude`
    /// (always wins), and the format's extra default excludes.
    pub fn new(include: &[String], exclude: &[String], format_excludes: &[&str]) -> Result<Self> {
        let defaults: Vec<String> = DEFAULT_EXCLUDES
            .iter()
            .chain(format_excludes)
            .map(|s| s.to_string())
            .collect();
        Ok(Selection {
            include: if include.is_empty() {
                None
            } else {
                Some(build(include, false)?)
            },
            exclude: build(exclude, false)?,
            default_exclude: build(&defaults, true)?,
            stacked_experts: build(
                &STACKED_EXPERTS
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
                true,
            )?,
        })
    }

    /// Whether `t` is a stacked experts tensor (≥ 3 dims, a [`STACKED_EXPERTS`] name): when
    /// selected, it is factored one expert at a time.
    pub fn is_experts(&self, t: &TensorMeta) -> bool {
        t.shape.len() >= 3 && self.stacked_experts.is_match(&t.name)
    }

    /// The matrices a selected tensor `t` (≥ 2 dims) is decomposed as.
    pub fn view(&self, t: &TensorMeta) -> MatrixView {
        let product = |dims: &[usize]| dims.iter().fold(1usize, |a, &d| a.saturating_mul(d));
        match self.is_experts(t) {
            true => MatrixView {
                experts: Some(t.shape[0]),
                m: t.shape[1],
                n: product(&t.shape[2..]),
            },
            false => MatrixView {
                experts: None,
                m: t.shape.first().copied().unwrap_or(0),
                n: product(t.shape.get(1..).unwrap_or(&[])),
            },
        }
    }

    /// `Ok(())` when `t` is to be factored, else the reason it stays dense.
    pub fn check(&self, t: &TensorMeta) -> std::result::Result<(), DenseReason> {
        if t.float.is_none() {
            return Err(DenseReason::NonFloat);
        }
        if t.shape.len() < 2 {
            return Err(DenseReason::NotAMatrix);
        }
        if self.exclude.is_match(&t.name) {
            return Err(DenseReason::Excluded);
        }
        let chosen = match &self.include {
            Some(inc) => inc.is_match(&t.name),
            None => {
                (t.name.ends_with("weight") || self.is_experts(t))
                    && !self.default_exclude.is_match(&t.name)
                    && !t.name.ends_with("bias")
            }
        };
        if chosen {
            Ok(())
        } else {
            Err(DenseReason::Excluded)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::Precision;
    use cersa_loader::Dtype;

    fn meta(name: &str, shape: &[usize], float: bool) -> TensorMeta {
        TensorMeta {
            name: name.into(),
            shape: shape.to_vec(),
            source_dtype: "F32".into(),
            float: float.then_some(Precision::F32),
            dense_dtype: Dtype::F32,
            source_bytes: 0,
            file: 0,
        }
    }

    #[test]
    fn default_rules() {
        let s = Selection::new(&[], &[], &[]).unwrap();
        assert_eq!(s.check(&meta("layer.0.q.weight", &[4, 4], true)), Ok(()));
        assert_eq!(
            s.check(&meta("layer.0.q.bias", &[4, 4], true)),
            Err(DenseReason::Excluded)
        );
        assert_eq!(
            s.check(&meta("embeddings.word_embeddings.weight", &[9, 4], true)),
            Err(DenseReason::Excluded)
        );
        assert_eq!(
            s.check(&meta("x.LayerNorm.weight", &[4, 4], true)),
            Err(DenseReason::Excluded)
        );
        assert_eq!(
            s.check(&meta("lm_head.weight", &[4, 4], true)),
            Err(DenseReason::Excluded)
        );
        assert_eq!(
            s.check(&meta("q.weight", &[4], true)),
            Err(DenseReason::NotAMatrix)
        );
        assert_eq!(
            s.check(&meta("q.weight", &[4, 4], false)),
            Err(DenseReason::NonFloat)
        );
    }

    #[test]
    fn include_overrides_exclude_wins() {
        let s = Selection::new(&["*embed*".into()], &["*position*".into()], &[]).unwrap();
        assert_eq!(
            s.check(&meta("embeddings.word_embeddings.weight", &[9, 4], true)),
            Ok(())
        );
        assert_eq!(
            s.check(&meta(
                "embeddings.position_embeddings.weight",
                &[9, 4],
                true
            )),
            Err(DenseReason::Excluded)
        );
        assert_eq!(
            s.check(&meta("layer.0.q.weight", &[4, 4], true)),
            Err(DenseReason::Excluded)
        );
        assert!(Selection::new(&["[".into()], &[], &[]).is_err());
    }

    #[test]
    fn stacked_experts_are_factored_per_expert() {
        let s = Selection::new(&[], &[], &[]).unwrap();
        // GGUF's stacked expert weights [E, m, n] and HF's fused 3-D experts (whose names
        // need not end in `weight`): selected, one matrix per expert.
        for name in [
            "blk.0.ffn_up_exps.weight",
            "model.layers.0.mlp.Experts.down.weight",
            "model.layers.0.mlp.experts.gate_up_proj",
        ] {
            let t = meta(name, &[8, 16, 4, 2], true);
            assert_eq!(s.check(&t), Ok(()), "{name}");
            assert_eq!(
                s.view(&t),
                MatrixView {
                    experts: Some(8),
                    m: 16,
                    n: 8
                }
            );
        }
        // Their 2-D biases are not.
        assert_eq!(
            s.check(&meta(
                "model.layers.0.mlp.experts.gate_up_proj_bias",
                &[8, 16],
                true
            )),
            Err(DenseReason::Excluded)
        );
        assert_eq!(
            s.view(&meta("conv.weight", &[8, 4, 3], true)),
            MatrixView {
                experts: None,
                m: 8,
                n: 12
            }
        );
        // One expert's 2-D matrix, shared experts and 3-D/4-D convs are factored.
        assert_eq!(
            s.check(&meta(
                "model.layers.0.mlp.experts.3.w1.weight",
                &[16, 4],
                true
            )),
            Ok(())
        );
        assert_eq!(
            s.check(&meta("blk.0.ffn_up_shexp.weight", &[16, 4], true)),
            Ok(())
        );
        assert_eq!(s.check(&meta("conv.weight", &[8, 4, 3], true)), Ok(()));
        // --exclude keeps them dense.
        let s = Selection::new(&[], &["*_exps*".into()], &[]).unwrap();
        assert_eq!(
            s.check(&meta("blk.0.ffn_up_exps.weight", &[8, 16, 4], true)),
            Err(DenseReason::Excluded)
        );
    }
}
