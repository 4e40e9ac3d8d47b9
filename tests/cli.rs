//! The `cycleserve import` and `cycleserve translate` commands, end to end, against PNGs that
//! PyTorch produced for the same checkpoints and photo (`scripts/pytorch_reference.py`); and
//! `cycleserve healthcheck` against a scripted server.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Output;

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
