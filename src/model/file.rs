//! The model file: one safetensors file holding `G.` (X→Y) and/or `F.` (Y→X) generator weights
//! under PyTorch key names, with the architecture, domain names and provenance in its header.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde::Serialize;

use super::config::{Family, GeneratorConfig, ParamSpec};
use super::stored_weights::{Int8Kernel, WeightStorage, SCALE_SUFFIX};
use super::ModelError;

/// Value of the `format` metadata key of every file this crate writes.
pub const FORMAT: &str = "cycleserve/1";

/// Which generator: G maps domain X to Y, F maps Y back to X.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Direction {
    #[serde(rename = "x2y")]
    XtoY,
    #[serde(rename = "y2x")]
    YtoX,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::XtoY, Direction::YtoX];

    /// The tensor-name prefix of this direction's generator in a model file.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::XtoY => "G",
            Self::YtoX => "F",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::XtoY => "x2y",
            Self::YtoX => "y2x",
        }
    }

    pub fn reverse(self) -> Self {
        match self {
            Self::XtoY => Self::YtoX,
            Self::YtoX => Self::XtoY,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Direction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x2y" => Ok(Self::XtoY),
            "y2x" => Ok(Self::YtoX),
            _ => Err(format!("unknown direction `{s}`: expected x2y or y2x")),
        }
    }
}

/// The names of the two image domains, e.g. `photo` and `painting`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Domains {
    pub x: String,
    pub y: String,
}

impl Domains {
    /// Parses `X_NAME,Y_NAME`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split(',').map(str::trim).collect::<Vec<_>>().as_slice() {
            [x, y] if valid_domain(x) && valid_domain(y) && x != y => {
                Ok(Self { x: x.to_string(), y: y.to_string() })
            }
            _ => Err(format!(
                "domains `{s}` must be two different names joined by a comma, e.g. photo,painting \
                 (letters, digits, `-` and `_`)"
            )),
        }
    }

    /// Reads a direction given as `x2y`/`y2x` or in its domain-named form (`photo2painting`).
    pub fn parse_direction(&self, s: &str) -> Result<Direction, String> {
        s.parse().or_else(|_| {
            Direction::BOTH.into_iter().find(|d| self.direction_name(*d) == s).ok_or_else(|| {
                format!(
                    "unknown direction `{s}`: expected x2y, y2x, {} or {}",
                    self.direction_name(Direction::XtoY),
                    self.direction_name(Direction::YtoX)
                )
            })
        })
    }

    /// The domain-named spelling of a direction, e.g. `photo2painting`.
    pub fn direction_name(&self, direction: Direction) -> String {
        match direction {
            Direction::XtoY => format!("{}2{}", self.x, self.y),
            Direction::YtoX => format!("{}2{}", self.y, self.x),
        }
    }
}

fn valid_domain(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Everything a model file's header says about it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelMetadata {
    pub architecture: GeneratorConfig,
    pub domains: Domains,
    /// Free-form facts on where the weights came from (producer, source, dataset, steps, date…).
    pub provenance: BTreeMap<String, String>,
}

const ARCHITECTURE_KEYS: [&str; 4] = ["family", "ngf", "n_blocks", "norm_affine"];
const DOMAIN_KEYS: [&str; 2] = ["domain_x", "domain_y"];

impl ModelMetadata {
    /// The training steps the provenance records (`cycletrain export` writes them), if any.
    pub fn steps(&self) -> Option<u64> {
        self.provenance.get("steps").and_then(|s| s.parse().ok())
    }

    fn to_header(&self) -> HashMap<String, String> {
        let arch = &self.architecture;
        let mut header: HashMap<String, String> = self.provenance.clone().into_iter().collect();
        for (key, value) in [
            ("format", FORMAT.to_string()),
            ("family", arch.family.to_string()),
            ("ngf", arch.ngf.to_string()),
            ("n_blocks", arch.n_blocks.to_string()),
            ("norm_affine", arch.norm_affine.to_string()),
            ("domain_x", self.domains.x.clone()),
            ("domain_y", self.domains.y.clone()),
        ] {
            header.insert(key.to_string(), value);
        }
        header
    }

