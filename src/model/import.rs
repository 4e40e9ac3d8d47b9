//! Importing PyTorch generator checkpoints (`.pth` zip, or a state_dict saved as
//! `.safetensors`) into our model file.
//!
//! A checkpoint may be a bare state_dict, a dict holding one (`state_dict`, `model`, …), saved
//! from `nn.DataParallel` (`module.`), or one holding both generators under two prefixes
//! (`netG_A.`/`netG_B.`, `G_AB.`/`G_BA.`, `genA2B.`/`genB2A.`). [`super::checkpoint`] reads the
//! tensors with bounded work; [`super::layout`] recognises each generator from its shapes and
//! module order and maps it onto our key names.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;

use super::checkpoint::read_tensors;
use super::config::GeneratorConfig;
use super::file::{Direction, Domains, ModelFile, ModelMetadata};
use super::layout::{find_generators, FoundGenerator};
use super::stored_weights::WeightStorage;
use super::ModelError;

/// One generator read from a checkpoint, with the architecture its tensors imply.
#[derive(Debug)]
pub struct ImportedGenerator {
    pub config: GeneratorConfig,
    pub weights: HashMap<String, Tensor>,
    /// Where it came from and how its code laid it out, in words.
    pub layout: String,
}

/// What `cycleserve import` did.
#[derive(Debug)]
pub struct ImportReport {
    pub metadata: ModelMetadata,
    pub directions: Vec<Direction>,
    /// What was dropped or skipped on the way, one line each.
    pub notes: Vec<String>,
}

/// A checkpoint's generators with what was left out of them.
struct Found {
    generators: Vec<FoundGenerator>,
    notes: Vec<String>,
}

