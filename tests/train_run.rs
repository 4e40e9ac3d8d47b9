//! `cycletrain` end to end on a tiny generated dataset: exact resume, skipped unreadable files,
//! the run directory's contents, clear errors, and an export that `cycleserve` serves.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use common::{fixture, run_binary, stderr};

fn cycletrain(args: &[&str]) -> Output {
    run_binary(env!("CARGO_BIN_EXE_cycletrain"), args)
}

/// Two folders of small images (crops of the sample photo, tinted per domain) and one file that
/// is not an image.
fn dataset(dir: &Path) {
    let photo = image::open(fixture("photo_256x256.png")).unwrap().to_rgb8();
    for (domain, tint) in [("trainA", [1.0, 1.0, 1.0]), ("trainB", [1.1, 0.9, 0.7])] {
        std::fs::create_dir_all(dir.join(domain)).unwrap();
        for i in 0..5u32 {
            let crop = image::imageops::crop_imm(&photo, 30 * i, 20 * i, 96, 96).to_image();
            let tinted = image::RgbImage::from_fn(96, 96, |x, y| {
                let p = crop.get_pixel(x, y).0;
                image::Rgb([0, 1, 2].map(|c| (p[c] as f32 * tint[c]).min(255.0) as u8))
            });
            tinted.save(dir.join(domain).join(format!("{i}.png"))).unwrap();
        }
    }
    std::fs::write(dir.join("trainA/notes.txt"), "not an image").unwrap();
}

/// Tiny networks on tiny crops, on the CPU.
const TINY: [&str; 12] = [
    "--ngf",
    "4",
    "--blocks",
    "1",
    "--ndf",
    "4",
    "--load-size",
    "40",
    "--crop-size",
    "32",
    "--device",
    "cpu",
];
/// One epoch at the initial rate, one of decay.
const SHORT: [&str; 4] = ["--epochs", "1", "--epochs-decay", "1"];

/// Trains tiny networks on the short schedule.
fn train(data: &Path, out: &Path, extra: &[&str]) {
    train_tiny(data, out, &[&SHORT, extra].concat());
}

fn train_tiny(data: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(TINY);
    args.extend(extra);
    let run = cycletrain(&args);
    assert!(run.status.success(), "{}", stderr(&run));
}

/// Exports a run's model file with these domain names.
fn export(run: &Path, out: &Path, domains: &str, extra: &[&str]) {
    let mut args =
        vec!["export", run.to_str().unwrap(), "--out", out.to_str().unwrap(), "--domains", domains];
    args.extend(extra);
    let export = cycletrain(&args);
    assert!(export.status.success(), "{}", stderr(&export));
}

