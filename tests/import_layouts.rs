//! `cycleserve import` on every published generator layout and checkpoint container, against the
//! outputs PyTorch computed for the same weights (`scripts/make_import_fixtures.py`), and on
//! hostile files, which must fail with a message and bounded memory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::Device;
use common::*;
use cycleserve::model::ModelFile;

fn cycleserve(args: &[&str]) -> Output {
    run_binary(env!("CARGO_BIN_EXE_cycleserve"), args)
}

fn import_fixture(name: &str) -> PathBuf {
    fixture("import").join(name)
}

fn cases() -> Vec<serde_json::Value> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(import_fixture("manifest.json")).unwrap()).unwrap();
    manifest["cases"].as_array().unwrap().clone()
}

/// `cycleserve import` of one checkpoint: `--checkpoint` if it holds both generators.
fn import(file: &Path, combined: bool, extra: &[&str], out: &Path) -> Output {
    let flag = if combined { "--checkpoint" } else { "--x2y" };
    let mut args = vec!["import", flag, file.to_str().unwrap(), "--domains", "photo,painting"];
    args.extend_from_slice(extra);
    args.extend(["--out", out.to_str().unwrap()]);
    cycleserve(&args)
}

/// Translates the odd-sized photo with `model`: the share of channel values within ±1 level of
/// the reference, and the largest difference.
fn translated_agreement(model: &Path, direction: &str, reference: &Path, dir: &Path) -> (f64, u8) {
    let result = dir.join("result.png");
    let out = translate_photo(model, direction, &result);
    assert!(out.status.success(), "{}", stderr(&out));
    agreement(&result, reference)
}

#[test]
fn every_published_layout_imports_without_options_and_translates_like_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases() {
        let file = case["file"].as_str().unwrap();
        let model = dir.path().join("model.safetensors");
        let out = import(&import_fixture(file), case["combined"].as_bool().unwrap(), &[], &model);
        assert!(out.status.success(), "{file}: {}", stderr(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if file.starts_with("running_stats") {
            assert!(
                stdout.contains("dropped") && stdout.contains("running-statistics buffers"),
                "{file}: {stdout}"
            );
        }

        let meta = ModelFile::load(&model, &Device::Cpu).unwrap().metadata;
        let arch = meta.architecture;
        assert_eq!(arch.family.as_str(), case["family"].as_str().unwrap(), "{file}");
        assert_eq!(arch.norm_affine, case["norm_affine"].as_bool().unwrap(), "{file}");
        assert_eq!(arch.n_blocks as u64, case["n_blocks"].as_u64().unwrap(), "{file}");
        assert_eq!(arch.ngf as u64, case["ngf"].as_u64().unwrap(), "{file}");
        let layout = &meta.provenance["source_layout"];
        assert!(layout.contains(file), "{file}: {layout}");
        if file.contains("dropout") || file == "model_key.pth" {
            assert!(layout.contains("with dropout"), "{file}: {layout}");
        }

        for (direction, reference) in case["references"].as_object().unwrap() {
            let reference = import_fixture("reference").join(reference.as_str().unwrap());
            let (close, max) = translated_agreement(&model, direction, &reference, dir.path());
            println!("{file} {direction}: {:.3} % within ±1, max diff {max}", close * 100.);
            assert!(close >= 0.995, "{file} {direction}: only {:.3} % within ±1 (max {max})", close * 100.);
        }
    }
}

#[test]
fn combined_checkpoints_say_which_generator_is_x2y_and_swap_flips_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    let out = import(&import_fixture("combined_G_AB.pth"), true, &[], &model);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("`G_AB` is x2y, `G_BA` is y2x"), "{stdout}");
    assert!(stdout.contains("skipped") && stdout.contains("`D_A`"), "the discriminator is noted: {stdout}");

    let out = import(&import_fixture("combined_netG.pth"), true, &["--swap"], &model);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("`netG_B` is x2y, `netG_A` is y2x"), "{stdout}");
    let reference = import_fixture("reference/resnet_generator_b.png");
    let (close, max) = translated_agreement(&model, "x2y", &reference, dir.path());
    assert!(close >= 0.995, "swapped x2y: {:.3} % within ±1 (max {max})", close * 100.);

    let out = import(&import_fixture("combined_genA2B.pth"), false, &[], &model);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out)
            .contains("holds 2 generators (`genA2B.module`, `genB2A.module`): import it with --checkpoint"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_pickled_module_is_refused_with_how_to_save_its_state_dict() {
    let dir = tempfile::tempdir().unwrap();
    let out = import(&import_fixture("whole_module.pth"), false, &[], &dir.path().join("m.safetensors"));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("pickles a whole module (`__main__.Generator`)"), "{err}");
    assert!(err.contains("torch.save(model.state_dict(), PATH)"), "{err}");
}

/// Runs `cycleserve import` on a hostile file under a 1 GiB address-space limit (`ulimit -v`),
/// so an allocation that a naive reader would make fails loudly instead of passing unnoticed.
fn import_with_memory_limit(file: &Path, out: &Path) -> Output {
    std::process::Command::new("sh")
        .args(["-c", "ulimit -v 1048576 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_cycleserve"))
        .args(["import", "--x2y", file.to_str().unwrap(), "--domains", "a,b", "--out", out.to_str().unwrap()])
        .env("CYCLESERVE_LOG_LEVEL", "warn")
        .output()
        .unwrap()
}

#[test]
fn hostile_checkpoints_fail_with_a_message_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");

    // A [2^20, 2^20] float32 tensor (4 TiB) declared in a 444-byte file.
    let huge = import_with_memory_limit(&import_fixture("huge.pth"), &out);
    assert_eq!(huge.status.code(), Some(1), "{}", stderr(&huge));
    assert!(
        stderr(&huge).contains("declares 4398046511104 bytes of tensor data but the file holds only"),
        "{}",
        stderr(&huge)
    );

    // Nine levels of dicts, each with ten memo references to the one below: 10^9 leaves.
    let laughs = import_with_memory_limit(&import_fixture("laughs.pth"), &out);
    assert_eq!(laughs.status.code(), Some(1), "{}", stderr(&laughs));
    assert!(stderr(&laughs).contains("refers to the same objects over and over"), "{}", stderr(&laughs));
    assert!(!out.exists());
}