fn read(path: &Path) -> Result<Found, ModelError> {
    let fail = |reason: String| ModelError::Import { path: path.to_path_buf(), reason };
    let tensors = read_tensors(path).map_err(fail)?;
    let (generators, mut notes) = find_generators(tensors).map_err(fail)?;
    let file = file_name(path);
    for g in &generators {
        if g.dropped > 0 {
            notes.push(format!(
                "{file}: dropped {} running-statistics buffers of {} (old PyTorch versions saved them; instance norm never uses them)",
                g.dropped,
                prefix_name(&g.prefix)
            ));
        }
    }
    notes.iter_mut().filter(|n| !n.starts_with(&file)).for_each(|n| *n = format!("{file}: {n}"));
    Ok(Found { generators, notes })
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn prefix_name(prefix: &str) -> String {
    match prefix {
        "" => "the state_dict".into(),
        p => format!("`{}`", p.trim_end_matches('.')),
    }
}

fn imported(found: FoundGenerator, path: &Path) -> ImportedGenerator {
    let at = match found.prefix.as_str() {
        "" => String::new(),
        p => format!(" under {p}"),
    };
    ImportedGenerator {
        config: found.config,
        weights: found.weights.into_iter().collect(),
        layout: format!("{}{at}: {}", file_name(path), found.layout),
    }
}

/// Reads a checkpoint that holds one generator and maps it onto our architecture.
pub fn read_checkpoint(path: &Path) -> Result<ImportedGenerator, ModelError> {
    Ok(read_single(path)?.0)
}

fn read_single(path: &Path) -> Result<(ImportedGenerator, Vec<String>), ModelError> {
    let Found { mut generators, notes } = read(path)?;
    if generators.len() > 1 {
        let prefixes: Vec<String> = generators.iter().map(|g| prefix_name(&g.prefix)).collect();
        return Err(ModelError::Import {
            path: path.to_path_buf(),
            reason: format!(
                "it holds {} generators ({}): import it with --checkpoint, which takes both",
                generators.len(),
                prefixes.join(", ")
            ),
        });
    }
    Ok((imported(generators.remove(0), path), notes))
}

/// Imports one or two single-generator checkpoints into a model file at `out`.
pub fn import(
    x2y: &Path,
    y2x: Option<&Path>,
    domains: Domains,
    out: &Path,
    storage: WeightStorage,
) -> Result<ImportReport, ModelError> {
    let mut sources = vec![(Direction::XtoY, x2y)];
    sources.extend(y2x.map(|p| (Direction::YtoX, p)));
    let mut generators = Vec::new();
    let mut notes = Vec::new();
    for (direction, path) in sources {
        let (generator, more) = read_single(path)?;
        generators.push((direction, path, generator));
        notes.extend(more);
    }
    write(generators, domains, out, storage, notes)
}

/// Imports a checkpoint that holds both generators (or one) into a model file at `out`.
///
/// Which one maps X→Y is read from their prefixes (`A`→`B` before `B`→`A`, `G` before `F`);
/// `swap` flips it.
pub fn import_combined(
    checkpoint: &Path,
    swap: bool,
    domains: Domains,
    out: &Path,
    storage: WeightStorage,
) -> Result<ImportReport, ModelError> {
    let fail = |reason: String| ModelError::Import { path: checkpoint.to_path_buf(), reason };
    let Found { mut generators, mut notes } = read(checkpoint)?;
    if generators.len() > 2 {
        let prefixes: Vec<String> = generators.iter().map(|g| prefix_name(&g.prefix)).collect();
        return Err(fail(format!(
            "it holds {} generators ({}); expected one or two",
            generators.len(),
            prefixes.join(", ")
        )));
    }
    if generators.len() == 2 && x2y_comes_second(&generators[0].prefix, &generators[1].prefix) {
        generators.swap(0, 1);
    }
    if swap {
        generators.reverse();
    }
    let named: Vec<String> = generators.iter().map(|g| prefix_name(&g.prefix)).collect();
    match named.as_slice() {
        [x2y, y2x] => notes.push(format!("{x2y} is x2y, {y2x} is y2x (--swap flips them)")),
        [x2y] => notes.push(format!("{x2y} is x2y; the checkpoint has no second generator")),
        _ => {}
    }
    let generators = Direction::BOTH
        .into_iter()
        .zip(generators)
        .map(|(d, g)| (d, checkpoint, imported(g, checkpoint)))
        .collect();
    write(generators, domains, out, storage, notes)
}

/// Whether the second of two generator prefixes is the X→Y one: `G` (ours) before `F`, and
/// otherwise the one whose distinguishing part sorts first (`A` < `B`, `AB` < `BA`, `A2B` < `B2A`).
fn x2y_comes_second(a: &str, b: &str) -> bool {
    let bare =
        |p: &str| p.split('.').filter(|s| !s.is_empty() && *s != "module").collect::<Vec<_>>().join(".");
    let (a, b) = (bare(a), bare(b));
    if (a.as_str(), b.as_str()) == ("F", "G") {
        return true;
    }
    if (a.as_str(), b.as_str()) == ("G", "F") {
        return false;
    }
    let common = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    a.as_bytes()[common..] > b.as_bytes()[common..]
}

fn write(
    generators: Vec<(Direction, &Path, ImportedGenerator)>,
    domains: Domains,
    out: &Path,
    storage: WeightStorage,
    notes: Vec<String>,
) -> Result<ImportReport, ModelError> {
    let first = generators[0].2.config;
    for (_, path, g) in &generators {
        if g.config != first {
            return Err(ModelError::Import {
                path: path.to_path_buf(),
                reason: format!(
                    "its architecture ({}) differs from the x2y generator's ({}); one model file holds one architecture",
                    g.config,
                    first
                ),
            });
        }
    }
    let joined = |part: &dyn Fn(&Path, &ImportedGenerator) -> String| {
        generators.iter().map(|(d, p, g)| format!("{d}: {}", part(p, g))).collect::<Vec<_>>().join("; ")
    };
    let source = joined(&|p, _| file_name(p));
    let layout = joined(&|_, g| g.layout.clone());
    let metadata = ModelMetadata {
        architecture: first,
        domains,
        provenance: BTreeMap::from([
            ("producer".to_string(), format!("cycleserve import {}", env!("CARGO_PKG_VERSION"))),
            ("source".to_string(), source),
            ("source_layout".to_string(), layout),
            (
                "created".to_string(),
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            ),
        ]),
    };
    let weights: BTreeMap<Direction, HashMap<String, Tensor>> =
        generators.into_iter().map(|(d, _, g)| (d, g.weights)).collect();
    ModelFile::save(out, &metadata, &weights, storage)?;
    Ok(ImportReport { metadata, directions: weights.keys().copied().collect(), notes })
}

#[cfg(test)]
mod tests {
    use super::x2y_comes_second;

    #[test]
    fn the_a_to_b_generator_is_x2y_whatever_the_naming() {
        for (x2y, y2x) in [
            ("netG_A.", "netG_B."),
            ("G_AB.", "G_BA."),
            ("genA2B.module.", "genB2A.module."),
            ("netG_A2B.", "netG_B2A."),
            ("G.", "F."),
        ] {
            assert!(!x2y_comes_second(x2y, y2x), "{x2y} {y2x}");
            assert!(x2y_comes_second(y2x, x2y), "{y2x} {x2y}");
        }
    }
}
