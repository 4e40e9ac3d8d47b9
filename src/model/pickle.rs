//! A bounded reader for the pickles inside PyTorch checkpoints.
//!
//! It runs the subset of pickle protocol 2–5 opcodes that `torch.save` emits and builds a graph
//! of [`Node`]s in an arena, without calling anything: classes stay names. The work is linear in
//! the pickle's size, whatever it holds. Every opcode adds at most one node and consumes at least
//! one byte, and a memo lookup (`BINGET`) pushes the id of the stored node instead of copying
//! it, as Python does: the "billion laughs" pickle, which nests memo references to a container,
//! builds a handful of nodes here. Walking the graph afterwards is bounded by [`Pickle::walk_budget`].

use std::collections::HashMap;

/// Index of a node in [`Pickle::nodes`].
pub type NodeId = usize;

/// One unpickled object.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(usize),
    /// A class or function by name (`GLOBAL`), never resolved.
    Global {
        module: String,
        name: String,
    },
    Tuple(Vec<NodeId>),
    List(Vec<NodeId>),
    Dict(Vec<(NodeId, NodeId)>),
    /// `callable(*args)` (`REDUCE`, `NEWOBJ`), with the state a later `BUILD` gave it.
    Call {
        callable: NodeId,
        args: NodeId,
        state: Option<NodeId>,
    },
    /// A persistent id: how PyTorch refers to tensor storages kept outside the pickle.
    Persistent(NodeId),
}

/// An unpickled object graph; the root is the object `STOP` returned.
#[derive(Debug)]
pub struct Pickle {
    pub nodes: Vec<Node>,
    pub root: NodeId,
}

/// A stack entry: an object, or the `MARK` that starts a variable-length group.
#[derive(Clone, Copy, PartialEq)]
enum Entry {
    Object(NodeId),
    Mark,
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Entry>,
    memo: HashMap<u32, NodeId>,
}

impl Pickle {
    /// Nodes a walk over this graph may visit: a few times the graph's size, enough for any
    /// tree, and a bound on graphs whose shared nodes would make a naive walk exponential.
    pub fn walk_budget(&self) -> usize {
        4 * self.nodes.len() + 64
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let mut machine =
            Machine { bytes, pos: 0, nodes: Vec::new(), stack: Vec::new(), memo: HashMap::new() };
        let root = machine.run()?;
        Ok(Self { nodes: machine.nodes, root })
    }

