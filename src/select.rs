//! Which tensors are factored (formats/cersa-v1.md §4, "Selection").

use crate::error::{ConvertError, Result};
use crate::input::TensorMeta;
use cersa_loader::DenseReason;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Names never factored by default, whatever the format (matched case-insensitively, so
/// `LayerNorm` counts as `*norm*`).
pub const DEFAULT_EXCLUDES: &[&str] = &["*embed*", "*lm_head*", "*wte*", "*wpe*", "*norm*"];

/// Compiled selection rules.
#[derive(Debug, Clone)]
pub struct Selection {
    include: Option<GlobSet>,
    exclude: GlobSet,
    default_exclude: GlobSet,
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
        })
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
            None => t.name.ends_with("weight") && !self.default_exclude.is_match(&t.name),
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
}
