//! A restricted unpickler for PyTorch state dicts. It never executes anything: it builds
//! plain values, and the only callables it knows are a fixed allow-list of globals whose
//! effect it reproduces itself (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`
//! and `_rebuild_tensor`, and the `torch.*Storage` types inside persistent ids). Any other
//! global (`os.system`, `builtins.eval`, ...) or opcode is refused with an error naming it.
//!
//! Every length read from the pickle is checked against the bytes that remain before
//! anything is allocated; the stack, the memo, and the mark depth are capped.

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

/// A value built by the unpickler.
#[derive(Debug, Clone)]
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
}

impl Machine {
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

fn set_items(dict: &Value, items: Vec<Value>) -> Result<(), String> {
    let Value::Dict(d) = dict else {
        return Err(format!("SETITEM(S) on a {}", dict.kind()));
    };
    if !items.len().is_multiple_of(2) {
        return Err("SETITEMS with an odd number of values".into());
    }
    let mut d = d.borrow_mut();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        d.push((k, v));
    }
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
    let Value::Tuple(args) = args else {
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
                m.push(Value::Tuple(Rc::from(items)))?;
            }
            b't' => {
                let items = m.pop_mark()?;
                m.push(Value::Tuple(Rc::from(items)))?;
            }
            b's' => {
                let v = m.pop()?;
                let k = m.pop()?;
                set_items(m.top()?, vec![k, v])?;
            }
            b'u' => {
                let items = m.pop_mark()?;
                set_items(m.top()?, items)?;
            }
            b'a' | b'e' => {
                let items = if op == b'a' {
                    vec![m.pop()?]
                } else {
                    m.pop_mark()?
                };
                match m.top()? {
                    Value::List(l) => l.borrow_mut().extend(items),
                    other => return Err(format!("APPEND(S) on a {}", other.kind())),
                }
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
        let Value::Tensor(t) = v else {
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
        let Value::Tuple(t) = v else { panic!() };
        let Value::Dict(d) = &t[0] else { panic!() };
        assert_eq!(d.borrow().len(), 1);
    }

    #[test]
    fn long1_and_bigint() {
        let v = unpickle(b"\x8a\x02\xff\xff.").unwrap().value;
        assert_eq!(v.as_int(), Some(-1));
        let v = unpickle(b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.").unwrap();
        assert!(matches!(v.value, Value::BigInt(_)));
    }
}
