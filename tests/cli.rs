//! The `cycleserve import` and `cycleserve translate` commands, end to end, against PNGs that
//! PyTorch produced for the same checkpoints and photo (`scripts/pytorch_reference.py`);
//! `cycleserve translate` on folders against the same command on each file; and `cycleserve
//! healthcheck` against a scripted server.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;

use image::{DynamicImage, GenericImageView, ImageFormat};

use common::*;

fn cycleserve(args: &[&str]) -> Output {
    run_binary(env!("CARGO_BIN_EXE_cycleserve"), args)
}

/// `cycleserve import` of `x2y` (and `y2x`) into `model`, with domains `photo,painting`.
fn import(x2y: &Path, y2x: Option<&Path>, model: &Path) -> Output {
    let mut args = vec!["import", "--x2y", x2y.to_str().unwrap(), "--domains", "photo,painting"];
    if let Some(y2x) = y2x {
        args.extend(["--y2x", y2x.to_str().unwrap()]);
    }
    args.extend(["--out", model.to_str().unwrap()]);
    cycleserve(&args)
}

#[test]
fn imported_checkpoints_translate_like_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    for family in ["upsample", "transpose_affine"] {
        let pth = golden(&format!("generator_{family}.pth"));
        let model = dir.path().join(format!("{family}.safetensors"));
        let out = import(&pth, Some(&pth), &model);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("photo2painting + painting2photo"));

        let result = dir.path().join(format!("{family}.png"));
        let out = translate_photo(&model, "painting2photo", &result);
        assert!(out.status.success(), "{}", stderr(&out));
        let reference = fixture(&format!("reference/{family}_y2x_photo_250x198.png"));
        let (close, max) = agreement(&result, &reference);
        assert!(close >= 0.995, "{family}: only {:.3} % within ±1 (max diff {max})", close * 100.);
        assert!(max <= 2, "{family}: max diff {max}");
    }
}

/// The bf16 executor against the same PyTorch f32 references, on the golden random weights
/// (which move more under bf16 than trained ones); on a CPU without AMX, asking for bf16 is a
/// clear error and auto falls back to f32.
#[test]
fn bf16_translations_stay_within_a_few_levels_of_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let amx = cycleserve::model::amx::Amx::detect().is_some();
    for family in ["upsample", "transpose_affine"] {
        let pth = golden(&format!("generator_{family}.pth"));
        let model = dir.path().join(format!("{family}.safetensors"));
        assert!(import(&pth, Some(&pth), &model).status.success());
        let result = dir.path().join(format!("{family}.png"));
        let out = translate_photo_in(&model, "painting2photo", "bf16", &result);
        if !amx {
            assert!(!out.status.success());
            assert!(stderr(&out).contains("needs a CPU with AMX-BF16"), "{}", stderr(&out));
            assert!(translate_photo_in(&model, "painting2photo", "auto", &result).status.success());
            continue;
        }
        assert!(out.status.success(), "{}", stderr(&out));
        let reference = fixture(&format!("reference/{family}_y2x_photo_250x198.png"));
        let (close, max) = agreement(&result, &reference);
        println!("{family}: {:.2} % within ±1 level, at most {max}", close * 100.);
        assert!(close >= 0.97, "{family}: only {:.3} % within ±1 (max diff {max})", close * 100.);
        assert!(max <= 8, "{family}: max diff {max}");
    }
}

#[test]
fn command_line_errors_are_clear_and_fail() {
    let dir = tempfile::tempdir().unwrap();
    let raw = golden("generator_upsample.safetensors");
    let photo = fixture("photo_250x198.png");
    let out_png = dir.path().join("o.png");
    let args = |model: &Path, input: &Path, direction: &str| {
        cycleserve(&[
            "translate",
            "--model",
            model.to_str().unwrap(),
            "--direction",
            direction,
            input.to_str().unwrap(),
            out_png.to_str().unwrap(),
        ])
    };

    let out = args(&raw, &photo, "x2y");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("the header metadata lacks family"), "{}", stderr(&out));

    let model = dir.path().join("m.safetensors");
    let pth = golden("generator_upsample.pth");
    let imported = import(&pth, None, &model);
    assert!(imported.status.success());

    let out = args(&model, &photo, "painting2photo");
    assert!(stderr(&out).contains("this model has no y2x (painting2photo) generator"), "{}", stderr(&out));
    let out = args(&model, &photo, "sideways");
    assert!(stderr(&out).contains("expected x2y, y2x, photo2painting or painting2photo"), "{}", stderr(&out));
    let out = args(&model, &pth, "x2y");
    assert!(stderr(&out).contains("not a supported image"), "{}", stderr(&out));
    assert!(!out.status.success() && !out_png.exists());

    let out = cycleserve(&["translate", "--model", model.to_str().unwrap(), "--device", "tpu", "a", "b"]);
    assert!(stderr(&out).contains("unknown device `tpu`"), "{}", stderr(&out));
}

