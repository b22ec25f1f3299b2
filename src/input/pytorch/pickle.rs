//! A restricted unpickler for PyTorch state dicts. It never executes anything: it builds
//! plain values, and the only callables it knows are a fixed allow-list of globals whose
//! effect it reproduces itself (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`
//! and `_rebuild_tensor`, and the `torch.*Storage` types inside persistent ids). Any other
//! global (`os.system`, `builtins.eval`, ...) or opcode is refused with an error naming it.
//!
//! Every length read from the pickle is checked against the bytes that remain before
//! anything is allocated; the stack, the memo, and the mark depth are capped.
//!
//! The memo lets a pickle share values, so a [`Value`] is a graph, not a tree. Two things
//! keep hostile graphs harmless: a list or dict is never allowed to contain itself (an
//! APPEND or SETITEM that would close a cycle is refused, so `Rc` reference counting frees
//! everything), and nesting depth is unbounded but nothing here recurses on it: dropping a
//! value is iterative and `Debug` prints only the first [`DEBUG_DEPTH`] levels. Callers
//! that walk a value recursively must bound their own depth (as `views::flatten` does).

use cersa_loader::Dtype;
use std::cell::RefCell;
use std::rc::Rc;

/// Most values on the stack at once.
const MAX_STACK: usize = 1 << 20;
/// Most memo entries.
const MAX_MEMO: usize = 1 << 20;
/// Most nested marks.
const MAX_MARKS: usize = 4096;
/// Most dimensions of a tensor.
pub const MAX_DIMS: usize = 64;
/// Values examined, per byte of pickle (and at least [`MIN_CYCLE_STEPS`]), by the checks that
/// no list or dict comes to contain itself. A tree-shaped pickle costs at most its size
/// times its nesting depth; only containers shared many times through the memo and appended
/// again and again come near this.
const CYCLE_STEPS_PER_BYTE: usize = 64;
/// Floor of the cycle-check budget, for short pickles.
const MIN_CYCLE_STEPS: usize = 1 << 22;
/// Levels of nesting that `Debug` prints before eliding (values may nest a million deep).
pub const DEBUG_DEPTH: usize = 16;

/// A list or dict shared between the stack and the memo, as in Python (a dict memoized
/// before it is filled is seen filled when fetched from the memo again).
pub type Shared<T> = Rc<RefCell<T>>;

/// A global the unpickler allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// `collections.OrderedDict`.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2`.
    RebuildTensorV2,
    /// `torch._utils._rebuild_tensor`.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter` (an `nn.Parameter` in a state dict): its tensor.
    RebuildParameter,
    /// `torch.FloatStorage` and friends, with their element type.
    Storage(Dtype),
}

/// A storage named by a persistent id: `('storage', type, key, location, numel, ...)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    /// Element type.
    pub dtype: Dtype,
    /// Key of the storage (a file name in the zip layout).
    pub key: String,
    /// Number of elements the persistent id announces.
    pub numel: u64,
}

/// A tensor: a strided view of a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    /// The storage viewed.
    pub storage: StorageRef,
    /// Offset of the first element, in elements.
    pub offset: u64,
    /// Shape.
    pub shape: Vec<u64>,
    /// Strides, in elements.
    pub stride: Vec<u64>,
}

