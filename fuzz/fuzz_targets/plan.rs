//! `convert --plan FILE`'s reading of a plan (src/cli/mod.rs `convert_plan`): the bytes
//! parsed as `cersa::plan::Plan`, then `check_source` against the committed MiniLM excerpt
//! (`fixtures/minilm-excerpt/model.safetensors`, the source the seed plan was made for) and
//! `check_calibration`. Never a panic. An accepted plan serializes and parses back equal;
//! `check_source` runs twice, on the plan as given and with its `source` identity replaced
//! by the fixture's (so mutations reach the per-entry checks); a plan it accepts names only
//! tensors of the source, with their matrix view and a rank in 1..=min(m, n).
#![no_main]

use cersa::input::Source;
use cersa::plan::{source_identity, Plan};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn source() -> &'static dyn Source {
    static SRC: OnceLock<Box<dyn Source>> = OnceLock::new();
    SRC.get_or_init(|| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/minilm-excerpt/model.safetensors");
        cersa::input::open(&path).expect("the MiniLM fixture opens")
    })
    .as_ref()
}

fuzz_target!(|data: &[u8]| {
    let src = source();
    let Ok(mut plan) = serde_json::from_slice::<Plan>(data) else {
        return;
    };
    let text = serde_json::to_vec(&plan).expect("a plan serializes");
    let back: Plan = serde_json::from_slice(&text).expect("a written plan parses back");
    assert_eq!(back, plan, "round trip");
    let _ = plan.check_source(src);
    let _ = plan.check_calibration(None);
    plan.source = source_identity(src);
    if plan.check_source(src).is_ok() {
        for (name, e) in &plan.tensors {
            let meta = src
                .tensors()
                .iter()
                .find(|t| &t.name == name)
                .expect("an accepted entry names a source tensor");
            let m = meta.shape[0];
            let n: usize = meta.shape[1..].iter().product();
            assert_eq!(e.matrix_shape, [m, n]);
            if let Some(r) = e.rank {
                assert!(r >= 1 && r <= m.min(n));
            }
        }
    }
});
