//! Per-module rank rules: `--energy GLOB=TAU` and `--rank GLOB=N` (spec §4.5, "Per-module
//! rules"). The first rule whose glob matches a tensor's name, in the order given on the
//! command line, chooses its rank; a tensor no rule matches takes the plain `--energy τ`.

use crate::decompose::rank::RankRule;
use crate::error::{ConvertError, Result};
use globset::{GlobBuilder, GlobMatcher};

/// The `rule` a manifest records for a rank a budget plan chose.
pub const PLAN_RULE: &str = "plan";

/// What a rule sets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RuleTarget {
    /// The energy threshold τ (the global rank clamps still apply).
    Energy(f64),
    /// A fixed rank N (capped at min(m, n); the clamps do not apply).
    Rank(usize),
}

/// One `--energy GLOB=TAU` or `--rank GLOB=N` rule.
#[derive(Debug, Clone)]
pub struct ModuleRule {
    glob: String,
    matcher: GlobMatcher,
    target: RuleTarget,
}

impl PartialEq for ModuleRule {
    fn eq(&self, other: &Self) -> bool {
        self.glob == other.glob && self.target == other.target
    }
}

impl ModuleRule {
    /// A rule from its glob and target (globs match case-sensitively, `*` crosses dots).
    pub fn new(glob: &str, target: RuleTarget) -> Result<Self> {
        if glob.is_empty() {
            return Err(ConvertError::Options(
                "a rule needs a glob before '='".into(),
            ));
        }
        match target {
            RuleTarget::Energy(e) if !(e > 0.0 && e <= 1.0) => {
                return Err(ConvertError::Options(format!(
                    "--energy {glob}={e}: the threshold must be in (0, 1]"
                )))
            }
            RuleTarget::Energy(_) => {}
            RuleTarget::Rank(0) => {
                return Err(ConvertError::Options(format!(
                    "--rank {glob}=0: the rank must be at least 1"
                )))
            }
            RuleTarget::Rank(_) => {}
        }
        let matcher = GlobBuilder::new(glob)
            .literal_separator(false)
            .build()
            .map_err(|e| ConvertError::Options(format!("bad glob {glob:?}: {e}")))?
            .compile_matcher();
        Ok(ModuleRule {
            glob: glob.to_string(),
            matcher,
            target,
        })
    }

    /// Parses the value of `--energy GLOB=TAU` (`flag` = `energy`) or `--rank GLOB=N`
    /// (`flag` = `rank`); the glob is everything before the last `=`.
    pub fn parse(flag: &str, value: &str) -> Result<Self> {
        let (glob, number) = value.rsplit_once('=').ok_or_else(|| {
            ConvertError::Options(format!("--{flag} {value:?}: expected GLOB=VALUE"))
        })?;
        let bad = |what: &str| ConvertError::Options(format!("--{flag} {value:?}: {what}"));
        let target = match flag {
            "energy" => RuleTarget::Energy(
                number
                    .trim()
                    .parse()
                    .map_err(|_| bad("the threshold is not a number"))?,
            ),
            "rank" => RuleTarget::Rank(
                number
                    .trim()
                    .parse()
                    .map_err(|_| bad("the rank is not a whole number"))?,
            ),
            _ => return Err(bad("unknown rule flag")),
        };
        ModuleRule::new(glob, target)
    }

    /// Parses a rule as [`ModuleRule::text`] writes it (the manifest's `config.rules`).
    pub fn from_text(text: &str) -> Result<Self> {
        let bad = || ConvertError::Options(format!("rule {text:?} is not '--energy|--rank G=V'"));
        let (flag, value) = text.split_once(' ').ok_or_else(bad)?;
        ModuleRule::parse(flag.strip_prefix("--").ok_or_else(bad)?, value)
    }

    /// The rule as given, e.g. `--energy *attn*=0.95` (recorded in the manifest).
    pub fn text(&self) -> String {
        match self.target {
            RuleTarget::Energy(e) => format!("--energy {}={e}", self.glob),
            RuleTarget::Rank(n) => format!("--rank {}={n}", self.glob),
        }
    }

    /// What the rule sets.
    pub fn target(&self) -> RuleTarget {
        self.target
    }

    /// True when the rule applies to tensor `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.matcher.is_match(name)
    }

    /// A rank rule that gives exactly rank `n` (capped at min(m, n)).
    pub fn fixed_rank(n: usize) -> RankRule {
        RankRule {
            energy: 1.0,
            min_rank: n,
            max_rank: Some(n),
            rank_multiple: 1,
        }
    }

    /// The rank rule this rule makes of the global one (`base`: `--energy τ` and clamps).
    pub fn apply(&self, base: &RankRule) -> RankRule {
        match self.target {
            RuleTarget::Energy(energy) => RankRule {
                energy,
                ..base.clone()
            },
            // τ = 1 lets every route see the whole spectrum; the clamps pin the rank to N.
            RuleTarget::Rank(n) => ModuleRule::fixed_rank(n),
        }
    }
}

/// The rank rule for tensor `name` and the rule that chose it (`None`: the global rule).
pub fn rule_for<'a>(
    rules: &'a [ModuleRule],
    base: &RankRule,
    name: &str,
) -> (RankRule, Option<&'a ModuleRule>) {
    match rules.iter().find(|r| r.matches(name)) {
        Some(r) => (r.apply(base), Some(r)),
        None => (base.clone(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_match_wins_in_order() {
        let rules = vec![
            ModuleRule::parse("rank", "*.q_proj.*=64").unwrap(),
            ModuleRule::parse("energy", "*attn*=0.95").unwrap(),
            ModuleRule::parse("energy", "*mlp*=0.85").unwrap(),
        ];
        let base = RankRule::default();
        let (r, by) = rule_for(&rules, &base, "model.layers.0.self_attn.q_proj.weight");
        assert_eq!((r.min_rank, r.max_rank), (64, Some(64)));
        assert_eq!(by.unwrap().text(), "--rank *.q_proj.*=64");
        let (r, by) = rule_for(&rules, &base, "model.layers.0.self_attn.k_proj.weight");
        assert_eq!(r.energy, 0.95);
        assert_eq!(by.unwrap().text(), "--energy *attn*=0.95");
        let (r, by) = rule_for(&rules, &base, "model.layers.0.mlp.up_proj.weight");
        assert_eq!(r.energy, 0.85);
        assert!(by.is_some());
        let (r, by) = rule_for(&rules, &base, "lm_head.weight");
        assert_eq!(r, base);
        assert!(by.is_none());
    }

    #[test]
    fn texts_round_trip_and_bad_rules_are_named() {
        for text in ["--energy *attn*=0.95", "--rank blk.*.ffn_*=128"] {
            assert_eq!(ModuleRule::from_text(text).unwrap().text(), text);
        }
        for (flag, value, needle) in [
            ("energy", "*attn*", "GLOB=VALUE"),
            ("energy", "*attn*=1.5", "(0, 1]"),
            ("energy", "=0.9", "glob"),
            ("rank", "*x*=0", "at least 1"),
            ("rank", "*x*=2.5", "whole number"),
            ("energy", "[a=0.9", "bad glob"),
        ] {
            let err = ModuleRule::parse(flag, value).unwrap_err().to_string();
            assert!(err.contains(needle), "{flag} {value}: {err}");
        }
    }

    #[test]
    fn globs_are_case_sensitive_and_cross_dots() {
        let r = ModuleRule::parse("energy", "*Attn*=0.9").unwrap();
        assert!(r.matches("layers.0.Attn.weight"));
        assert!(!r.matches("layers.0.attn.weight"));
    }
}
