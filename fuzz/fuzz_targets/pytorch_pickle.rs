//! The restricted unpickler (`cersa::input::pytorch::pickle::unpickle`) on arbitrary
//! bytes: Ok or Err, never a panic, never executing anything. An accepted pickle ends at
//! its STOP opcode inside the input, and unpickling just those bytes gives the same end.
//! The value (possibly shared or cyclic through the memo) is walked with a node budget.
#![no_main]

use cersa::input::pytorch::pickle::{unpickle, Value};
use libfuzzer_sys::fuzz_target;

/// Visits at most `budget` nodes of `v`.
fn walk(v: &Value, budget: &mut usize) {
    if *budget == 0 {
        return;
    }
    *budget -= 1;
    let _ = v.as_int();
    match v {
        Value::Tuple(t) => t.iter().for_each(|x| walk(x, budget)),
        Value::List(l) => l.borrow().iter().for_each(|x| walk(x, budget)),
        Value::Dict(d) => d.borrow().iter().for_each(|(k, x)| {
            walk(k, budget);
            walk(x, budget);
        }),
        Value::Tensor(t) => {
            assert_eq!(t.shape.len(), t.stride.len());
            assert!(t.shape.len() <= cersa::input::pytorch::pickle::MAX_DIMS);
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(u) = unpickle(data) else { return };
    assert!(u.end >= 1 && u.end <= data.len());
    assert_eq!(data[u.end - 1], b'.', "ends after STOP");
    let again = unpickle(&data[..u.end]).expect("the same bytes unpickle again");
    assert_eq!(again.end, u.end);
    walk(&u.value, &mut 10_000);
});