    /// The node's string, if it is one.
    pub fn str(&self, id: NodeId) -> Option<&str> {
        match &self.nodes[id] {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The node's integer, if it is one.
    pub fn int(&self, id: NodeId) -> Option<i64> {
        match self.nodes[id] {
            Node::Int(i) => Some(i),
            _ => None,
        }
    }

    /// The ids of a tuple's (or list's) items.
    pub fn items(&self, id: NodeId) -> Option<&[NodeId]> {
        match &self.nodes[id] {
            Node::Tuple(items) | Node::List(items) => Some(items),
            _ => None,
        }
    }

    /// `module.name` of a `GLOBAL` node.
    pub fn global(&self, id: NodeId) -> Option<String> {
        match &self.nodes[id] {
            Node::Global { module, name } => Some(format!("{module}.{name}")),
            _ => None,
        }
    }
}

impl Machine<'_> {
    fn run(&mut self) -> Result<NodeId, String> {
        loop {
            let op = self.take(1)?[0];
            match op {
                0x80 => {
                    self.take(1)?; // PROTO version
                }
                0x95 => {
                    self.take(8)?; // FRAME length: frames are only a read-ahead hint
                }
                b'.' => return self.pop(), // STOP
                b'N' => self.push(Node::None),
                0x88 => self.push(Node::Bool(true)),
                0x89 => self.push(Node::Bool(false)),
                b'K' => {
                    let v = self.take(1)?[0];
                    self.push(Node::Int(v.into()))
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Node::Int(v.into()))
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Node::Int(v.into()))
                }
                0x8a => {
                    // LONG1: a little-endian two's-complement integer of n bytes.
                    let n = self.take(1)?[0] as usize;
                    if n > 8 {
                        return Err(format!("integer of {n} bytes is out of range"));
                    }
                    let raw = self.take(n)?;
                    let mut buf = if raw.last().is_some_and(|b| b & 0x80 != 0) { [0xff; 8] } else { [0; 8] };
                    buf[..n].copy_from_slice(raw);
                    self.push(Node::Int(i64::from_le_bytes(buf)))
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Node::Float(v))
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.array()?) as usize;
                    self.push_str(n)?
                }
                0x8c => {
                    let n = self.take(1)?[0] as usize;
                    self.push_str(n)?
                }
                b'C' => {
                    let n = self.take(1)?[0] as usize;
                    self.take(n)?;
                    self.push(Node::Bytes(n))
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.array()?) as usize;
                    self.take(n)?;
                    self.push(Node::Bytes(n))
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Node::Global { module, name })
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop_str()?;
                    let module = self.pop_str()?;
                    self.push(Node::Global { module, name })
                }
                b')' => self.push(Node::Tuple(Vec::new())),
                b']' => self.push(Node::List(Vec::new())),
                b'}' => self.push(Node::Dict(Vec::new())),
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let items = self.pop_n(n)?;
                    self.push(Node::Tuple(items))
                }
                b't' => {
                    let items = self.pop_to_mark()?;
                    self.push(Node::Tuple(items))
                }
                b'l' => {
                    let items = self.pop_to_mark()?;
                    self.push(Node::List(items))
                }
                b'd' => {
                    let items = self.pop_to_mark()?;
                    let pairs = pairs(items)?;
                    self.push(Node::Dict(pairs))
                }
                b'(' => self.stack.push(Entry::Mark),
                b'a' => {
                    let item = self.pop()?;
                    self.extend_list(vec![item])?
                }
                b'e' => {
                    let items = self.pop_to_mark()?;
                    self.extend_list(items)?
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.extend_dict(vec![(key, value)])?
                }
                b'u' => {
                    let items = self.pop_to_mark()?;
                    self.extend_dict(pairs(items)?)?
                }
                b'R' | 0x81 => {
                    // REDUCE / NEWOBJ: recorded, never called.
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.push(Node::Call { callable, args, state: None })
                }
                b'b' => {
                    // BUILD sets the state of the object below it, in place.
                    let state = self.pop()?;
                    let target = self.top()?;
                    match &mut self.nodes[target] {
                        Node::Call { state: slot, .. } => *slot = Some(state),
                        // A dict's BUILD state is its attributes (`_metadata`): not needed.
                        Node::Dict(_) => {}
                        other => return Err(format!("BUILD on {}", kind(other))),
                    }
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.push(Node::Persistent(id))
                }
                b'q' => {
                    let key = self.take(1)?[0].into();
                    self.memo_put(key)?
                }
                b'r' => {
                    let key = u32::from_le_bytes(self.array()?);
                    self.memo_put(key)?
                }
                0x94 => {
                    // MEMOIZE
                    let key = self.memo.len() as u32;
                    self.memo_put(key)?
                }
                b'h' => {
                    let key = self.take(1)?[0].into();
                    self.memo_get(key)?
                }
                b'j' => {
                    let key = u32::from_le_bytes(self.array()?);
                    self.memo_get(key)?
                }
                b'0' => {
                    self.pop()?;
                }
                other => {
                    return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {}", self.pos - 1))
                }
            }
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("the pickle ends early (at byte {})", self.bytes.len()))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn line(&mut self) -> Result<String, String> {
        let rest = &self.bytes[self.pos..];
        let len = rest.iter().position(|&b| b == b'\n').ok_or("the pickle ends inside a GLOBAL name")?;
        let text = String::from_utf8_lossy(&rest[..len]).into_owned();
        self.pos += len + 1;
        Ok(text)
    }

    fn push_str(&mut self, len: usize) -> Result<(), String> {
        let raw = self.take(len)?;
        let text = String::from_utf8(raw.to_vec()).map_err(|_| "a string is not UTF-8".to_string())?;
        self.push(Node::Str(text));
        Ok(())
    }

    fn push(&mut self, node: Node) {
        self.nodes.push(node);
        self.stack.push(Entry::Object(self.nodes.len() - 1));
    }

    fn pop(&mut self) -> Result<NodeId, String> {
        match self.stack.pop() {
            Some(Entry::Object(id)) => Ok(id),
            Some(Entry::Mark) => Err("an object was expected but a MARK was found".into()),
            None => Err("the pickle pops an empty stack".into()),
        }
    }

    fn top(&self) -> Result<NodeId, String> {
        match self.stack.last() {
            Some(Entry::Object(id)) => Ok(*id),
            _ => Err("the pickle expects an object on its stack".into()),
        }
    }

    fn pop_str(&mut self) -> Result<String, String> {
        let id = self.pop()?;
        match &self.nodes[id] {
            Node::Str(s) => Ok(s.clone()),
            other => Err(format!("STACK_GLOBAL expects strings, found {}", kind(other))),
        }
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<NodeId>, String> {
        let mut items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>, _>>()?;
        items.reverse();
        Ok(items)
    }

    fn pop_to_mark(&mut self) -> Result<Vec<NodeId>, String> {
        let mark = self.stack.iter().rposition(|e| *e == Entry::Mark).ok_or("MARK not found")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|e| match e {
                Entry::Object(id) => id,
                Entry::Mark => unreachable!("rposition found the last mark"),
            })
            .collect())
    }

    fn extend_list(&mut self, items: Vec<NodeId>) -> Result<(), String> {
        let target = self.top()?;
        match &mut self.nodes[target] {
            Node::List(list) => {
                list.extend(items);
                Ok(())
            }
            other => Err(format!("APPEND on {}", kind(other))),
        }
    }

    fn extend_dict(&mut self, items: Vec<(NodeId, NodeId)>) -> Result<(), String> {
        let target = self.top()?;
        match &mut self.nodes[target] {
            Node::Dict(dict) => dict.extend(items),
            // `OrderedDict()` and other dict subclasses are built by a call, then filled.
            Node::Call { state: None, .. } => self.nodes[target] = Node::Dict(items),
            other => return Err(format!("SETITEM on {}", kind(other))),
        }
        Ok(())
    }

    fn memo_put(&mut self, key: u32) -> Result<(), String> {
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), String> {
        let id =
            *self.memo.get(&key).ok_or_else(|| format!("memo entry {key} is read before it is written"))?;
        self.stack.push(Entry::Object(id));
        Ok(())
    }
}

