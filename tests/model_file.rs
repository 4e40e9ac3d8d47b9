//! Model files and PyTorch imports: round trips, and a clear message for each kind of bad file.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use cycleserve::model::config::ParamSpec;
use cycleserve::model::import::{import, read_checkpoint};
use cycleserve::model::{Direction, Domains, Generator, GeneratorConfig, Model, ModelFile};

fn domains() -> Domains {
    Domains::parse("photo,painting").unwrap()
}

fn load_err(path: &Path) -> String {
    ModelFile::load(path, &Device::Cpu).unwrap_err().to_string()
}

/// The golden upsample generator imported as a one-direction model file.
fn imported_model(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("model.safetensors");
    import_golden(&out, Directions::X2yOnly);
    out
}

/// Rewrites a model file's tensors and header through `edit`.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut BTreeMap<String, Tensor>, &mut HashMap<String, String>),
) {
    let bytes = std::fs::read(src).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut metadata = header.metadata().clone().unwrap_or_default();
    let mut tensors: BTreeMap<String, Tensor> =
        candle_core::safetensors::load(src, &Device::Cpu).unwrap().into_iter().collect();
    edit(&mut tensors, &mut metadata);
    let bytes = safetensors::serialize(tensors.iter(), Some(metadata)).unwrap();
    std::fs::write(dst, bytes).unwrap();
}

#[test]
fn import_round_trips_and_computes_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let path = imported_model(dir.path());
    let model = Model::load(&path, &Device::Cpu).unwrap();
    assert_eq!(model.directions().collect::<Vec<_>>(), vec![Direction::XtoY]);
    let meta = &model.metadata;
    assert_eq!(meta.domains, domains());
    assert_eq!(meta.architecture.ngf, 8);
    assert!(meta.provenance["producer"].starts_with("cycleserve import"));
    assert!(meta.provenance["source"].contains("x2y: generator_upsample.pth"));

    let tensors = load_tensors(&golden("generator_upsample.safetensors"));
    let out = model.forward(Direction::XtoY, &tensors["input.1"]).unwrap();
    assert!(relative_l2(&out, &tensors["output.1"]) < 1e-5);
    let err = model.forward(Direction::YtoX, &tensors["input.1"]).unwrap_err().to_string();
    assert!(err.contains("no y2x (painting2photo) generator"), "{err}");
}

#[test]
fn import_of_two_directions_and_of_wrapped_or_dataparallel_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("both.safetensors");
    let report =
        import(&fixture("pth/wrapped.pth"), Some(&fixture("pth/dataparallel.pth")), domains(), &out).unwrap();
    assert_eq!(report.directions, vec![Direction::XtoY, Direction::YtoX]);
    let model = Model::load(&out, &Device::Cpu).unwrap();
    let tensors = load_tensors(&golden("generator_upsample.safetensors"));
    for direction in Direction::BOTH {
        let y = model.forward(direction, &tensors["input.0"]).unwrap();
        assert!(relative_l2(&y, &tensors["output.0"]) < 1e-5, "{direction}");
    }
}

#[test]
fn import_infers_every_golden_architecture() {
    let m = manifest();
    for name in ["generator_upsample", "generator_transpose", "generator_transpose_affine"] {
        let config = read_checkpoint(&golden(&format!("{name}.pth"))).unwrap().config;
        assert_eq!(config.family.as_str(), m[name]["upsample"].as_str().unwrap());
        assert_eq!(config.n_blocks as u64, m[name]["n_blocks"].as_u64().unwrap());
        assert_eq!(config.norm_affine, m[name]["instance_norm_affine"].as_bool().unwrap());
    }
}

#[test]
fn import_refuses_what_it_cannot_map_and_names_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let err = |path: &Path| import(path, None, domains(), &out).unwrap_err().to_string();
    let extra = err(&fixture("pth/extra_key.pth"));
    assert!(extra.contains("keys it could not place: model.99.weight"), "{extra}");
    let missing = err(&fixture("pth/missing_key.pth"));
    assert!(missing.contains("missing tensor model.13.bias [16]"), "{missing}");
    let disc = err(&fixture("pth/discriminator.pth"));
    assert!(
        disc.contains("the state_dict is not a CycleGAN ResNet generator: model.0.weight is [2, 3, 4, 4]"),
        "{disc}"
    );
    let not_pth = err(&fixture("photo_256x256.png"));
    assert!(not_pth.contains("not a zip-format PyTorch checkpoint"), "{not_pth}");
    let mixed =
        import(&golden("generator_upsample.pth"), Some(&golden("generator_transpose.pth")), domains(), &out)
            .unwrap_err()
            .to_string();
    assert!(mixed.contains("differs from the x2y generator's"), "{mixed}");
    assert!(!out.exists(), "a refused import must not write a file");
}

