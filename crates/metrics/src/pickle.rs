//! A reader for the small subset of Python's pickle format that numpy weight files use:
//! nested dicts of string keys holding numpy arrays (protocols 2 to 5, little-endian
//! `float32`/`float64` arrays). It builds values, never runs code: the only globals it
//! accepts are `numpy.core.multiarray._reconstruct`, `numpy.ndarray` and `numpy.dtype`;
//! anything else is refused with an error naming it.

use std::collections::BTreeMap;

/// A numpy array read from a pickle, converted to `f32`.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    /// `numpy.dtype(code, ...)`; its `BUILD` state must say little-endian or no order.
    Dtype {
        code: String,
    },
    /// An ndarray made by `_reconstruct`; filled in by `BUILD`.
    Array(Option<Array>),
    Mark,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    Reconstruct,
    Ndarray,
    Dtype,
}

fn global(module: &str, name: &str) -> Result<Global, String> {
    match (module, name) {
        ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct") => {
            Ok(Global::Reconstruct)
        }
        ("numpy", "ndarray") => Ok(Global::Ndarray),
        ("numpy", "dtype") => Ok(Global::Dtype),
        _ => Err(format!(
            "refusing global `{module}.{name}` (only numpy arrays in dicts are read)"
        )),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.pos + n > self.buf.len() {
            return Err(format!("truncated at byte {}", self.pos));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<String, String> {
        let start = self.pos;
        while self.u8()? != b'\n' {}
        Ok(String::from_utf8_lossy(&self.buf[start..self.pos - 1]).into_owned())
    }
    fn string(&mut self, n: usize) -> Result<String, String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "string is not UTF-8".to_string())
    }
}

/// Parses a pickle of nested string-keyed dicts of numpy arrays into a flat map from
/// `/`-joined key paths (`"AlexNet_0/Conv_0/kernel"`) to arrays.
pub fn load_arrays(bytes: &[u8]) -> Result<BTreeMap<String, Array>, String> {
    let root = unpickle(bytes)?;
    let mut out = BTreeMap::new();
    flatten(&root, String::new(), &mut out)?;
    Ok(out)
}

fn flatten(v: &Value, prefix: String, out: &mut BTreeMap<String, Array>) -> Result<(), String> {
    match v {
        Value::Dict(items) => {
            for (k, v) in items {
                let Value::Str(k) = k else {
                    return Err(format!("non-string key under `{prefix}`"));
                };
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}/{k}")
                };
                flatten(v, path, out)?;
            }
            Ok(())
        }
        Value::Array(Some(a)) => {
            out.insert(prefix, a.clone());
            Ok(())
        }
        other => Err(format!("unexpected value at `{prefix}`: {other:?}")),
    }
}

fn pop_mark(stack: &mut Vec<Value>) -> Result<Vec<Value>, String> {
    let at = stack
        .iter()
        .rposition(|v| matches!(v, Value::Mark))
        .ok_or("no MARK on the stack")?;
    let items = stack.split_off(at + 1);
    stack.pop();
    Ok(items)
}

fn pop(stack: &mut Vec<Value>) -> Result<Value, String> {
    stack.pop().ok_or_else(|| "stack underflow".to_string())
}

fn set_items(dict: &mut Value, items: Vec<Value>) -> Result<(), String> {
    let Value::Dict(d) = dict else {
        return Err("SETITEM(S) on a non-dict".into());
    };
    if !items.len().is_multiple_of(2) {
        return Err("odd number of items for SETITEMS".into());
    }
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        d.push((k, v));
    }
    Ok(())
}

fn unpickle(bytes: &[u8]) -> Result<Value, String> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: BTreeMap<u32, Value> = BTreeMap::new();
    loop {
        let at = r.pos;
        let op = r.u8()?;
        match op {
            0x80 => {
                let proto = r.u8()?;
                if proto > 5 {
                    return Err(format!("pickle protocol {proto} is newer than 5"));
                }
            }
            0x95 => {
                r.u64()?; // FRAME: a length hint
            }
            b'.' => return pop(&mut stack),
            b'(' => stack.push(Value::Mark),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(r.u16()? as i64)),
            b'J' => stack.push(Value::Int(r.u32()? as i32 as i64)),
            b'X' => {
                let n = r.u32()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            0x8d => {
                let n = r.u64()? as usize;
                stack.push(Value::Str(r.string(n)?));
            }
            b'C' => {
                let n = r.u8()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b'B' => {
                let n = r.u32()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            0x8e => {
                let n = r.u64()? as usize;
                stack.push(Value::Bytes(r.take(n)?.to_vec()));
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err("stack underflow".into());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items));
            }
            b'q' => {
                let i = r.u8()? as u32;
                memo.insert(i, stack.last().ok_or("BINPUT on empty stack")?.clone());
            }
            b'r' => {
                let i = r.u32()?;
                memo.insert(i, stack.last().ok_or("LONG_BINPUT on empty stack")?.clone());
            }
            0x94 => {
                let i = memo.len() as u32;
                memo.insert(i, stack.last().ok_or("MEMOIZE on empty stack")?.clone());
            }
            b'h' | b'j' => {
                let i = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                stack.push(memo.get(&i).ok_or(format!("memo {i} unset"))?.clone());
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Value::Global(global(&module, &name)?));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                let (Value::Str(m), Value::Str(n)) = (module, name) else {
                    return Err("STACK_GLOBAL needs two strings".into());
                };
                stack.push(Value::Global(global(&m, &n)?));
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                stack.push(reduce(f, args)?);
            }
            b'b' => {
                let state = pop(&mut stack)?;
                let obj = pop(&mut stack)?;
                stack.push(build(obj, state)?);
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                set_items(stack.last_mut().ok_or("SETITEM without dict")?, vec![k, v])?;
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                set_items(stack.last_mut().ok_or("SETITEMS without dict")?, items)?;
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.push(v),
                    _ => return Err("APPEND on a non-list".into()),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => return Err("APPENDS on a non-list".into()),
                }
            }
            _ => return Err(format!("unsupported pickle opcode 0x{op:02x} at byte {at}")),
        }
    }
}