    fn from_header(header: Option<&HashMap<String, String>>) -> Result<Self, ModelError> {
        let required: Vec<&str> = ARCHITECTURE_KEYS.iter().chain(&DOMAIN_KEYS).copied().collect();
        let Some(header) = header else {
            return Err(ModelError::MissingMetadata { keys: required.join(", ") });
        };
        let missing: Vec<&str> = required.iter().copied().filter(|k| !header.contains_key(*k)).collect();
        if !missing.is_empty() {
            return Err(ModelError::MissingMetadata { keys: missing.join(", ") });
        }
        let get = |key: &str| header[key].as_str();
        let bad = |key: &str, expected: &str| ModelError::BadMetadata {
            key: key.to_string(),
            value: header[key].clone(),
            expected: expected.to_string(),
        };
        let family =
            Family::from_str(get("family")).map_err(|_| ModelError::UnknownFamily(get("family").into()))?;
        let positive = |key: &str| match get(key).parse::<usize>() {
            Ok(n) if n > 0 && n <= 4096 => Ok(n),
            _ => Err(bad(key, "a positive integer")),
        };
        let architecture = GeneratorConfig {
            family,
            ngf: positive("ngf")?,
            n_blocks: get("n_blocks")
                .parse()
                .ok()
                .filter(|&n: &usize| n <= 1024)
                .ok_or_else(|| bad("n_blocks", "a block count"))?,
            norm_affine: get("norm_affine").parse().map_err(|_| bad("norm_affine", "true or false"))?,
        };
        let domains = Domains::parse(&format!("{},{}", get("domain_x"), get("domain_y")))
            .map_err(|_| bad("domain_x", "two different domain names (letters, digits, `-`, `_`)"))?;
        let provenance = header
            .iter()
            .filter(|(k, _)| !required.contains(&k.as_str()) && k.as_str() != "format")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Self { architecture, domains, provenance })
    }
}

/// A checked model file: its metadata and the f32 weights of each generator it holds.
#[derive(Clone, Debug)]
pub struct ModelFile {
    pub metadata: ModelMetadata,
    /// Weights per direction, keyed by PyTorch name without the `G.`/`F.` prefix.
    pub generators: BTreeMap<Direction, HashMap<String, Tensor>>,
}

impl ModelFile {
    /// Reads and checks a model file: header, metadata, and every tensor's name and shape.
    pub fn load(path: &Path, device: &Device) -> Result<Self, ModelError> {
        let bytes =
            std::fs::read(path).map_err(|error| ModelError::Io { path: path.to_path_buf(), error })?;
        Self::from_bytes(&bytes, device).map_err(|e| e.in_file(path))
    }

    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self, ModelError> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| classify_safetensors_error(bytes, e))?;
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| classify_safetensors_error(bytes, e))?;
        let metadata = ModelMetadata::from_header(header.metadata().as_ref())?;

        // An int8 kernel's scales are read with the kernel, not as a parameter of their own.
        let int8: HashSet<String> = st
            .tensors()
            .into_iter()
            .filter(|(n, v)| v.dtype() == Dtype::I8 && !n.ends_with(SCALE_SUFFIX))
            .map(|(n, _)| n)
            .collect();
        let is_scale =
            |name: &str| name.strip_suffix(SCALE_SUFFIX).is_some_and(|kernel| int8.contains(kernel));
        let mut found: BTreeMap<Direction, Vec<ParamSpec>> = BTreeMap::new();
        let mut stray = Vec::new();
        for (name, view) in st.tensors() {
            let direction =
                Direction::BOTH.into_iter().find(|d| name.starts_with(&format!("{}.", d.prefix())));
            match direction {
                _ if is_scale(&name) => {}
                Some(d) => found.entry(d).or_default().push(ParamSpec::new(&name[2..], view.shape())),
                None => stray.push(name),
            }
        }
        if found.is_empty() {
            return Err(ModelError::NoGenerators);
        }
        let mut problems: Vec<String> = stray.iter().map(|n| format!("unexpected tensor {n}")).collect();
        problems.extend(int8.iter().filter_map(|kernel| scale_problem(&st, kernel)));
        for (direction, tensors) in &found {
            problems.extend(check_parameters(
                &metadata.architecture,
                tensors,
                &format!("{}.", direction.prefix()),
            ));
        }
        if !problems.is_empty() {
            return Err(ModelError::TensorMismatch {
                architecture: metadata.architecture.to_string(),
                problems,
            });
        }

        let mut generators = BTreeMap::new();
        for direction in found.keys() {
            let mut weights = HashMap::new();
            for ParamSpec { name, .. } in metadata.architecture.parameters() {
                let full = format!("{}.{name}", direction.prefix());
                weights.insert(name, read_weight(&st, bytes, &full, device)?);
            }
            generators.insert(*direction, weights);
        }
        Ok(Self { metadata, generators })
    }

    /// Writes a model file atomically (temporary file + rename), so a reader never sees half.
    ///
    /// `generators` holds PyTorch-named f32 tensors per direction, written in `storage`.
    pub fn save(
        path: &Path,
        metadata: &ModelMetadata,
        generators: &BTreeMap<Direction, HashMap<String, Tensor>>,
        storage: WeightStorage,
    ) -> Result<(), ModelError> {
        if generators.is_empty() {
            return Err(ModelError::NoGenerators);
        }
        let mut tensors = Vec::new();
        for (direction, weights) in generators {
            let specs: Vec<ParamSpec> = weights.iter().map(|(n, t)| ParamSpec::new(n, t.dims())).collect();
            let problems =
                check_parameters(&metadata.architecture, &specs, &format!("{}.", direction.prefix()));
            if !problems.is_empty() {
                return Err(ModelError::TensorMismatch {
                    architecture: metadata.architecture.to_string(),
                    problems,
                });
            }
            for (name, tensor) in weights {
                tensors.extend(storage.encode(&format!("{}.{name}", direction.prefix()), tensor)?);
            }
        }
        let mut header = metadata.to_header();
        header.insert("storage".to_string(), storage.to_string());
        let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(header))
            .map_err(|e| ModelError::Write { path: path.to_path_buf(), reason: e.to_string() })?;
        write_atomically(path, &bytes).map_err(|error| ModelError::Io { path: path.to_path_buf(), error })
    }
}