/// A value built by the unpickler: lists and dicts may be shared (through the memo), never
/// cyclic; nesting may be arbitrarily deep (dropping is iterative).
#[derive(Clone)]
pub enum Value {
    /// `None`.
    None,
    /// `True`/`False`.
    Bool(bool),
    /// An integer that fits i64.
    Int(i64),
    /// An integer too large for i64 (kept only as its bytes, little-endian two's complement).
    BigInt(Rc<[u8]>),
    /// A float.
    Float(f64),
    /// A text string (py2 strings are decoded lossily as UTF-8).
    Str(Rc<str>),
    /// Bytes.
    Bytes(Rc<[u8]>),
    /// A tuple.
    Tuple(Rc<[Value]>),
    /// A list.
    List(Shared<Vec<Value>>),
    /// A dict or OrderedDict, in insertion order.
    Dict(Shared<Vec<(Value, Value)>>),
    /// An allowed global.
    Global(Global),
    /// A storage from a persistent id.
    Storage(Rc<StorageRef>),
    /// A tensor.
    Tensor(Rc<TensorRef>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    /// The integer, when this is one that fits i64.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// Identity of a tuple, list or dict (the address of its shared allocation).
    fn container_id(&self) -> Option<*const ()> {
        match self {
            Value::Tuple(t) => Some(Rc::as_ptr(t) as *const ()),
            Value::List(l) => Some(Rc::as_ptr(l) as *const ()),
            Value::Dict(d) => Some(Rc::as_ptr(d) as *const ()),
            _ => None,
        }
    }

    /// Moves out the children of a container this is the last owner of (leaving it empty),
    /// pushing those that are containers themselves onto `out`.
    fn take_children(&mut self, out: &mut Vec<Value>) {
        let mut keep = |v: &mut Value| {
            if v.container_id().is_some() {
                out.push(std::mem::replace(v, Value::None));
            }
        };
        match self {
            Value::Tuple(t) => Rc::get_mut(t).into_iter().flatten().for_each(keep),
            Value::List(l) => {
                if let Some(l) = Rc::get_mut(l) {
                    l.get_mut().iter_mut().for_each(keep);
                }
            }
            Value::Dict(d) => {
                if let Some(d) = Rc::get_mut(d) {
                    for (k, v) in d.get_mut() {
                        keep(k);
                        keep(v);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Drops nested containers with a work list instead of the recursion of the derived drop
/// glue: `)` followed by a million TUPLE1 opcodes is a 1 MB pickle a million levels deep.
impl Drop for Value {
    fn drop(&mut self) {
        let mut work = Vec::new();
        self.take_children(&mut work);
        while let Some(mut v) = work.pop() {
            v.take_children(&mut work);
            // `v` is now shallow: its own drop finds nothing to take.
        }
    }
}

/// Leaves as the derived `Debug` would print them, containers as Python does (`(a,)`,
/// `[a]`, `{k: v}`), and containers deeper than [`DEBUG_DEPTH`] as `…`.
impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fmt_within(self, DEBUG_DEPTH, f)
    }
}

fn fmt_within(v: &Value, depth: usize, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    struct Within<'a>(&'a Value, usize);
    impl std::fmt::Debug for Within<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            fmt_within(self.0, self.1, f)
        }
    }
    if v.container_id().is_some() && depth == 0 {
        return write!(f, "…");
    }
    let d = depth.saturating_sub(1);
    match v {
        Value::None => write!(f, "None"),
        Value::Bool(b) => f.debug_tuple("Bool").field(b).finish(),
        Value::Int(i) => f.debug_tuple("Int").field(i).finish(),
        Value::BigInt(b) => f.debug_tuple("BigInt").field(b).finish(),
        Value::Float(x) => f.debug_tuple("Float").field(x).finish(),
        Value::Str(s) => f.debug_tuple("Str").field(s).finish(),
        Value::Bytes(b) => f.debug_tuple("Bytes").field(b).finish(),
        Value::Tuple(t) => t
            .iter()
            .fold(&mut f.debug_tuple(""), |b, x| b.field(&Within(x, d)))
            .finish(),
        Value::List(l) => f
            .debug_list()
            .entries(l.borrow().iter().map(|x| Within(x, d)))
            .finish(),
        Value::Dict(m) => f
            .debug_map()
            .entries(m.borrow().iter().map(|(k, x)| (Within(k, d), Within(x, d))))
            .finish(),
        Value::Global(g) => f.debug_tuple("Global").field(g).finish(),
        Value::Storage(s) => f.debug_tuple("Storage").field(s).finish(),
        Value::Tensor(t) => f.debug_tuple("Tensor").field(t).finish(),
    }
}

/// The storage element type of `torch.<name>`, when `name` is an allowed storage type.
pub fn storage_dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "FloatStorage" => Dtype::F32,
        "HalfStorage" => Dtype::F16,
        "BFloat16Storage" => Dtype::BF16,
        "DoubleStorage" => Dtype::F64,
        "LongStorage" => Dtype::I64,
        "IntStorage" => Dtype::I32,
        "ShortStorage" => Dtype::I16,
        "CharStorage" => Dtype::I8,
        "ByteStorage" => Dtype::U8,
        "BoolStorage" => Dtype::BOOL,
        _ => return None,
    })
}

