//! Reading every tensor of a checkpoint file (`.pth` zip or `.safetensors`), with bounded work.
//!
//! A `.pth` is a zip archive: `archive/data.pkl` pickles the object (a state_dict, a dict of
//! them, …) and refers to tensor storages `archive/data/N` by persistent id. The pickle is read
//! by [`super::pickle`], which never executes anything and whose work is linear in its size.
//! Before any tensor byte is read, the storages the pickle declares must fit in the file
//! (`torch.save` stores them uncompressed), and every tensor must fit in its storage: a file
//! that declares 2^40 elements is refused with a message, not an allocation of 4 TB.
//! Nested dicts are flattened into dotted names (`{"netG_A": {"model.1.weight": …}}` gives
//! `netG_A.model.1.weight`); everything that is not a tensor is skipped.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::pickle::{Node, NodeId, Pickle};

/// How deep dicts may nest (a state_dict in a checkpoint dict in a dict is 3).
const MAX_DEPTH: usize = 16;

/// Every tensor a checkpoint holds, under its flattened name, as f32 on the CPU.
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>, String> {
    let file_len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    let mut magic = [0u8; 9];
    let n = File::open(path).and_then(|mut f| f.read(&mut magic)).map_err(|e| e.to_string())?;
    match &magic[..n] {
        [b'P', b'K', 3, 4, ..] => read_pth(path, file_len),
        [_, _, _, _, _, _, _, _, b'{'] => read_safetensors(path),
        [0x80, ..] => Err("a legacy (pre-1.6, not zip) PyTorch file: re-save it with torch.save from \
                           PyTorch 1.6 or later"
            .into()),
        _ => Err("not a zip-format PyTorch checkpoint (.pth) nor a safetensors file".into()),
    }
}

fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, String> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| format!("not a readable safetensors file: {e}"))?;
    tensors
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(DType::F32).map_err(|e| e.to_string())?)))
        .collect()
}

/// A tensor as the pickle declares it: a row-major view into a storage.
struct TensorRef {
    name: String,
    storage: String,
    offset: usize,
    shape: Vec<usize>,
}

/// A storage as the pickle declares it: `archive/data/{key}` holding `numel` items of `dtype`.
struct StorageRef {
    dtype: DType,
    numel: usize,
}

fn read_pth(path: &Path, file_len: u64) -> Result<Vec<(String, Tensor)>, String> {
    let not_zip = |e: zip::result::ZipError| format!("not a zip-format PyTorch checkpoint ({e})");
    let mut zip = zip::ZipArchive::new(File::open(path).map_err(|e| e.to_string())?).map_err(not_zip)?;
    let pickle_name = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(not_zip)?
        .into_iter()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .ok_or("a zip file without data.pkl: not a PyTorch checkpoint")?;
    let archive = pickle_name.strip_suffix("data.pkl").unwrap_or_default().to_string();
    let pickle_bytes = read_entry(&mut zip, &pickle_name, file_len, file_len)?;
    let pickle = Pickle::parse(&pickle_bytes).map_err(|e| format!("cannot read its pickle: {e}"))?;

    let mut walker = Walker {
        pickle: &pickle,
        budget: pickle.walk_budget(),
        tensors: Vec::new(),
        storages: BTreeMap::new(),
    };
    walker.visit(pickle.root, "", 0)?;
    let Walker { tensors, storages, .. } = walker;

    let declared: u128 = storages.values().map(|s| s.numel as u128 * s.dtype.size_in_bytes() as u128).sum();
    if declared > file_len as u128 {
        return Err(format!(
            "it declares {declared} bytes of tensor data but the file holds only {file_len} bytes: \
             corrupt or hostile, refused before reading"
        ));
    }
    for t in &tensors {
        let numel = t.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let end = numel.and_then(|n| n.checked_add(t.offset));
        if end.is_none_or(|end| end > storages[&t.storage].numel) {
            return Err(format!("tensor {} {:?} reaches past the end of its storage", t.name, t.shape));
        }
    }

    let mut loaded: BTreeMap<&str, Tensor> = BTreeMap::new();
    for (key, storage) in &storages {
        let entry = format!("{archive}data/{key}");
        let expected = storage.numel * storage.dtype.size_in_bytes();
        let bytes = read_entry(&mut zip, &entry, expected as u64, file_len)?;
        if bytes.len() < expected {
            return Err(format!("storage {entry} holds {} bytes, its tensors need {expected}", bytes.len()));
        }
        let tensor =
            Tensor::from_raw_buffer(&bytes[..expected], storage.dtype, &[storage.numel], &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| format!("cannot read storage {entry}: {e}"))?;
        loaded.insert(key, tensor);
    }
    tensors
        .into_iter()
        .map(|t| {
            let numel = t.shape.iter().product();
            let tensor = loaded[t.storage.as_str()]
                .narrow(0, t.offset, numel)
                .and_then(|v| v.reshape(t.shape.as_slice()))
                .map_err(|e| format!("cannot read tensor {}: {e}", t.name))?;
            Ok((t.name, tensor))
        })
        .collect()
}