fn reduce(f: Value, args: Value) -> Result<Value, String> {
    let Value::Tuple(args) = args else {
        return Err("REDUCE arguments are not a tuple".into());
    };
    match f {
        Value::Global(Global::Reconstruct) => match args.first() {
            Some(Value::Global(Global::Ndarray)) => Ok(Value::Array(None)),
            _ => Err("_reconstruct of something other than numpy.ndarray".into()),
        },
        Value::Global(Global::Dtype) => match args.first() {
            Some(Value::Str(code)) => Ok(Value::Dtype { code: code.clone() }),
            _ => Err("numpy.dtype without a type code".into()),
        },
        other => Err(format!("cannot call {other:?}")),
    }
}

fn build(obj: Value, state: Value) -> Result<Value, String> {
    let Value::Tuple(s) = state else {
        return Err("BUILD state is not a tuple".into());
    };
    match obj {
        Value::Dtype { code, .. } => {
            // (version, byte order, subarray, names, fields, elsize, alignment, flags)
            let order = match s.get(1) {
                Some(Value::Str(o)) => o.as_str(),
                _ => "|",
            };
            if order == ">" {
                return Err(format!("big-endian dtype {code} is not supported"));
            }
            Ok(Value::Dtype { code })
        }
        Value::Array(None) => {
            // (version, shape, dtype, is_fortran_order, raw bytes)
            let [_, Value::Tuple(shape), Value::Dtype { code, .. }, Value::Bool(fortran), Value::Bytes(raw)] =
                s.as_slice()
            else {
                return Err(format!("unexpected ndarray state {s:?}"));
            };
            let shape = shape
                .iter()
                .map(|d| match d {
                    Value::Int(n) if *n >= 0 => Ok(*n as usize),
                    _ => Err("bad array dimension".to_string()),
                })
                .collect::<Result<Vec<usize>, _>>()?;
            let count: usize = shape.iter().product();
            let data: Vec<f32> = match code.as_str() {
                "f4" => raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                "f8" => raw
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
                other => return Err(format!("array dtype `{other}` is not supported")),
            };
            if data.len() != count {
                return Err(format!(
                    "array of shape {shape:?} carries {} values",
                    data.len()
                ));
            }
            if *fortran && shape.len() > 1 {
                return Err("Fortran-order arrays are not supported".into());
            }
            Ok(Value::Array(Some(Array { shape, data })))
        }
        other => Err(format!("BUILD on {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pickle.dumps({'a': {'w': np.array([1.5, -2.0], dtype='<f4')}}, protocol=4)`,
    /// assembled by hand from the opcodes numpy's reducer emits.
    fn tiny(protocol: u8) -> Vec<u8> {
        let mut p = vec![
            0x80, protocol, b'}', b'(', 0x8c, 1, b'a', b'}', 0x8c, 1, b'w',
        ];
        p.extend_from_slice(b"cnumpy.core.multiarray\n_reconstruct\n");
        p.extend_from_slice(b"cnumpy\nndarray\n");
        p.extend_from_slice(&[b'K', 0, 0x85, b'C', 1, b'b', 0x87, b'R']);
        p.extend_from_slice(&[b'(', b'K', 1, b'K', 2, 0x85]);
        p.extend_from_slice(b"cnumpy\ndtype\n");
        p.extend_from_slice(&[0x8c, 2, b'f', b'4', 0x89, 0x88, 0x87, b'R']);
        p.extend_from_slice(&[b'(', b'K', 3, 0x8c, 1, b'<', b'N', b'N', b'N']);
        p.extend_from_slice(&[b'J', 0xff, 0xff, 0xff, 0xff, b'J', 0xff, 0xff, 0xff, 0xff]);
        p.extend_from_slice(&[b'K', 0, b't', b'b', 0x89, b'C', 8]);
        p.extend_from_slice(&1.5f32.to_le_bytes());
        p.extend_from_slice(&(-2.0f32).to_le_bytes());
        p.extend_from_slice(b"tbsu.");
        p
    }

    #[test]
    fn reads_a_nested_dict_of_arrays() {
        let m = load_arrays(&tiny(4)).unwrap();
        assert_eq!(m.len(), 1);
        let a = &m["a/w"];
        assert_eq!(a.shape, vec![2]);
        assert_eq!(a.data, vec![1.5, -2.0]);
    }

    #[test]
    fn refuses_other_globals_and_truncation() {
        let mut p = vec![0x80, 4];
        p.extend_from_slice(b"cos\nsystem\n");
        let e = load_arrays(&p).unwrap_err();
        assert!(e.contains("os.system"), "{e}");
        let t = tiny(4);
        let e = load_arrays(&t[..t.len() - 5]).unwrap_err();
        assert!(e.contains("truncated") || e.contains("underflow"), "{e}");
    }
}
