//! Recognising a CycleGAN ResNet generator from its tensors alone, whatever its code named things.
//!
//! Every published generator keeps its layers in one `nn.Sequential` called `model`, so its keys
//! are `{prefix}model.{N}.…`; the prefix (`module.`, `netG_A.`, `G_AB.`, …) tells generators of
//! one checkpoint apart. The architecture is read from the module order and the shapes:
//! a 7×7 conv from RGB, two stride-2 convs, residual blocks (any submodule — `block`,
//! `conv_block`, `res`… — holding two 3×3 convs of equal width), two upsampling stages and a 7×7
//! conv to RGB. An upsampling weight `[in, out, 3, 3]` with in = 2·out is a `ConvTranspose2d`;
//! `[out, in, 3, 3]` is a plain conv, which must sit one index later than a transposed one
//! would (the parameterless `nn.Upsample` before it). Affine norms are the 1-D weight/bias pairs
//! at the index after their conv. Dropout (the original code's `use_dropout`) is an extra index
//! inside each block and the identity at inference. Running statistics that old PyTorch versions
//! saved for instance norm are never used, and are dropped.

use std::collections::BTreeMap;

use candle_core::Tensor;

use super::config::{Family, GeneratorConfig, GeneratorLayer, ParamSpec};
use super::file::check_parameters;

const RUNNING_STATS: [&str; 3] = ["running_mean", "running_var", "num_batches_tracked"];

/// How many unplaced keys an error lists.
const KEYS_SHOWN: usize = 8;

/// A generator found in a checkpoint, mapped onto the model file's key names.
#[derive(Debug)]
pub struct FoundGenerator {
    /// What came before `model.` in its keys (`""`, `module.`, `netG_A.`, …).
    pub prefix: String,
    pub config: GeneratorConfig,
    /// Tensors under the names [`GeneratorConfig::parameters`] gives.
    pub weights: BTreeMap<String, Tensor>,
    /// How its source code laid it out, in words (for provenance).
    pub layout: String,
    /// Running-statistics buffers that were dropped.
    pub dropped: usize,
}

/// The keys of one `{prefix}model.` group: top-level index → what hangs below it.
#[derive(Default)]
struct Group {
    modules: BTreeMap<usize, Module>,
    unplaced: Vec<String>,
    dropped: usize,
}

#[derive(Default)]
struct Module {
    /// `model.N.weight` / `model.N.bias`.
    params: BTreeMap<String, (String, Tensor)>,
    /// `model.N.{attr}.{j}.{param}`: (attribute, sub-index) → param → (source key, tensor).
    children: BTreeMap<(String, usize), BTreeMap<String, (String, Tensor)>>,
}

impl Module {
    fn weight_dims(&self) -> Option<&[usize]> {
        self.params.get("weight").map(|(_, t)| t.dims())
    }

    fn is_norm(&self) -> bool {
        self.children.is_empty() && self.params.values().all(|(_, t)| t.rank() == 1)
    }
}

/// Finds every generator among a checkpoint's tensors.
///
/// Returns the generators, and notes on what else was there (other networks, stray tensors).
pub fn find_generators(tensors: Vec<(String, Tensor)>) -> Result<(Vec<FoundGenerator>, Vec<String>), String> {
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let mut outside = Vec::new();
    for (name, tensor) in tensors {
        let segments: Vec<&str> = name.split('.').collect();
        let at = (0..segments.len().saturating_sub(1))
            .find(|&i| segments[i] == "model" && segments[i + 1].parse::<usize>().is_ok());
        let Some(at) = at else {
            outside.push(name);
            continue;
        };
        let prefix: String = segments[..at].iter().map(|s| format!("{s}.")).collect();
        let group = groups.entry(prefix).or_default();
        let index: usize = segments[at + 1].parse().expect("checked above");
        let rest = &segments[at + 2..];
        if rest.last().is_some_and(|p| RUNNING_STATS.contains(p)) {
            group.dropped += 1;
            continue;
        }
        let module = group.modules.entry(index).or_default();
        match rest {
            [param] => {
                module.params.insert(param.to_string(), (name, tensor));
            }
            [attr, j, param] if j.parse::<usize>().is_ok() => {
                let key = (attr.to_string(), j.parse().expect("checked"));
                module.children.entry(key).or_default().insert(param.to_string(), (name, tensor));
            }
            _ => group.unplaced.push(name),
        }
    }

    let mut found = Vec::new();
    let mut notes = Vec::new();
    let mut refusals = Vec::new();
    for (prefix, group) in groups {
        let stem_is_rgb =
            matches!(group.modules.values().next().and_then(Module::weight_dims), Some([_, 3, 7, 7]));
        if !stem_is_rgb {
            let first = group.modules.iter().next().map(|(i, m)| match m.weight_dims() {
                Some(dims) => format!("{prefix}model.{i}.weight is {dims:?}"),
                None => format!("{prefix}model.{i} has no weight"),
            });
            refusals.push(format!(
                "{} is not a CycleGAN ResNet generator: {}, where the generator starts with a 7×7 conv from RGB [ngf, 3, 7, 7]",
                shown(&prefix),
                first.unwrap_or_default()
            ));
            continue;
        }
        found.push(map_generator(&prefix, group)?);
    }
    if found.is_empty() {
        return Err(match refusals.is_empty() {
            false => refusals.join("; "),
            true => {
                format!("no `model.N` keys of a CycleGAN generator; first keys: {}", first_keys(&outside))
            }
        });
    }
    notes.extend(refusals.into_iter().map(|r| format!("skipped: {r}")));
    if !outside.is_empty() {
        notes.push(format!(
            "skipped {} tensors outside any generator ({})",
            outside.len(),
            first_keys(&outside)
        ));
    }
    Ok((found, notes))
}