fn checkpoint(run: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(run.join("checkpoint.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn resumed_run_ends_bit_identical_to_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    // 5 steps per epoch: the runs cross an epoch boundary (and its learning-rate change). Both
    // keep an average of their generators, which resumes exactly too.
    let options = ["--save-every", "3", "--sample-every", "4", "--average-decay", "0.9"];
    let straight = dir.path().join("straight");
    train(&data, &straight, &[&options[..], &["--max-steps", "8"]].concat());
    let resumed = dir.path().join("resumed");
    train(&data, &resumed, &[&options[..], &["--max-steps", "4"]].concat());
    let run = cycletrain(&["--resume", resumed.to_str().unwrap(), "--max-steps", "8", "--sample-every", "4"]);
    assert!(run.status.success(), "{}", stderr(&run));

    let (a, b) = (checkpoint(&straight), checkpoint(&resumed));
    assert_eq!(a.len(), b.len());
    assert!(a.contains_key("average.G.model.1.weight"));
    for (name, ta) in &a {
        let (va, vb) = (ta.flatten_all().unwrap(), b[name].flatten_all().unwrap());
        assert_eq!(va.to_vec1::<f32>().unwrap(), vb.to_vec1::<f32>().unwrap(), "{name} differs after resume");
    }
    let lines = std::fs::read_to_string(resumed.join("losses.jsonl")).unwrap();
    let steps: Vec<u64> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>(), "one log line per step across the resume");
    assert_eq!(
        losses_without_time(&lines),
        losses_without_time(&std::fs::read_to_string(straight.join("losses.jsonl")).unwrap())
    );
    for file in ["losses.png", "config.json", "samples/step_0000004.png", "samples/step_0000008.png"] {
        assert!(resumed.join(file).exists(), "{file} missing");
    }
}

#[test]
fn resume_can_replace_the_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let run_dir = dir.path().join("run");
    // Six files in trainA (one unreadable): six steps an epoch; step 7 is the first of epoch 1.
    train(&data, &run_dir, &["--max-steps", "7", "--save-every", "7", "--dataset-name", "tinted crops"]);
    let resume = |extra: &[&str]| {
        let mut args = vec!["--resume", run_dir.to_str().unwrap()];
        args.extend(extra);
        cycletrain(&args)
    };

    let too_short = resume(&["--epochs-decay", "0"]);
    assert!(!too_short.status.success(), "{}", stderr(&too_short));
    assert!(stderr(&too_short).contains("already in epoch 1"), "{}", stderr(&too_short));

    let longer = resume(&["--epochs-decay", "2", "--sample-every", "100"]);
    assert!(longer.status.success(), "{}", stderr(&longer));
    let log = std::fs::read_to_string(run_dir.join("losses.jsonl")).unwrap();
    let lrs: Vec<(u64, f64)> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["step"].as_u64().unwrap(), v["lr"].as_f64().unwrap()))
        .collect();
    assert_eq!(lrs.len(), 18, "1 + 2 epochs of 6 steps");
    // Step 7 ran under the first schedule (decay over 1 epoch: half the rate); from step 7 on,
    // decay over 2 epochs drops the rate by a third of 2e-4 at each epoch past the first.
    for (step, lr) in lrs {
        let factor = if step == 7 { 0.5 } else { [1.0, 2.0 / 3.0, 1.0 / 3.0][(step as usize - 1) / 6] };
        let expected = 2e-4 * factor;
        assert!((lr - expected).abs() < 1e-12, "step {step}: lr {lr}, expected {expected}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!((config["epochs"].as_u64(), config["epochs_decay"].as_u64()), (Some(1), Some(2)));

    // The last step ended the last epoch: the run counts it as done.
    let model = dir.path().join("model.safetensors");
    export(&run_dir, &model, "a,b", &[]);
    let meta = cycleserve::model::ModelFile::load(&model, &Device::Cpu).unwrap().metadata;
    assert_eq!(meta.provenance["epochs"], "3 of 3");
    assert_eq!(meta.provenance["dataset"], "tinted crops");
}

/// Each logged step without its wall-clock field, the only one allowed to differ.
fn losses_without_time(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

#[test]
fn export_serves_and_bad_setups_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let run_dir = dir.path().join("run");
    train(&data, &run_dir, &["--max-steps", "2"]);

    let model = dir.path().join("model.safetensors");
    export(&run_dir, &model, "photo,painting", &["--storage", "int8"]);
    let png = dir.path().join("out.png");
    let photo = fixture("photo_250x198.png");
    let serve = Command::new(env!("CARGO_BIN_EXE_cycleserve"))
        .args(["translate", "--model", model.to_str().unwrap(), "--direction", "painting2photo"])
        .args([photo.to_str().unwrap(), png.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(serve.status.success(), "{}", stderr(&serve));
    assert_eq!(image::image_dimensions(&png).unwrap(), (250, 198));

    let grid = dir.path().join("grid.png");
    let (x, y) = (data.join("trainA"), data.join("trainB"));
    let out = cycletrain(&[
        "eval",
        model.to_str().unwrap(),
        "--x",
        x.to_str().unwrap(),
        "--y",
        y.to_str().unwrap(),
        "--grid",
        grid.to_str().unwrap(),
        "--grid-rows",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["images_x"].as_u64(), report["step"].as_u64()), (Some(5), Some(2)));
    for key in ["cycle_x", "cycle_y", "identity_x", "identity_y"] {
        let v = report[key].as_f64().unwrap();
        assert!(v > 0.0 && v < 2.0, "{key} = {v}");
    }
    assert_eq!(image::image_dimensions(&grid).unwrap(), (6 * 256, 2 * 256));

    let meta = cycleserve::model::ModelFile::load(&model, &Device::Cpu).unwrap().metadata;
    assert_eq!(meta.provenance["steps"], "2");
    assert!(meta.provenance["producer"].starts_with("cycletrain"));
    assert_eq!(meta.provenance["storage"], "int8");
    // Where the data lay is told relative to the run directory, never as this machine's path.
    assert_eq!(meta.provenance["dataset"], "X: ../data/trainA; Y: ../data/trainB");
    let root = dir.path().canonicalize().unwrap();
    for (key, value) in &meta.provenance {
        for path in [dir.path(), root.as_path()] {
            assert!(!value.contains(path.to_str().unwrap()), "{key} holds an absolute path: {value}");
        }
    }
    let recipe: serde_json::Value = serde_json::from_str(&meta.provenance["recipe"]).unwrap();
    assert_eq!(recipe["generator"]["ngf"], 4);
    assert!(recipe.get("x_dir").is_none(), "{recipe}");
    let renamed = dir.path().join("renamed.safetensors");
    export(&run_dir, &renamed, "a,b", &["--dataset-name", "crops"]);
    let meta = cycleserve::model::ModelFile::load(&renamed, &Device::Cpu).unwrap().metadata;
    assert_eq!(meta.provenance["dataset"], "crops");

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("trainA")).unwrap();
    std::fs::create_dir_all(empty.join("trainB")).unwrap();
    let out =
        cycletrain(&["--data", empty.to_str().unwrap(), "--out", dir.path().join("x").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("trainA is empty"), "{}", stderr(&out));
    let out = cycletrain(&["--data", dir.path().join("nowhere").to_str().unwrap(), "--out", "x"]);
    assert!(stderr(&out).contains("cannot read image folder"), "{}", stderr(&out));
    let out = cycletrain(&["--resume", dir.path().join("nowhere").to_str().unwrap()]);
    assert!(stderr(&out).contains("cannot read checkpoint"), "{}", stderr(&out));
}

#[test]
fn a_run_can_start_its_generators_from_a_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let first = dir.path().join("first");
    train(&data, &first, &["--max-steps", "2"]);
    let model = dir.path().join("start.safetensors");
    export(&first, &model, "photo,painting", &[]);

    // At a learning rate of 0 no step moves a weight, so the checkpoint shows where each
    // network started: G and F from the file, the discriminators from the seed.
    let at_rest = ["--max-steps", "1", "--lr", "0", "--seed", "7"];
    let started = dir.path().join("started");
    train(&data, &started, &[&at_rest[..], &["--init-generators", model.to_str().unwrap()]].concat());
    let from_seed = dir.path().join("from-seed");
    train(&data, &from_seed, &at_rest);
    let (started_weights, seed_weights) = (checkpoint(&started), checkpoint(&from_seed));
    let file = candle_core::safetensors::load(&model, &Device::Cpu).unwrap();
    let max_diff = |a: &Tensor, b: &Tensor| {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    };
    let (mut generators, mut discriminators) = (0, 0);
    for (name, weight) in &started_weights {
        match name.split('.').next().unwrap() {
            "G" | "F" => {
                assert_eq!(max_diff(weight, &file[name]), 0.0, "{name}");
                generators += 1;
            }
            "D_X" | "D_Y" => {
                assert_eq!(max_diff(weight, &seed_weights[name]), 0.0, "{name}");
                discriminators += 1;
            }
            _ => {}
        }
    }
    assert_eq!(generators, file.len());
    assert!(discriminators > 0);
    assert!(max_diff(&started_weights["G.model.1.weight"], &seed_weights["G.model.1.weight"]) > 0.0);

    // The recipe names the file by name and content; a resumed run keeps it, and the exported
    // model carries it.
    let expected = serde_json::json!({
        "file": "start.safetensors",
        "sha256": cycleserve::engine::catalog::sha256_hex(&std::fs::read(&model).unwrap()),
        "steps": 2,
    });
    let init = |run: &Path| {
        checkpoint_state(&run.join("checkpoint.safetensors"))["config"]["init_generators"].clone()
    };
    assert_eq!(init(&started), expected);
    let out = cycletrain(&["--resume", started.to_str().unwrap(), "--max-steps", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(checkpoint_step(&started.join("checkpoint.safetensors")), 2);
    assert_eq!(init(&started), expected);
    let grown = dir.path().join("grown.safetensors");
    export(&started, &grown, "photo,painting", &[]);
    let bytes = std::fs::read(&grown).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let recipe: serde_json::Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["recipe"]).unwrap();
    assert_eq!(recipe["init_generators"], expected);
    assert_eq!(init(&first), serde_json::Value::Null);

    // A file of another architecture is refused before anything is written.
    let wrong = dir.path().join("wrong");
    let out = cycletrain(&[
        "--data",
        data.to_str().unwrap(),
        "--out",
        wrong.to_str().unwrap(),
        "--ngf",
        "8",
        "--blocks",
        "1",
        "--device",
        "cpu",
        "--init-generators",
        model.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(message.contains("holds upsample family, ngf 4, 1 blocks"), "{message}");
    assert!(message.contains("asks for upsample family, ngf 8, 1 blocks"), "{message}");
    assert!(!wrong.exists());
    let not_a_model = data.join("trainA/0.png");
    let out = cycletrain(&[
        "--init-generators",
        not_a_model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        wrong.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(message.contains("--init-generators: cannot start the generators from this file"), "{message}");
    assert!(message.contains("0.png"), "{message}");
    assert!(!wrong.exists());
}

#[test]
fn a_run_can_keep_an_average_of_its_generators_and_export_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let plain = dir.path().join("plain");
    train(&data, &plain, &["--max-steps", "4"]);
    let averaged = dir.path().join("averaged");
    train(&data, &averaged, &["--max-steps", "4", "--average-decay", "0.5"]);
    // The average starts on a resume too, at the checkpoint's weights.
    let late = dir.path().join("late");
    train(&data, &late, &["--max-steps", "2"]);
    let out = cycletrain(&["--resume", late.to_str().unwrap(), "--max-steps", "4", "--average-decay", "0.5"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // The average never feeds back: all three runs trained the same networks.
    let (plain_weights, averaged_weights, late_weights) =
        (checkpoint(&plain), checkpoint(&averaged), checkpoint(&late));
    let same = |a: &Tensor, b: &Tensor| {
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    for (name, weight) in &plain_weights {
        assert!(same(weight, &averaged_weights[name]) && same(weight, &late_weights[name]), "{name}");
    }
    let averages: Vec<&String> = averaged_weights.keys().filter(|n| n.starts_with("average.")).collect();
    let generator_vars = plain_weights.keys().filter(|n| n.starts_with("G.") || n.starts_with("F.")).count();
    assert_eq!(averages.len(), generator_vars);
    assert!(!plain_weights.keys().any(|n| n.starts_with("average.")));
    let name = "G.model.1.weight";
    let average = &averaged_weights[&format!("average.{name}")];
    assert!(!same(average, &averaged_weights[name]), "the average is not the last step's weights");
    // Started two steps later, the late average has fewer steps behind it.
    assert!(!same(average, &late_weights[&format!("average.{name}")]));
    let since =
        |run: &Path| checkpoint_state(&run.join("checkpoint.safetensors"))["config"]["average"].clone();
    assert_eq!(since(&averaged), serde_json::json!({"decay": 0.5, "since_step": 0}));
    assert_eq!(since(&late), serde_json::json!({"decay": 0.5, "since_step": 2}));

    // Export takes the average by default, the last step's weights on request, and says which.
    let exported = |run: &Path, file: &str, extra: &[&str]| {
        let path = dir.path().join(file);
        export(run, &path, "photo,painting", extra);
        let bytes = std::fs::read(&path).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let weights = header.metadata().as_ref().unwrap()["weights"].clone();
        (candle_core::safetensors::load(&path, &Device::Cpu).unwrap(), weights)
    };
    let (file, weights) = exported(&averaged, "average.safetensors", &[]);
    assert!(same(&file[name], average));
    assert_eq!(weights, "moving average (decay 0.5, from step 0)");
    let (file, weights) = exported(&averaged, "last.safetensors", &["--weights", "last"]);
    assert!(same(&file[name], &averaged_weights[name]));
    assert_eq!(weights, "last step");
    let (file, weights) = exported(&plain, "plain.safetensors", &[]);
    assert!(same(&file[name], &plain_weights[name]));
    assert_eq!(weights, "last step");

    // What cannot be done is refused clearly.
    let missing = dir.path().join("none.safetensors");
    let out = cycletrain(&[
        "export",
        plain.to_str().unwrap(),
        "--out",
        missing.to_str().unwrap(),
        "--domains",
        "photo,painting",
        "--weights",
        "average",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("keeps no average of its generators"), "{}", stderr(&out));
    assert!(!missing.exists());
    let out = cycletrain(&["--resume", averaged.to_str().unwrap(), "--average-decay", "0.9"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot change to 0.9"), "{}", stderr(&out));
    assert_eq!(checkpoint_step(&averaged.join("checkpoint.safetensors")), 4);
    let never = dir.path().join("never");
    for decay in ["1", "-0.5", "x"] {
        let decay = format!("--average-decay={decay}");
        let out = cycletrain(&["--data", data.to_str().unwrap(), "--out", never.to_str().unwrap(), &decay]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("--average-decay"), "{}", stderr(&out));
        assert!(!never.exists());
    }
}

/// The training state a checkpoint holds besides tensors.
fn checkpoint_state(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    serde_json::from_str(&header.metadata().as_ref().unwrap()["cycletrain"]).unwrap()
}

fn checkpoint_step(path: &Path) -> u64 {
    checkpoint_state(path)["progress"]["global_step"].as_u64().unwrap()
}

fn logged_steps(run: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(run.join("losses.jsonl")).unwrap_or_default();
    // A line being appended may be incomplete: only whole lines count.
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect()
}

/// Starts a training run in the background, its logs in `out/../NAME.log`.
fn spawn_train(data: &Path, out: &Path, extra: &[&str]) -> std::process::Child {
    let log = std::fs::File::create(out.with_extension("log")).unwrap();
    let mut args = vec!["--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(TINY);
    args.extend(extra);
    Command::new(env!("CARGO_BIN_EXE_cycletrain"))
        .args(&args)
        .env("CYCLESERVE_LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Polls until `done` holds while the child lives (the deadline guards against hanging forever;
/// it is no timing assumption).
fn wait_until(child: &mut std::process::Child, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !done() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before {what}");
        }
        assert!(std::time::Instant::now() < deadline, "gave up waiting until {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn signal(child: &std::process::Child, signal: i32) {
    // SAFETY: kill has no memory effects; the child is not yet reaped, so its pid is still its own.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

/// Stops the child (SIGSTOP) and waits until the kernel reports it stopped: from then on,
/// signals sent to it stay pending until SIGCONT.
fn freeze(child: &mut std::process::Child) {
    signal(child, libc::SIGSTOP);
    let stat = format!("/proc/{}/stat", child.id());
    wait_until(child, "the run is stopped", || {
        let text = std::fs::read_to_string(&stat).unwrap();
        text[text.rfind(')').unwrap() + 1..].trim_start().starts_with('T')
    });
}

#[test]
fn sigterm_stops_after_the_current_step_with_a_checkpoint_and_the_resumed_run_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    // Six steps an epoch, 20 epochs: 120 steps, checkpoints only at epoch ends (and on a stop).
    let schedule =
        ["--epochs", "10", "--epochs-decay", "10", "--save-every", "1000", "--sample-every", "1000"];
    let straight = dir.path().join("straight");
    train_tiny(&data, &straight, &schedule);

    let interrupted = dir.path().join("interrupted");
    let mut child = spawn_train(&data, &interrupted, &schedule);
    wait_until(&mut child, "the run logs step 2", || logged_steps(&interrupted).len() >= 2);
    freeze(&mut child);
    let logged_before_signal = logged_steps(&interrupted).len() as u64;
    signal(&child, libc::SIGTERM);
    signal(&child, libc::SIGCONT);
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(interrupted.with_extension("log")).unwrap();
    assert!(status.success(), "{status:?}\n{log}");

    // It finished the step it was in (if any) and saved exactly there.
    let stopped_at = checkpoint_step(&interrupted.join("checkpoint.safetensors"));
    assert!(
        (logged_before_signal..=logged_before_signal + 1).contains(&stopped_at),
        "stopped at {stopped_at}, signalled after {logged_before_signal}"
    );
    assert!(stopped_at < 120, "the signal came before the end");
    assert_eq!(logged_steps(&interrupted), (1..=stopped_at).collect::<Vec<_>>());
    assert!(log.contains("stopped by a signal"), "{log}");

    let run = cycletrain(&["--resume", interrupted.to_str().unwrap()]);
    assert!(run.status.success(), "{}", stderr(&run));
    let (a, b) = (checkpoint(&straight), checkpoint(&interrupted));
    assert_eq!(a.len(), b.len());
    for (name, ta) in &a {
        let (va, vb) = (ta.flatten_all().unwrap(), b[name].flatten_all().unwrap());
        assert_eq!(va.to_vec1::<f32>().unwrap(), vb.to_vec1::<f32>().unwrap(), "{name} differs after resume");
    }
    let read = |run: &Path| std::fs::read_to_string(run.join("losses.jsonl")).unwrap();
    assert_eq!(losses_without_time(&read(&interrupted)), losses_without_time(&read(&straight)));

    // The checkpoint before the last one stays beside it: the end of epoch 19.
    assert_eq!(checkpoint_step(&straight.join("checkpoint.safetensors")), 120);
    assert_eq!(checkpoint_step(&straight.join("checkpoint.prev.safetensors")), 114);
}

#[test]
fn a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let out = dir.path().join("run");
    let mut child = spawn_train(&data, &out, &["--epochs", "1000", "--save-every", "1000000"]);
    wait_until(&mut child, "the run logs step 1", || !logged_steps(&out).is_empty());
    freeze(&mut child);
    // Both pending on the main thread when it resumes: handled one after the other, before it
    // runs any more of the training loop.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let pid = child.id() as libc::pid_t;
        // SAFETY: tgkill has no memory effects; the main thread's id is the process id.
        assert_eq!(unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, sig) }, 0);
    }
    signal(&child, libc::SIGCONT);
    let status = child.wait().unwrap();
    assert!(matches!(status.code(), Some(130 | 143)), "{status:?}");
}

#[test]
fn a_second_run_on_a_directory_is_refused_while_the_first_lives() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data);
    let out = dir.path().join("run");
    let mut first = spawn_train(&data, &out, &["--epochs", "1000", "--save-every", "1000000"]);
    let pid = first.id().to_string();
    wait_until(&mut first, "the first run holds the lock", || {
        std::fs::read_to_string(out.join("cycletrain.lock")).is_ok_and(|s| s.trim() == pid)
    });

    let mut args = vec!["--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(TINY);
    for second in [cycletrain(&args), cycletrain(&["--resume", out.to_str().unwrap()])] {
        assert!(!second.status.success());
        assert!(stderr(&second).contains(&format!("in use by cycletrain pid {pid}")), "{}", stderr(&second));
    }

    // A run that dies without cleaning up leaves the file, but not the lock.
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(std::fs::read_to_string(out.join("cycletrain.lock")).unwrap().trim(), pid);
    train(&data, &out, &["--max-steps", "1"]);
    assert_eq!(checkpoint_step(&out.join("checkpoint.safetensors")), 1);
}