fn resolve_global(module: &str, name: &str) -> Result<Global, String> {
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_tensor") => Ok(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
        ("torch", n) if storage_dtype(n).is_some() => {
            Ok(Global::Storage(storage_dtype(n).unwrap_or(Dtype::U8)))
        }
        _ => Err(format!(
            "refused global `{module}.{name}`: only collections.OrderedDict, \
             torch._utils._rebuild_tensor_v2/_rebuild_tensor/_rebuild_parameter and torch.*Storage types are \
             allowed (pickled code is never executed)"
        )),
    }
}

/// Result of one pickle: the value and the offset just past its STOP opcode.
pub struct Unpickled {
    /// The value.
    pub value: Value,
    /// Offset of the byte after STOP, relative to the start of the input.
    pub end: usize,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                format!(
                    "pickle truncated: {n} bytes needed at offset {}, {} left",
                    self.pos,
                    self.data.len().saturating_sub(self.pos)
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn line(&mut self) -> Result<&'a str, String> {
        let rest = self.data.get(self.pos..).unwrap_or(&[]);
        // Module and attribute names are short; a missing newline within 256 bytes is junk.
        let len = rest
            .iter()
            .take(256)
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("GLOBAL at offset {}: no newline", self.pos))?;
        let s = self.take(len)?;
        self.take(1)?;
        std::str::from_utf8(s).map_err(|_| format!("GLOBAL at offset {}: not UTF-8", self.pos))
    }
}

fn len_from(n: u64, r: &Reader) -> Result<usize, String> {
    let left = r.data.len().saturating_sub(r.pos) as u64;
    if n > left {
        return Err(format!(
            "pickle string of {n} bytes at offset {}, only {left} left",
            r.pos
        ));
    }
    Ok(n as usize)
}

struct Machine {
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: std::collections::HashMap<u32, Value>,
    /// Lists and dicts that have been made an element of a container (by address; a
    /// freed one's address reused only costs a needless walk). Only these can be inside
    /// the values added to a list or dict, so only additions to these need a walk.
    contained: std::collections::HashSet<*const ()>,
    /// Values the cycle checks may still examine.
    cycle_steps: usize,
}

impl Machine {
    /// Pushes a tuple of `items` (noting the lists and dicts among them as contained).
    fn push_tuple(&mut self, items: Vec<Value>) -> Result<(), String> {
        for v in &items {
            if let Value::List(_) | Value::Dict(_) = v {
                self.contained.extend(v.container_id());
            }
        }
        self.push(Value::Tuple(Rc::from(items)))
    }
    fn push(&mut self, v: Value) -> Result<(), String> {
        if self.stack.len() >= MAX_STACK {
            return Err(format!("pickle stack over {MAX_STACK} values"));
        }
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> Result<Value, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("pickle stack underflow".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".into())
    }
    fn top(&self) -> Result<&Value, String> {
        self.stack
            .last()
            .ok_or_else(|| "pickle stack empty".to_string())
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let m = self.marks.pop().ok_or("pickle: no MARK on the stack")?;
        if m > self.stack.len() {
            return Err("pickle: MARK above the stack".into());
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_put(&mut self, key: u32) -> Result<(), String> {
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return Err(format!("pickle memo over {MAX_MEMO} entries"));
        }
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }
    fn memo_get(&mut self, key: u32) -> Result<(), String> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| format!("pickle memo key {key} not set"))?;
        self.push(v)
    }
}