fn shown(prefix: &str) -> String {
    match prefix {
        "" => "the state_dict".to_string(),
        p => format!("`{}`", p.trim_end_matches('.')),
    }
}

fn first_keys(keys: &[String]) -> String {
    let mut listed: Vec<&str> = keys.iter().take(KEYS_SHOWN).map(String::as_str).collect();
    if keys.len() > KEYS_SHOWN {
        listed.push("…");
    }
    listed.join(", ")
}

/// A conv layer found at a top-level index, with its norm's module if affine.
struct PlacedConv<'a> {
    layer: GeneratorLayer,
    index: usize,
    module: &'a Module,
    norm: Option<&'a Module>,
}

/// The role each top-level module plays, read in order.
struct Parsed<'a> {
    convs: Vec<PlacedConv<'a>>,
    /// Index and module of each residual block.
    blocks: Vec<(usize, &'a Module)>,
    rest: Vec<usize>,
}

fn parse(group: &Group) -> Parsed<'_> {
    let modules: Vec<(usize, &Module)> = group.modules.iter().map(|(i, m)| (*i, m)).collect();
    let mut at = 0;
    let mut convs = Vec::new();
    let mut blocks = Vec::new();
    let mut conv = |layer: GeneratorLayer, at: &mut usize| {
        let Some(&(index, module)) = modules.get(*at).filter(|(_, m)| m.children.is_empty()) else { return };
        *at += 1;
        let norm =
            modules.get(*at).filter(|(i, m)| *i == index + 1 && m.is_norm() && layer != GeneratorLayer::Head);
        if norm.is_some() {
            *at += 1;
        }
        convs.push(PlacedConv { layer, index, module, norm: norm.map(|(_, m)| *m) });
    };
    for layer in [GeneratorLayer::Stem, GeneratorLayer::Down(0), GeneratorLayer::Down(1)] {
        conv(layer, &mut at);
    }
    while let Some(&(index, module)) = modules.get(at).filter(|(_, m)| !m.children.is_empty()) {
        blocks.push((index, module));
        at += 1;
    }
    for layer in [GeneratorLayer::Up(0), GeneratorLayer::Up(1), GeneratorLayer::Head] {
        conv(layer, &mut at);
    }
    Parsed { convs, blocks, rest: modules[at..].iter().map(|(i, _)| *i).collect() }
}