#[test]
fn bad_model_files_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let good = imported_model(dir.path());
    let bad = dir.path().join("bad.safetensors");

    std::fs::write(&bad, b"this is not a model").unwrap();
    assert!(load_err(&bad).contains("not a safetensors file"), "{}", load_err(&bad));

    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    assert!(load_err(&bad).contains("truncated model file"), "{}", load_err(&bad));
    std::fs::write(&bad, &bytes[..100]).unwrap();
    assert!(load_err(&bad).contains("ends inside its"), "{}", load_err(&bad));

    let raw = golden("generator_upsample.safetensors");
    let err = load_err(&raw);
    assert!(err.contains("lacks family, ngf, n_blocks, norm_affine, domain_x, domain_y"), "{err}");
    assert!(err.contains("cycleserve import"), "{err}");

    rewrite(&good, &bad, |_, meta| {
        meta.insert("family".into(), "unet".into());
    });
    assert!(load_err(&bad).contains("unknown family `unet`"), "{}", load_err(&bad));

    rewrite(&good, &bad, |_, meta| {
        meta.insert("ngf".into(), "eight".into());
    });
    assert!(load_err(&bad).contains("`ngf` is `eight`, expected a positive integer"), "{}", load_err(&bad));

    rewrite(&good, &bad, |t, _| {
        t.remove("G.model.4.bias");
        t.insert("G.model.1.weight".into(), Tensor::zeros((4, 3, 7, 7), DType::F32, &Device::Cpu).unwrap());
        t.insert("extra.weight".into(), Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap());
    });
    let err = load_err(&bad);
    assert!(err.contains("bad.safetensors"), "{err}");
    assert!(err.contains("upsample family, ngf 8, 2 blocks, non-affine instance norm"), "{err}");
    assert!(err.contains("missing tensor G.model.4.bias [16]"), "{err}");
    assert!(
        err.contains("wrong shape for G.model.1.weight: expected [8, 3, 7, 7], found [4, 3, 7, 7]"),
        "{err}"
    );
    assert!(err.contains("unexpected tensor extra.weight"), "{err}");

    rewrite(&good, &bad, |t, _| t.retain(|k, _| !k.starts_with("G.")));
    assert!(load_err(&bad).contains("no generator weights"), "{}", load_err(&bad));

    rewrite(&good, &bad, |t, _| {
        let w = t["G.model.1.bias"].to_dtype(DType::I64).unwrap();
        t.insert("G.model.1.bias".into(), w);
    });
    assert!(load_err(&bad).contains("tensor G.model.1.bias is I64"), "{}", load_err(&bad));

    let err = load_err(&dir.path().join("absent.safetensors"));
    assert!(err.starts_with("cannot read") && err.contains("absent.safetensors"), "{err}");
}

#[test]
fn half_precision_storage_is_widened_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let good = imported_model(dir.path());
    let half = dir.path().join("half.safetensors");
    rewrite(&good, &half, |t, _| {
        for v in t.values_mut() {
            *v = v.to_dtype(DType::F16).unwrap();
        }
    });
    assert!(std::fs::metadata(&half).unwrap().len() < std::fs::metadata(&good).unwrap().len() * 6 / 10);
    let model = Model::load(&half, &Device::Cpu).unwrap();
    let tensors = load_tensors(&golden("generator_upsample.safetensors"));
    let out = model.forward(Direction::XtoY, &tensors["input.0"]).unwrap();
    assert_eq!(out.dtype(), DType::F32);
    let err = relative_l2(&out, &tensors["output.0"]);
    assert!(err < 5e-3, "f16 weights: relative L2 {err}");
}

#[test]
fn networks_consume_exactly_the_parameters_their_config_lists() {
    use cycleserve::model::{Discriminator, DiscriminatorConfig, Family};
    for family in [Family::Upsample, Family::Transpose] {
        for norm_affine in [false, true] {
            for n_blocks in [0, 1, 3] {
                let cfg = GeneratorConfig { family, ngf: 4, n_blocks, norm_affine };
                let varmap = VarMap::new();
                Generator::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
                assert_eq!(sorted_shapes(&varmap), sorted(cfg.parameters()), "{cfg:?}");
                assert!(Generator::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))
                    .unwrap()
                    .forward(&Tensor::zeros((1, 3, 16, 12), DType::F32, &Device::Cpu).unwrap())
                    .is_ok());
            }
        }
    }
    let varmap = VarMap::new();
    let cfg = DiscriminatorConfig { ndf: 4 };
    Discriminator::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
    assert_eq!(sorted_shapes(&varmap), sorted(cfg.parameters()));
}

fn sorted(params: Vec<ParamSpec>) -> Vec<(String, Vec<usize>)> {
    let mut params: Vec<_> = params.into_iter().map(|p| (p.name, p.shape)).collect();
    params.sort();
    params
}

/// The variables a network created, with their shapes, by name.
fn sorted_shapes(varmap: &VarMap) -> Vec<(String, Vec<usize>)> {
    let data = varmap.data().lock().unwrap();
    sorted(data.iter().map(|(k, v)| ParamSpec::new(k, v.as_tensor().dims())).collect())
}