/// Whether `target` is one of `items` or inside one of them, examining at most `steps`
/// more values (shared containers once each).
fn reaches(items: &[Value], target: *const (), steps: &mut usize) -> Result<bool, String> {
    let mut seen = std::collections::HashSet::new();
    let mut work: Vec<Value> = Vec::new();
    let mut visit = |v: &Value, work: &mut Vec<Value>| -> Result<bool, String> {
        *steps = steps.checked_sub(1).ok_or(
            "pickle: checking that no list or dict contains itself took too long (containers \
             shared through the memo and added again many times over)",
        )?;
        match v.container_id() {
            Some(id) if id == target => return Ok(true),
            Some(id) if seen.insert(id) => work.push(v.clone()),
            _ => {}
        }
        Ok(false)
    };
    for v in items {
        if visit(v, &mut work)? {
            return Ok(true);
        }
    }
    while let Some(c) = work.pop() {
        match &c {
            Value::Tuple(t) => {
                for x in t.iter() {
                    if visit(x, &mut work)? {
                        return Ok(true);
                    }
                }
            }
            Value::List(l) => {
                for x in l.borrow().iter() {
                    if visit(x, &mut work)? {
                        return Ok(true);
                    }
                }
            }
            Value::Dict(d) => {
                for (k, x) in d.borrow().iter() {
                    if visit(k, &mut work)? || visit(x, &mut work)? {
                        return Ok(true);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

/// APPEND(S) (`dict` false) or SETITEM(S) (`dict` true) of `items` to the list or dict on
/// top of the stack; refused when it would contain itself afterwards.
fn add_to_top(m: &mut Machine, items: Vec<Value>, dict: bool, at: usize) -> Result<(), String> {
    let top = m.stack.last().ok_or("pickle stack empty")?;
    let (contained, steps) = (&m.contained, &mut m.cycle_steps);
    let no_cycle = |target: *const (), steps: &mut usize| {
        let cyclic = if contained.contains(&target) {
            reaches(&items, target, steps)?
        } else {
            items.iter().any(|v| v.container_id() == Some(target))
        };
        if cyclic {
            return Err(format!(
                "{} at offset {at} would make a {} contain itself (a cyclic pickle is not a \
                 state dict)",
                if dict { "SETITEM" } else { "APPEND" },
                top.kind()
            ));
        }
        Ok(())
    };
    let lists_and_dicts: Vec<_> = items
        .iter()
        .filter(|v| matches!(v, Value::List(_) | Value::Dict(_)))
        .filter_map(Value::container_id)
        .collect();
    match (top, dict) {
        (Value::List(l), false) => {
            no_cycle(Rc::as_ptr(l) as *const (), steps)?;
            l.borrow_mut().extend(items);
        }
        (Value::Dict(d), true) => {
            if !items.len().is_multiple_of(2) {
                return Err("SETITEMS with an odd number of values".into());
            }
            no_cycle(Rc::as_ptr(d) as *const (), steps)?;
            let mut d = d.borrow_mut();
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                d.push((k, v));
            }
        }
        (other, false) => return Err(format!("APPEND(S) on a {}", other.kind())),
        (other, true) => return Err(format!("SETITEM(S) on a {}", other.kind())),
    }
    m.contained.extend(lists_and_dicts);
    Ok(())
}

fn int_arg(v: &Value, what: &str) -> Result<u64, String> {
    v.as_int()
        .and_then(|i| u64::try_from(i).ok())
        .ok_or_else(|| format!("{what}: expected a non-negative int, found {}", v.kind()))
}

fn int_tuple(v: &Value, what: &str) -> Result<Vec<u64>, String> {
    let Value::Tuple(t) = v else {
        return Err(format!("{what}: expected a tuple, found {}", v.kind()));
    };
    if t.len() > MAX_DIMS {
        return Err(format!("{what}: {} dims, over {MAX_DIMS}", t.len()));
    }
    t.iter().map(|x| int_arg(x, what)).collect()
}

fn call(f: Global, args: Value) -> Result<Value, String> {
    let Value::Tuple(args) = &args else {
        return Err(format!("REDUCE arguments are a {}", args.kind()));
    };
    match f {
        Global::OrderedDict => {
            let mut items = Vec::new();
            match args.first() {
                None => {}
                Some(Value::List(l)) => {
                    for pair in l.borrow().iter() {
                        match pair {
                            Value::Tuple(kv) if kv.len() == 2 => {
                                items.push((kv[0].clone(), kv[1].clone()))
                            }
                            _ => return Err("OrderedDict(items): items must be pairs".into()),
                        }
                    }
                }
                Some(other) => return Err(format!("OrderedDict({})", other.kind())),
            }
            Ok(Value::Dict(Rc::new(RefCell::new(items))))
        }
        Global::RebuildTensorV2 | Global::RebuildTensor => {
            if args.len() < 4 {
                return Err(format!("_rebuild_tensor with {} arguments", args.len()));
            }
            let Value::Storage(storage) = &args[0] else {
                return Err(format!(
                    "_rebuild_tensor: first argument is a {}, not a storage",
                    args[0].kind()
                ));
            };
            let offset = int_arg(&args[1], "storage offset")?;
            let shape = int_tuple(&args[2], "size")?;
            let stride = int_tuple(&args[3], "stride")?;
            if shape.len() != stride.len() {
                return Err(format!(
                    "tensor size has {} dims but stride has {}",
                    shape.len(),
                    stride.len()
                ));
            }
            Ok(Value::Tensor(Rc::new(TensorRef {
                storage: (**storage).clone(),
                offset,
                shape,
                stride,
            })))
        }
        Global::RebuildParameter => match args.first() {
            // (data, requires_grad, backward_hooks): only the data matters to a converter.
            Some(t @ Value::Tensor(_)) => Ok(t.clone()),
            Some(other) => Err(format!(
                "_rebuild_parameter: first argument is a {}, not a tensor",
                other.kind()
            )),
            None => Err("_rebuild_parameter without arguments".into()),
        },
        Global::Storage(_) => Err("calling a storage type is not allowed".into()),
    }
}

fn persistent_load(pid: Value) -> Result<Value, String> {
    let Value::Tuple(t) = &pid else {
        return Err(format!("persistent id is a {}, not a tuple", pid.kind()));
    };
    match t.first() {
        Some(Value::Str(s)) if &**s == "storage" => {}
        _ => return Err("persistent id is not a ('storage', ...) tuple".into()),
    }
    if t.len() < 5 {
        return Err(format!("storage persistent id has {} fields", t.len()));
    }
    let Value::Global(Global::Storage(dtype)) = t[1] else {
        return Err(format!("storage type is a {}", t[1].kind()));
    };
    let key = match &t[2] {
        Value::Str(s) => s.to_string(),
        other => return Err(format!("storage key is a {}", other.kind())),
    };
    let numel = int_arg(&t[4], "storage size")?;
    // Legacy files may name a view of another storage (pre-0.4 torch): not supported.
    if t.len() > 5 && !matches!(t[5], Value::None) {
        return Err(format!(
            "storage `{key}` is a view of another storage (pre-0.4 checkpoint), not supported"
        ));
    }
    Ok(Value::Storage(Rc::new(StorageRef { dtype, key, numel })))
}

/// Unpickles one pickle starting at `data[0]`.
pub fn unpickle(data: &[u8]) -> Result<Unpickled, String> {
    let mut r = Reader { data, pos: 0 };
    let mut m = Machine {
        stack: Vec::new(),
        marks: Vec::new(),
        memo: std::collections::HashMap::new(),
        contained: std::collections::HashSet::new(),
        cycle_steps: data
            .len()
            .saturating_mul(CYCLE_STEPS_PER_BYTE)
            .max(MIN_CYCLE_STEPS),
    };
    loop {
        let at = r.pos;
        let op = r.u8()?;
        match op {
            0x80 => {
                let proto = r.u8()?;
                if proto > 5 {
                    return Err(format!("pickle protocol {proto} is not supported"));
                }
            }
            0x95 => {
                r.take(8)?;
            }
            b'}' => m.push(Value::Dict(Rc::new(RefCell::new(Vec::new()))))?,
            b']' => m.push(Value::List(Rc::new(RefCell::new(Vec::new()))))?,
            b')' => m.push(Value::Tuple(Rc::from(Vec::new())))?,
            b'(' => {
                if m.marks.len() >= MAX_MARKS {
                    return Err(format!("more than {MAX_MARKS} nested MARKs"));
                }
                m.marks.push(m.stack.len());
            }
            b'X' | 0x8d | 0x8c | b'T' | b'U' | b'B' | b'C' | 0x8e => {
                let n = match op {
                    b'X' | b'B' => u32::from_le_bytes(r.arr()?) as u64,
                    b'T' => u64::try_from(i32::from_le_bytes(r.arr()?))
                        .map_err(|_| format!("negative BINSTRING length at offset {at}"))?,
                    0x8d | 0x8e => u64::from_le_bytes(r.arr()?),
                    _ => r.u8()? as u64,
                };
                let n = len_from(n, &r)?;
                let bytes = r.take(n)?;
                let v = match op {
                    b'B' | b'C' | 0x8e => Value::Bytes(Rc::from(bytes)),
                    b'T' | b'U' => Value::Str(Rc::from(String::from_utf8_lossy(bytes).as_ref())),
                    _ => Value::Str(Rc::from(
                        std::str::from_utf8(bytes)
                            .map_err(|_| format!("BINUNICODE at offset {at} is not UTF-8"))?,
                    )),
                };
                m.push(v)?;
            }
            b'J' => m.push(Value::Int(i32::from_le_bytes(r.arr()?) as i64))?,
            b'K' => m.push(Value::Int(r.u8()? as i64))?,
            b'M' => m.push(Value::Int(u16::from_le_bytes(r.arr()?) as i64))?,
            0x8a => {
                let n = r.u8()? as usize;
                let b = r.take(n)?;
                let v = if n == 0 {
                    Value::Int(0)
                } else if n <= 8 {
                    let fill = if b[n - 1] & 0x80 != 0 { 0xff } else { 0 };
                    let mut a = [fill; 8];
                    a[..n].copy_from_slice(b);
                    Value::Int(i64::from_le_bytes(a))
                } else {
                    Value::BigInt(Rc::from(b))
                };
                m.push(v)?;
            }
            b'G' => m.push(Value::Float(f64::from_be_bytes(r.arr()?)))?,
            b'N' => m.push(Value::None)?,
            0x88 => m.push(Value::Bool(true))?,
            0x89 => m.push(Value::Bool(false))?,
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let floor = m.marks.last().copied().unwrap_or(0);
                if m.stack.len() < floor + n {
                    return Err(format!("TUPLE{n} at offset {at}: stack underflow"));
                }
                let items = m.stack.split_off(m.stack.len() - n);
                m.push_tuple(items)?;
            }
            b't' => {
                let items = m.pop_mark()?;
                m.push_tuple(items)?;
            }
            b's' => {
                let v = m.pop()?;
                let k = m.pop()?;
                add_to_top(&mut m, vec![k, v], true, at)?;
            }
            b'u' => {
                let items = m.pop_mark()?;
                add_to_top(&mut m, items, true, at)?;
            }
            b'a' | b'e' => {
                let items = if op == b'a' {
                    vec![m.pop()?]
                } else {
                    m.pop_mark()?
                };
                add_to_top(&mut m, items, false, at)?;
            }
            b'q' => {
                let k = r.u8()? as u32;
                m.memo_put(k)?;
            }
            b'r' => {
                let k = u32::from_le_bytes(r.arr()?);
                m.memo_put(k)?;
            }
            0x94 => {
                let k = u32::try_from(m.memo.len()).map_err(|_| "memo too large")?;
                m.memo_put(k)?;
            }
            b'h' => {
                let k = r.u8()? as u32;
                m.memo_get(k)?;
            }
            b'j' => {
                let k = u32::from_le_bytes(r.arr()?);
                m.memo_get(k)?;
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                m.push(Value::Global(resolve_global(module, name)?))?;
            }
            0x93 => {
                let name = m.pop()?;
                let module = m.pop()?;
                match (&module, &name) {
                    (Value::Str(a), Value::Str(b)) => {
                        m.push(Value::Global(resolve_global(a, b)?))?
                    }
                    _ => return Err(format!("STACK_GLOBAL at offset {at}: operands not str")),
                }
            }
            b'R' | 0x81 => {
                let args = m.pop()?;
                let f = m.pop()?;
                let Value::Global(g) = f else {
                    return Err(format!("REDUCE at offset {at} on a {}", f.kind()));
                };
                m.push(call(g, args)?)?;
            }
            b'b' => {
                // BUILD sets attributes (`_metadata` of a state dict, tensor flags); the
                // values in a state dict do not depend on them, so the state is dropped.
                let _state = m.pop()?;
                match m.top()? {
                    Value::Dict(_) | Value::Tensor(_) => {}
                    other => return Err(format!("BUILD at offset {at} on a {}", other.kind())),
                }
            }
            b'Q' => {
                let pid = m.pop()?;
                m.push(persistent_load(pid)?)?;
            }
            b'0' => {
                m.pop()?;
            }
            b'1' => {
                m.pop_mark()?;
            }
            b'2' => {
                let v = m.top()?.clone();
                m.push(v)?;
            }
            b'.' => {
                let value = m.pop()?;
                return Ok(Unpickled { value, end: r.pos });
            }
            other => {
                return Err(format!(
                    "pickle opcode 0x{other:02x} ({:?}) at offset {at} is not allowed in a \
                     state dict",
                    other as char
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_os_system() {
        let p = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        let e = unpickle(p).err().unwrap();
        assert!(e.contains("`os.system`"), "{e}");
    }

    #[test]
    fn refuses_stack_global_eval() {
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        let e = unpickle(p).err().unwrap();
        assert!(e.contains("`builtins.eval`"), "{e}");
    }

    #[test]
    fn hostile_lengths_error_without_allocating() {
        let e = unpickle(b"\x80\x02X\xff\xff\xff\xff").err().unwrap();
        assert!(e.contains("only 0 left"), "{e}");
        let e = unpickle(b"\x8d\xff\xff\xff\xff\xff\xff\xff\xff")
            .err()
            .unwrap();
        assert!(e.contains("only 0 left"), "{e}");
        assert!(unpickle(b"h\x05.").is_err());
        assert!(unpickle(b"t.").is_err());
        assert!(unpickle(b"").is_err());
    }

    #[test]
    fn parameters_unwrap_to_their_tensor() {
        // torch._utils._rebuild_parameter(_rebuild_tensor_v2(storage, 0, (2, 2), (2, 1),
        // False, OrderedDict()), True, OrderedDict())
        let mut p =
            b"\x80\x02ctorch._utils\n_rebuild_parameter\n(ctorch._utils\n_rebuild_tensor_v2\n("
                .to_vec();
        p.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ");
        p.extend(b"K\x00K\x02K\x02\x86K\x02K\x01\x86\x89ccollections\nOrderedDict\n)Rt");
        p.extend(b"R\x88ccollections\nOrderedDict\n)RtR.");
        let v = unpickle(&p).unwrap().value;
        let Value::Tensor(t) = &v else {
            panic!("expected a tensor, got {}", v.kind())
        };
        assert_eq!(t.shape, vec![2, 2]);
        assert_eq!(t.stride, vec![2, 1]);
    }

    #[test]
    fn memo_aliasing_like_python() {
        // d = {}; memo[0] = d; d["a"] = 1; return (memo[0],)
        let p = b"}q\x00X\x01\x00\x00\x00aK\x01sh\x00\x85.";
        let v = unpickle(p).unwrap().value;
        let Value::Tuple(t) = &v else { panic!() };
        let Value::Dict(d) = &t[0] else { panic!() };
        assert_eq!(d.borrow().len(), 1);
    }

    /// fuzz/regressions/pytorch_pickle/list-contains-itself.pkl: `]q\0 h\0 a .`, a list
    /// appended to itself through the memo. The `Rc` cycle was never freed: each such input
    /// leaked its list (2 million runs of this one: 700 MB RSS), and a derived `Debug` of it
    /// never ended. Refused now, with every other way of closing a cycle.
    #[test]
    fn a_list_or_dict_containing_itself_is_refused() {
        let b = include_bytes!("../../../fuzz/regressions/pytorch_pickle/list-contains-itself.pkl");
        let e = unpickle(b).err().unwrap();
        assert!(
            e.contains("APPEND at offset 5 would make a list contain itself"),
            "{e}"
        );
        for (p, what) in [
            (&b"]2a."[..], "APPEND at offset 2 would make a list"),
            (b"](q\x00h\x00e.", "APPEND at offset 6 would make a list"),
            (
                b"}q\x00K\x01h\x00s.",
                "SETITEM at offset 7 would make a dict",
            ),
            (b"}q\x00h\x00\x85K\x01s.", "SETITEM"),
            (b"}q\x00(K\x01]h\x00au.", "SETITEM"),
            (b"]q\x00]h\x00aa.", "APPEND at offset 7"),
            (b"]q\x00h\x00\x85\x85a.", "APPEND"),
        ] {
            let e = unpickle(p).err().unwrap();
            assert!(
                e.contains(what) && e.contains("contain itself"),
                "{p:?}: {e}"
            );
        }
        // Sharing without a cycle is Python's (and kept): the same list twice in another.
        let v = unpickle(b"]q\x00K\x01a]h\x00h\x00\x86a.").unwrap().value;
        let Value::List(outer) = &v else { panic!() };
        let Value::Tuple(pair) = &outer.borrow()[0] else {
            panic!()
        };
        let (Value::List(a), Value::List(b)) = (&pair[0], &pair[1]) else {
            panic!()
        };
        assert!(Rc::ptr_eq(a, b) && a.borrow().len() == 1);
    }

    /// The cycle checks have a budget: a list that is inside a container (so additions to
    /// it are walked) receiving a big shared list again and again (quadratic work) is
    /// refused rather than spun on.
    #[test]
    fn cycle_checks_are_bounded() {
        // memo[0] = [[], [], ...] (4096 lists); c = [] inside a tuple; 4096 × c.append(memo[0]).
        let mut p = b"](".to_vec();
        p.extend(b"]".repeat(4096));
        p.extend(b"eq\x000]q\x01\x850h\x01");
        p.extend(b"h\x00a".repeat(4096));
        p.push(b'.');
        let e = unpickle(&p).err().unwrap();
        assert!(e.contains("took too long"), "{e}");
        // The same additions to a list inside nothing need no walk.
        p.retain(|&b| b != 0x85);
        assert!(unpickle(&p).is_ok());
    }

    /// Runs `f` on a thread with a `kib` KiB stack (test threads have 2 MiB).
    fn on_small_stack(kib: usize, f: impl FnOnce() + Send + 'static) {
        std::thread::Builder::new()
            .stack_size(kib << 10)
            .spawn(f)
            .unwrap()
            .join()
            .expect("no stack overflow");
    }

    /// fuzz/regressions/pytorch_pickle/tuples-nested-2000-deep.pkl: `)` and 2000 TUPLE1.
    /// The derived drop glue and `Debug` recursed once per level: this one needed more than
    /// 256 KiB (drop) and 512 KiB (`Debug`) of stack in a debug build, and `)` + a million
    /// TUPLE1 (a 1 MB pickle) overflowed the 8 MiB main stack of the release binary. Drop
    /// is a work list now and `Debug` stops at DEBUG_DEPTH levels; depth itself is allowed
    /// (callers that recurse bound their own depth).
    #[test]
    fn deep_nesting_drops_and_prints_without_recursion() {
        on_small_stack(64, || {
            let b = include_bytes!(
                "../../../fuzz/regressions/pytorch_pickle/tuples-nested-2000-deep.pkl"
            );
            let v = unpickle(b).unwrap().value;
            let text = format!("{v:?}");
            assert_eq!(
                text,
                "(".repeat(DEBUG_DEPTH) + "…" + &",)".repeat(DEBUG_DEPTH)
            );
            drop(v);
        });
        // A million levels of tuples, and of lists (pushed, then appended inward).
        let mut tuples = b"\x80\x02)".to_vec();
        tuples.extend(std::iter::repeat_n(0x85, 1_000_000));
        tuples.push(b'.');
        let mut lists = b"]".repeat(1_000_000);
        lists.extend(b"a".repeat(999_999));
        lists.push(b'.');
        on_small_stack(64, move || {
            for (p, open, close) in [(tuples, "(", ",)"), (lists, "[", "]")] {
                let v = unpickle(&p).unwrap().value;
                let text = format!("{v:?}");
                assert_eq!(
                    text,
                    open.repeat(DEBUG_DEPTH) + "…" + &close.repeat(DEBUG_DEPTH)
                );
            }
        });
    }

    /// fuzz/regressions/pytorch_pickle/oom-leak-found-by-fuzzer: the input the pytorch_pickle
    /// target was running when its RSS passed the 2 GB limit. It is harmless (a mutated
    /// MiniLM state dict: 22 tensors, a memo key reused); the memory was the leaked cycles
    /// of earlier inputs (see `a_list_or_dict_containing_itself_is_refused`). It reads, and
    /// dropping it frees everything.
    #[test]
    fn fuzzer_oom_input_reads_and_frees() {
        let b = include_bytes!("../../../fuzz/regressions/pytorch_pickle/oom-leak-found-by-fuzzer");
        let u = unpickle(b).unwrap();
        assert_eq!(u.end, b.len());
        let Value::Dict(d) = &u.value else {
            panic!("a {}", u.value.kind())
        };
        assert_eq!(d.borrow().len(), 32);
        assert!(d
            .borrow()
            .iter()
            .all(|(_, t)| matches!(t, Value::Tensor(_))));
        let weak = Rc::downgrade(d);
        drop(u);
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn long1_and_bigint() {
        let v = unpickle(b"\x8a\x02\xff\xff.").unwrap().value;
        assert_eq!(v.as_int(), Some(-1));
        let v = unpickle(b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.").unwrap();
        assert!(matches!(v.value, Value::BigInt(_)));
    }
}