fn map_generator(prefix: &str, group: Group) -> Result<FoundGenerator, String> {
    let who = shown(prefix);
    let parsed = parse(&group);
    let mut unplaced = group.unplaced.clone();
    for index in &parsed.rest {
        let module = &group.modules[index];
        unplaced.extend(module.params.values().map(|(k, _)| k.clone()));
        unplaced.extend(module.children.values().flat_map(|c| c.values().map(|(k, _)| k.clone())));
    }
    let dims = |layer: GeneratorLayer| {
        parsed
            .convs
            .iter()
            .find(|c| c.layer == layer)
            .and_then(|c| c.module.weight_dims())
            .map(<[usize]>::to_vec)
    };
    let ngf = dims(GeneratorLayer::Stem).map(|d| d[0]).ok_or(format!("{who}: no stem conv"))?;
    let family = match dims(GeneratorLayer::Up(0)).as_deref() {
        Some(&[a, b, 3, 3]) if a == 2 * b => Family::Transpose,
        Some(&[a, b, 3, 3]) if b == 2 * a => Family::Upsample,
        Some(other) => {
            return Err(format!(
                "{who}: the first layer after the residual blocks has weight {other:?}, neither a \
                 ConvTranspose2d [2c, c, 3, 3] nor a 3×3 conv [c, 2c, 3, 3] halving the channels"
            ))
        }
        None => return Err(format!("{who}: no upsampling layer after the residual blocks")),
    };
    let norm_affine = parsed.convs.first().is_some_and(|c| c.norm.is_some());
    let config = GeneratorConfig { family, ngf, n_blocks: parsed.blocks.len(), norm_affine };

    let mut weights = BTreeMap::new();
    let mut put =
        |canonical: String, params: &BTreeMap<String, (String, Tensor)>, unplaced: &mut Vec<String>| {
            for (param, (source, tensor)) in params {
                match param.as_str() {
                    "weight" | "bias" => {
                        weights.insert(format!("{canonical}.{param}"), tensor.clone());
                    }
                    _ => unplaced.push(source.clone()),
                }
            }
        };
    for PlacedConv { layer, index, module, norm } in &parsed.convs {
        let canonical = config.conv_key(*layer);
        if canonical != format!("model.{index}") {
            return Err(format!(
                "{who}: {prefix}model.{index} holds the {} where the {} family has it at {canonical}: \
                 a layer without parameters is missing or extra (an upsample-family conv follows an nn.Upsample)",
                layer_name(*layer),
                family
            ));
        }
        put(canonical, &module.params, &mut unplaced);
        if let (Some(norm), Some(key)) = (norm, config.norm_key(*layer)) {
            put(key, &norm.params, &mut unplaced);
        }
    }
    let mut block_layouts = Vec::new();
    for (block, (index, module)) in parsed.blocks.iter().enumerate() {
        let layout = map_block(&config, block, module, &mut put, &mut unplaced)
            .map_err(|e| format!("{who}: residual block {prefix}model.{index}: {e}"))?;
        block_layouts.push(layout);
    }
    if !unplaced.is_empty() {
        return Err(format!("{who}: keys it could not place: {}", first_keys(&unplaced)));
    }
    let specs: Vec<ParamSpec> = weights.iter().map(|(n, t)| ParamSpec::new(n, t.dims())).collect();
    let problems = check_parameters(&config, &specs, "");
    if !problems.is_empty() {
        return Err(format!(
            "{who}: its tensors do not fit the generator they suggest ({}): {}",
            config,
            problems.join("; ")
        ));
    }
    block_layouts.dedup();
    let blocks = match block_layouts.as_slice() {
        [] => "no residual blocks".to_string(),
        [one] => one.clone(),
        _ => return Err(format!("{who}: its residual blocks are laid out differently from one another")),
    };
    let upsampling = match family {
        Family::Upsample => "nearest upsample + conv",
        Family::Transpose => "ConvTranspose2d",
    };
    let affine = if norm_affine { "affine" } else { "non-affine" };
    let layout = format!("{upsampling}, {blocks}, {affine} instance norm");
    Ok(FoundGenerator { prefix: prefix.to_string(), config, weights, layout, dropped: group.dropped })
}

fn layer_name(layer: GeneratorLayer) -> String {
    match layer {
        GeneratorLayer::Stem => "7×7 input conv".into(),
        GeneratorLayer::Down(i) => format!("downsampling conv {}", i + 1),
        GeneratorLayer::Block { block, conv } => format!("conv {} of residual block {}", conv + 1, block + 1),
        GeneratorLayer::Up(i) => format!("upsampling conv {}", i + 1),
        GeneratorLayer::Head => "7×7 output conv".into(),
    }
}