/// Reads one weight as f32: float tensors are widened, int8 kernels multiplied by their scales.
fn read_weight(st: &SafeTensors, bytes: &[u8], name: &str, device: &Device) -> Result<Tensor, ModelError> {
    let view = |name: &str| st.tensor(name).map_err(|e| classify_safetensors_error(bytes, e));
    let float = |name: &str| -> Result<Tensor, ModelError> {
        let view = view(name)?;
        match view.dtype() {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => Ok(view.load(device)?.to_dtype(DType::F32)?),
            other => {
                Err(ModelError::UnsupportedDtype { tensor: name.to_string(), dtype: format!("{other:?}") })
            }
        }
    };
    let kernel = view(name)?;
    if kernel.dtype() != Dtype::I8 {
        return float(name);
    }
    let scale_name = format!("{name}{SCALE_SUFFIX}");
    let scales = float(&scale_name)?.flatten_all()?.to_vec1::<f32>()?;
    if scales.iter().any(|s| !s.is_finite()) {
        return Err(ModelError::NonFiniteScale { tensor: scale_name });
    }
    let values = kernel.data().iter().map(|&b| b as i8).collect();
    let weights = Int8Kernel { values, scales }.dequantize();
    Ok(Tensor::from_vec(weights, kernel.shape(), device)?)
}

/// What is wrong with the scales of the int8 tensor `kernel`, if anything: they must exist and
/// hold one value per slice along the kernel's first axis, shaped `[slices, 1, …]`.
fn scale_problem(st: &SafeTensors, kernel: &str) -> Option<String> {
    let scale_name = format!("{kernel}{SCALE_SUFFIX}");
    let shape = st.tensor(kernel).ok()?.shape().to_vec();
    let expected: Vec<usize> =
        shape.iter().enumerate().map(|(axis, &d)| if axis == 0 { d } else { 1 }).collect();
    match st.tensor(&scale_name) {
        Err(_) => Some(format!("int8 tensor {kernel} has no scale tensor {scale_name} {expected:?}")),
        Ok(scale) if scale.shape() != expected || shape.is_empty() => Some(format!(
            "wrong shape for {scale_name}: expected {expected:?} (one scale per slice of {kernel} {shape:?}), found {:?}",
            scale.shape()
        )),
        Ok(_) => None,
    }
}

/// Writes `bytes` to a sibling temporary file, syncs it, then renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let file_name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp: PathBuf = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Compares tensors found against those the architecture needs; one line per problem, each
/// naming the tensor (with `prefix` in front, e.g. `G.`).
pub(crate) fn check_parameters(cfg: &GeneratorConfig, found: &[ParamSpec], prefix: &str) -> Vec<String> {
    let found: HashMap<&str, &Vec<usize>> = found.iter().map(|p| (p.name.as_str(), &p.shape)).collect();
    let expected = cfg.parameters();
    let mut problems = Vec::new();
    for ParamSpec { name, shape } in &expected {
        match found.get(name.as_str()) {
            None => problems.push(format!("missing tensor {prefix}{name} {shape:?}")),
            Some(actual) if *actual != shape => {
                problems.push(format!("wrong shape for {prefix}{name}: expected {shape:?}, found {actual:?}"))
            }
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<&str> =
        found.keys().copied().filter(|n| !expected.iter().any(|e| e.name == *n)).collect();
    unexpected.sort_unstable();
    problems.extend(unexpected.into_iter().map(|n| format!("unexpected tensor {prefix}{n}")));
    problems
}

/// Turns the safetensors crate's error into one that says what is wrong with the file.
fn classify_safetensors_error(bytes: &[u8], err: SafeTensorError) -> ModelError {
    let header_len = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    let looks_like_header =
        matches!(header_len, Some(n) if n > 1 && n < 100_000_000) && bytes.get(8) == Some(&b'{');
    match err {
        SafeTensorError::MetadataIncompleteBuffer | SafeTensorError::InvalidOffset(_) => {
            ModelError::Truncated {
                reason: "its header describes more (or fewer) tensor bytes than the file holds".into(),
            }
        }
        SafeTensorError::InvalidHeaderLength if looks_like_header => ModelError::Truncated {
            reason: format!("the file ends inside its {}-byte header", header_len.unwrap_or(0)),
        },
        other => ModelError::NotSafetensors { reason: other.to_string() },
    }
}