/// Reads the first `limit` bytes of a zip entry; an entry claiming more than the file holds (a
/// compressed bomb, or entries overlapping) is refused up front, so what is read in all stays
/// within the pickle plus the storages declared, both bounded by the file's size.
fn read_entry(
    zip: &mut zip::ZipArchive<File>,
    name: &str,
    limit: u64,
    file_len: u64,
) -> Result<Vec<u8>, String> {
    let entry = zip.by_name(name).map_err(|e| format!("cannot open {name} in the archive: {e}"))?;
    if entry.size() > file_len {
        return Err(format!("{name} claims {} bytes, more than the file's {file_len}", entry.size()));
    }
    let mut bytes = Vec::with_capacity(entry.size().min(limit) as usize);
    entry.take(limit).read_to_end(&mut bytes).map_err(|e| format!("cannot read {name}: {e}"))?;
    Ok(bytes)
}

/// Collects the tensors of an unpickled object graph, with a bound on the nodes it visits.
struct Walker<'a> {
    pickle: &'a Pickle,
    budget: usize,
    tensors: Vec<TensorRef>,
    storages: BTreeMap<String, StorageRef>,
}

impl Walker<'_> {
    fn visit(&mut self, id: NodeId, name: &str, depth: usize) -> Result<(), String> {
        self.budget = self.budget.checked_sub(1).ok_or(
            "its pickle refers to the same objects over and over (more work than its size allows): refused",
        )?;
        if depth > MAX_DEPTH {
            return Err(format!("its dicts nest deeper than {MAX_DEPTH} levels"));
        }
        let p = self.pickle;
        match &p.nodes[id] {
            Node::Dict(items) => {
                for &(key, value) in items {
                    // Non-string keys are not state_dict entries (e.g. an optimizer's param ids).
                    if let Some(key) = p.str(key) {
                        let child = if name.is_empty() { key.to_string() } else { format!("{name}.{key}") };
                        self.visit(value, &child, depth + 1)?;
                    }
                }
                Ok(())
            }
            Node::Call { callable, args, state } => {
                let callable = p.global(*callable).unwrap_or_default();
                match callable.as_str() {
                    "torch._utils._rebuild_tensor_v2" => self.tensor(*args, name),
                    "torch._utils._rebuild_parameter" => match p.items(*args) {
                        Some([data, ..]) => self.visit(*data, name, depth + 1),
                        _ => Err(format!("tensor {name}: malformed parameter")),
                    },
                    _ if state.is_some_and(|s| self.is_module_state(s)) => Err(format!(
                        "it pickles a whole module (`{callable}`), whose code cycleserve will not run; \
                         save its weights instead: torch.save(model.state_dict(), PATH)"
                    )),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// Whether a BUILD state is an `nn.Module`'s `__dict__`.
    fn is_module_state(&self, state: NodeId) -> bool {
        match &self.pickle.nodes[state] {
            Node::Dict(items) => {
                items.iter().any(|(k, _)| matches!(self.pickle.str(*k), Some("_modules" | "_parameters")))
            }
            _ => false,
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, …)`.
    fn tensor(&mut self, args: NodeId, name: &str) -> Result<(), String> {
        let p = self.pickle;
        let bad = |what: &str| format!("tensor {name}: {what}");
        let [storage, offset, size, stride, ..] = p.items(args).ok_or_else(|| bad("malformed"))? else {
            return Err(bad("malformed"));
        };
        let ints = |id: NodeId| -> Result<Vec<usize>, String> {
            let items = p.items(id).ok_or_else(|| bad("malformed size"))?;
            items
                .iter()
                .map(|&i| p.int(i).and_then(|v| usize::try_from(v).ok()).ok_or_else(|| bad("bad size")))
                .collect()
        };
        let (shape, strides) = (ints(*size)?, ints(*stride)?);
        if !is_row_major(&shape, &strides) {
            return Err(bad("not contiguous; save `tensor.contiguous()` instead"));
        }
        let offset = p.int(*offset).and_then(|v| usize::try_from(v).ok()).ok_or_else(|| bad("bad offset"))?;
        let Node::Persistent(pid) = p.nodes[*storage] else {
            return Err(bad("its storage is not a persistent id"));
        };
        // ('storage', torch.FloatStorage, key, location, numel)
        let Some([_, class, key, _, numel]) = p.items(pid) else { return Err(bad("malformed storage id")) };
        let dtype = match p.global(*class).as_deref() {
            Some("torch.FloatStorage") => DType::F32,
            Some("torch.HalfStorage") => DType::F16,
            Some("torch.BFloat16Storage") => DType::BF16,
            Some("torch.DoubleStorage") => DType::F64,
            Some("torch.LongStorage") => DType::I64,
            other => return Err(bad(&format!("unsupported storage type {}", other.unwrap_or_default()))),
        };
        let key = p.str(*key).ok_or_else(|| bad("bad storage key"))?.to_string();
        let numel =
            p.int(*numel).and_then(|v| usize::try_from(v).ok()).ok_or_else(|| bad("bad storage size"))?;
        if self.storages.get(&key).is_some_and(|s| s.dtype != dtype || s.numel != numel) {
            return Err(bad("its storage is declared twice, differently"));
        }
        self.storages.insert(key.clone(), StorageRef { dtype, numel });
        self.tensors.push(TensorRef { name: name.to_string(), storage: key, offset, shape });
        Ok(())
    }
}

/// Whether strides are those of a contiguous row-major tensor (size-1 dimensions may have any).
fn is_row_major(shape: &[usize], strides: &[usize]) -> bool {
    if shape.len() != strides.len() {
        return false;
    }
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(strides).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}