/// Maps one residual block's `[RPad, Conv, (IN), ReLU, (Dropout), RPad, Conv, (IN)]` children;
/// returns its layout in words.
fn map_block(
    config: &GeneratorConfig,
    block: usize,
    module: &Module,
    put: &mut impl FnMut(String, &BTreeMap<String, (String, Tensor)>, &mut Vec<String>),
    unplaced: &mut Vec<String>,
) -> Result<String, String> {
    let attrs: Vec<&str> = {
        let mut a: Vec<&str> = module.children.keys().map(|(a, _)| a.as_str()).collect();
        a.dedup();
        a
    };
    let [attr] = attrs.as_slice() else {
        return Err(format!("its layers sit under several attributes ({})", attrs.join(", ")));
    };
    unplaced.extend(module.params.values().map(|(k, _)| k.clone()));
    let is_conv = |params: &BTreeMap<String, (String, Tensor)>| {
        params.get("weight").is_some_and(|(_, t)| t.rank() == 4)
    };
    let convs: Vec<usize> =
        module.children.iter().filter(|(_, p)| is_conv(p)).map(|((_, j), _)| *j).collect();
    let [first, second] = convs.as_slice() else {
        return Err(format!("expected two 3×3 convs, found {}", convs.len()));
    };
    if *first == 0 {
        return Err("its first conv has no padding layer before it: zero-padded blocks \
                    (padding_type='zero') are not supported, only reflection padding"
            .into());
    }
    let dropout = match second - first {
        4 => false,
        5 => true,
        gap => return Err(format!("its two convs are {gap} layers apart, expected 4 (or 5 with dropout)")),
    };
    for ((_, j), params) in &module.children {
        let (conv, is_norm) = match *j {
            j if j == *first => (0, false),
            j if j == *second => (1, false),
            j if j == first + 1 => (0, true),
            j if j == second + 1 => (1, true),
            _ => {
                unplaced.extend(params.values().map(|(k, _)| k.clone()));
                continue;
            }
        };
        let layer = GeneratorLayer::Block { block, conv };
        let key = if is_norm { config.norm_key(layer) } else { Some(config.conv_key(layer)) };
        put(key.expect("block convs have norms"), params, unplaced);
    }
    Ok(format!("residual blocks `{attr}`{}", if dropout { " with dropout" } else { "" }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Zero tensors for every parameter of `config`, with names passed through `rename`.
    fn tensors(config: &GeneratorConfig, rename: impl Fn(&str) -> String) -> Vec<(String, Tensor)> {
        config
            .parameters()
            .into_iter()
            .map(|p| (rename(&p.name), Tensor::zeros(p.shape.as_slice(), DType::F32, &Device::Cpu).unwrap()))
            .collect()
    }

    fn config(family: Family, norm_affine: bool, n_blocks: usize) -> GeneratorConfig {
        GeneratorConfig { family, ngf: 4, n_blocks, norm_affine }
    }

    #[test]
    fn canonical_names_map_onto_themselves_for_every_architecture() {
        for family in [Family::Upsample, Family::Transpose] {
            for (affine, n_blocks) in [(false, 0), (false, 2), (true, 1), (true, 3)] {
                let cfg = config(family, affine, n_blocks);
                let (found, notes) = find_generators(tensors(&cfg, str::to_string)).unwrap();
                assert_eq!(found.len(), 1);
                assert!(notes.is_empty(), "{notes:?}");
                assert_eq!(found[0].config, cfg);
                let names: Vec<&String> = found[0].weights.keys().collect();
                let mut expected: Vec<String> = cfg.parameters().into_iter().map(|p| p.name).collect();
                expected.sort();
                assert_eq!(names, expected.iter().collect::<Vec<_>>(), "{cfg:?}");
            }
        }
    }

    #[test]
    fn any_block_attribute_name_and_a_dropout_gap_are_mapped() {
        let cfg = config(Family::Transpose, true, 2);
        // `conv_block.5/6` → `layers.6/7`: a dropout before the second conv.
        let renamed = tensors(&cfg, |n| {
            n.replace("conv_block.5.", "layers.6.")
                .replace("conv_block.6.", "layers.7.")
                .replace("conv_block", "layers")
        });
        let (found, _) = find_generators(renamed).unwrap();
        assert_eq!(found[0].config, cfg);
        assert!(found[0].layout.contains("residual blocks `layers` with dropout"), "{}", found[0].layout);
    }

    #[test]
    fn module_order_that_contradicts_the_shapes_is_refused() {
        // A plain 3×3 conv right after the blocks, with no nn.Upsample before it.
        let cfg = config(Family::Upsample, false, 1);
        let shifted = tensors(&cfg, |n| match n.strip_prefix("model.12.") {
            Some(rest) => format!("model.11.{rest}"),
            None => n.to_string(),
        });
        let err = find_generators(shifted).unwrap_err();
        assert!(
            err.contains("model.11 holds the upsampling conv 1 where the upsample family has it at model.12"),
            "{err}"
        );
    }

    #[test]
    fn zero_padded_blocks_and_stray_keys_are_refused_by_name() {
        let cfg = config(Family::Transpose, false, 1);
        let zero_padded = tensors(&cfg, |n| {
            n.replace("conv_block.1.", "conv_block.0.").replace("conv_block.5.", "conv_block.4.")
        });
        let err = find_generators(zero_padded).unwrap_err();
        assert!(err.contains("zero-padded blocks"), "{err}");

        let mut stray = tensors(&cfg, str::to_string);
        stray.push((
            "model.10.conv_block.3.weight".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        ));
        let err = find_generators(stray).unwrap_err();
        assert!(err.contains("keys it could not place: model.10.conv_block.3.weight"), "{err}");
    }
}