/// `cycleserve translate` with `args` after the model and direction, its info logs on stderr.
fn translate_with(model: &Path, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_cycleserve"));
    command.args(["translate", "--model", model.to_str().unwrap(), "--direction", "x2y", "--device", "cpu"]);
    command.args(args).env("CYCLESERVE_LOG_LEVEL", "info").env("CYCLESERVE_LOG_FORMAT", "json");
    command.output().unwrap()
}

/// The `translated` summary line's fields.
fn summary(out: &Output) -> serde_json::Value {
    let line = stderr(out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "translated");
    line.unwrap_or_else(|| panic!("no summary line in {}", stderr(out)))["fields"].clone()
}

fn save(image: &DynamicImage, path: &Path, format: ImageFormat) {
    image.save_with_format(path, format).unwrap();
}

/// A folder of five images at two padded sizes (252×200 from three different sizes; 256×256),
/// in three formats, one with alpha; a file that is not an image under an image's name; a
/// text file and a subfolder that are left alone.
fn photo_folder(dir: &Path) -> PathBuf {
    let folder = dir.join("photos");
    std::fs::create_dir_all(folder.join("nested")).unwrap();
    let photo = image::open(fixture("photo_250x198.png")).unwrap();
    let square = image::open(fixture("photo_256x256.png")).unwrap();
    save(&photo, &folder.join("a_photo.png"), ImageFormat::Png);
    save(&photo.fliph().crop_imm(0, 1, 249, 197), &folder.join("b_flipped.jpg"), ImageFormat::Jpeg);
    let mut faded = photo.crop_imm(1, 0, 249, 198).to_rgba8();
    for (x, _, pixel) in faded.enumerate_pixels_mut() {
        pixel.0[3] = (x * 255 / 248) as u8;
    }
    save(&DynamicImage::ImageRgba8(faded), &folder.join("c_faded.png"), ImageFormat::Png);
    save(&square, &folder.join("d_square.png"), ImageFormat::Png);
    save(&square.rotate90(), &folder.join("e_turned.webp"), ImageFormat::WebP);
    std::fs::write(folder.join("f_broken.png"), b"these bytes are not a PNG").unwrap();
    std::fs::write(folder.join("notes.txt"), b"not an image, not translated").unwrap();
    save(&photo, &folder.join("nested/g_deeper.png"), ImageFormat::Png);
    folder
}

#[test]
fn a_folder_translates_in_batches_exactly_as_each_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    import_golden(&model, Directions::X2yOnly);
    let folder = photo_folder(dir.path());
    let translated = ["a_photo", "b_flipped", "c_faded", "d_square", "e_turned"];
    let input = |stem: &str| {
        let name = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .find(|n| Path::new(n).file_stem().unwrap() == stem);
        folder.join(name.unwrap())
    };

    // (format, batch size, batches): the three 252×200 images share one batch or, two at a
    // time, two; the squares one.
    for (format, batch_size, batches, extension) in [("png", "8", 2, "png"), ("jpeg", "2", 3, "jpg")] {
        let out_dir = dir.path().join(format!("out_{format}"));
        let args = ["--format", format, "--batch-size", batch_size, "--out-dir", out_dir.to_str().unwrap()];
        let out = translate_with(&model, &[&args[..], &[folder.to_str().unwrap()]].concat());
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let errors = stderr(&out);
        assert!(errors.contains("1 of 6 inputs could not be translated (5 written to"), "{errors}");
        let broken = format!("{}: not a supported image", folder.join("f_broken.png").display());
        assert!(errors.contains(&broken), "{errors}");
        let fields = summary(&out);
        assert_eq!(
            (fields["written"].as_u64(), fields["batches"].as_u64()),
            (Some(5), Some(batches)),
            "{fields}"
        );

        let mut written: Vec<String> = std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        written.sort();
        let expected: Vec<String> = translated.iter().map(|s| format!("{s}.{extension}")).collect();
        assert_eq!(written, expected);
        for stem in translated {
            let single = dir.path().join(format!("single_{stem}.{extension}"));
            let input = input(stem);
            let alone = translate_with(
                &model,
                &["--format", format, input.to_str().unwrap(), single.to_str().unwrap()],
            );
            assert!(alone.status.success(), "{}", stderr(&alone));
            assert_eq!(summary(&alone)["batches"], 1);
            let batched = std::fs::read(out_dir.join(format!("{stem}.{extension}"))).unwrap();
            assert!(
                batched == std::fs::read(&single).unwrap(),
                "{format}: {stem} differs from its run alone"
            );
            let result = image::load_from_memory(&batched).unwrap();
            assert_eq!(result.dimensions(), image::open(&input).unwrap().dimensions(), "{stem}");
            assert_eq!(image::guess_format(&batched).unwrap().extensions_str()[0], extension);
        }
    }
    // Alpha survives the batch: the faded photo's result fades the same way.
    let faded = image::open(dir.path().join("out_png/c_faded.png")).unwrap();
    assert!(
        faded.color().has_alpha() && faded.get_pixel(0, 5).0[3] == 0 && faded.get_pixel(248, 5).0[3] == 255
    );
}

