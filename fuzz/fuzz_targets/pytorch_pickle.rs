//! The restricted unpickler (`cersa::input::pytorch::pickle::unpickle`) on arbitrary
//! bytes: Ok or Err, never a panic, never executing anything. An accepted pickle ends at
//! its STOP opcode inside the input, and unpickling just those bytes gives the same end.
//! The value (possibly shared through the memo, never cyclic) is walked with a node budget;
//! no list, dict or tuple may be inside itself.
#![no_main]

use cersa::input::pytorch::pickle::{unpickle, Value};
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::rc::Rc;

/// Visits at most `budget` nodes of `v`; `path` holds the containers above it.
fn walk(v: &Value, budget: &mut usize, path: &mut HashSet<*const ()>) {
    if *budget == 0 {
        return;
    }
    *budget -= 1;
    let _ = v.as_int();
    let id = match v {
        Value::Tuple(t) => Rc::as_ptr(t) as *const (),
        Value::List(l) => Rc::as_ptr(l) as *const (),
        Value::Dict(d) => Rc::as_ptr(d) as *const (),
        Value::Tensor(t) => {
            assert_eq!(t.shape.len(), t.stride.len());
            assert!(t.shape.len() <= cersa::input::pytorch::pickle::MAX_DIMS);
            return;
        }
        _ => return,
    };
    assert!(
        path.insert(id),
        "an accepted {} contains itself",
        match v {
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            _ => "dict",
        }
    );
    match v {
        Value::Tuple(t) => t.iter().for_each(|x| walk(x, budget, path)),
        Value::List(l) => l.borrow().iter().for_each(|x| walk(x, budget, path)),
        Value::Dict(d) => d.borrow().iter().for_each(|(k, x)| {
            walk(k, budget, path);
            walk(x, budget, path);
        }),
        _ => {}
    }
    path.remove(&id);
}

fuzz_target!(|data: &[u8]| {
    let Ok(u) = unpickle(data) else { return };
    assert!(u.end >= 1 && u.end <= data.len());
    assert_eq!(data[u.end - 1], b'.', "ends after STOP");
    let again = unpickle(&data[..u.end]).expect("the same bytes unpickle again");
    assert_eq!(again.end, u.end);
    walk(&u.value, &mut 10_000, &mut HashSet::new());
});