fn pairs(items: Vec<NodeId>) -> Result<Vec<(NodeId, NodeId)>, String> {
    if items.len() % 2 != 0 {
        return Err("a dict has a key without a value".into());
    }
    Ok(items.chunks(2).map(|kv| (kv[0], kv[1])).collect())
}

fn kind(node: &Node) -> &'static str {
    match node {
        Node::None => "None",
        Node::Bool(_) => "a bool",
        Node::Int(_) => "an int",
        Node::Float(_) => "a float",
        Node::Str(_) => "a string",
        Node::Bytes(_) => "bytes",
        Node::Global { .. } => "a class",
        Node::Tuple(_) => "a tuple",
        Node::List(_) => "a list",
        Node::Dict(_) => "a dict",
        Node::Call { .. } => "an object",
        Node::Persistent(_) => "a persistent id",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{"a": [1, 2], "b": <the same list>}` with protocol-2 opcodes, memo shared.
    #[test]
    fn reads_dicts_lists_and_shared_memo_entries() {
        let bytes = b"\x80\x02}q\x00(X\x01\x00\x00\x00a]q\x01(K\x01K\x02eX\x01\x00\x00\x00bh\x01u.";
        let p = Pickle::parse(bytes).unwrap();
        let Node::Dict(items) = &p.nodes[p.root] else { panic!("{:?}", p.nodes[p.root]) };
        assert_eq!(items.len(), 2);
        assert_eq!(p.str(items[0].0), Some("a"));
        assert_eq!(items[0].1, items[1].1, "a memo reference shares its node");
        assert_eq!(p.items(items[0].1).map(|i| i.len()), Some(2));
    }

    #[test]
    fn refuses_malformed_pickles_with_a_reason() {
        assert!(Pickle::parse(b"\x80\x02X\xff\xff\xff\x7f").unwrap_err().contains("ends early"));
        assert!(Pickle::parse(b"h\x05.").unwrap_err().contains("memo entry 5"));
        assert!(Pickle::parse(b"\xfe").unwrap_err().contains("unsupported pickle opcode 0xfe"));
        assert!(Pickle::parse(b"e.").unwrap_err().contains("MARK not found"));
    }
}