#[test]
fn folder_runs_that_would_lose_files_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    import_golden(&model, Directions::X2yOnly);
    let folder = photo_folder(dir.path());
    let listing = || {
        let mut files: Vec<_> = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files.into_iter().map(|f| (std::fs::read(&f).ok(), f)).collect::<Vec<_>>()
    };
    let before = listing();
    let path = |p: &Path| p.to_str().unwrap().to_string();

    // Results as PNGs beside the PNG inputs would overwrite them.
    let out = translate_with(&model, &["--out-dir", &path(&folder), &path(&folder)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("refusing to overwrite the input"), "{}", stderr(&out));

    // The same stem from two folders would make one result of two inputs.
    let other = dir.path().join("more");
    std::fs::create_dir(&other).unwrap();
    std::fs::copy(fixture("photo_256x256.png"), other.join("d_square.jpg")).unwrap();
    let out_dir = dir.path().join("out");
    let out = translate_with(&model, &["--out-dir", &path(&out_dir), &path(&folder), &path(&other)]);
    assert_eq!(out.status.code(), Some(1));
    let errors = stderr(&out);
    assert!(errors.contains("share one") && errors.contains("d_square.png ← "), "{errors}");
    assert!(errors.contains(&path(&other.join("d_square.jpg"))), "{errors}");

    // Several inputs need a folder to go to.
    let a = path(&folder.join("a_photo.png"));
    let out = translate_with(&model, &[&a, &path(&folder.join("d_square.png")), &path(&out_dir)]);
    assert!(stderr(&out).contains("need --out-dir DIR"), "{}", stderr(&out));
    let out = translate_with(&model, &[&a, &a]);
    assert!(stderr(&out).contains("refusing to overwrite the input"), "{}", stderr(&out));

    assert!(listing() == before, "the inputs are untouched");
    assert!(std::fs::read_dir(&out_dir).unwrap().next().is_none(), "nothing is written");
}

/// Serves one connection: the status line in three writes (the first before the request is
/// read), then the exit code of `cycleserve healthcheck` against it.
fn healthcheck_against(status_line: &str) -> Output {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/readyz", listener.local_addr().unwrap());
    let (head, rest) = status_line.split_at(10);
    let (middle, tail) = rest.split_at(3);
    let pieces = [head.to_string(), middle.to_string(), format!("{tail}\r\ncontent-length: 0\r\n\r\n")];
    let (request_line, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_nodelay(true).unwrap();
        stream.write_all(pieces[0].as_bytes()).unwrap();
        // The whole request head, so that closing with unread bytes cannot reset the connection.
        let head: Vec<String> =
            BufReader::new(&stream).lines().map(Result::unwrap).take_while(|line| !line.is_empty()).collect();
        for piece in &pieces[1..] {
            // A client that hangs up early shows in its exit code; this write need not succeed.
            let _ = stream.write_all(piece.as_bytes());
        }
        request_line.send(head[0].clone()).unwrap();
    });
    let out = cycleserve(&["healthcheck", "--url", &url, "--timeout-secs", "30"]);
    // Immediate once the command has read its answer; the bound only stops a broken one hanging.
    let request_line = received.recv_timeout(std::time::Duration::from_secs(60)).expect("no request served");
    assert_eq!(request_line, "GET /readyz HTTP/1.1");
    out
}

#[test]
fn healthcheck_reads_a_status_line_written_in_pieces() {
    let ok = healthcheck_against("HTTP/1.1 200 OK");
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    let unready = healthcheck_against("HTTP/1.1 503 Service Unavailable");
    assert_eq!(unready.status.code(), Some(1));
    assert!(stderr(&unready).contains("answered 503"), "{}", stderr(&unready));
}
