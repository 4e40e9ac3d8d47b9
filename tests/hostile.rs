//! Hostile and oversized inputs sent to a real server: each gets its precise 4xx with a JSON
//! body, and the server's peak memory (VmHWM, reset before each) stays bounded.

mod common;

use std::io::Write;

use common::server::Server;
use common::*;
use reqwest::{Client, StatusCode};

const MIB: u64 = 1 << 20;

/// A PNG chunk: length, type, data, CRC.
fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
    out
}

fn zlib(data_len: usize) -> Vec<u8> {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    let block = vec![0u8; 1 << 20];
    for _ in 0..data_len / block.len() {
        encoder.write_all(&block).unwrap();
    }
    encoder.finish().unwrap()
}

/// A 1×1 RGB PNG whose ICC profile inflates to 512 MiB.
fn png_with_iccp_bomb() -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 2, 0, 0, 0]));
    let mut iccp = b"bomb\0\0".to_vec();
    iccp.extend(zlib(512 << 20));
    png.extend(chunk(b"iCCP", &iccp));
    let mut pixel = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    pixel.write_all(&[0, 10, 20, 30]).unwrap();
    png.extend(chunk(b"IDAT", &pixel.finish().unwrap()));
    png.extend(chunk(b"IEND", &[]));
    png
}

/// A real 16,777,216 × 1 grayscale PNG (exactly 2^24 pixels, a few kB on the wire).
fn png_one_pixel_tall() -> Vec<u8> {
    let mut bytes = Vec::new();
    image::GrayImage::new(1 << 24, 1)
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    bytes
}

/// A real JPEG whose frame header was rewritten to declare 65,500 × 65,500 pixels.
fn jpeg_huge_declared() -> Vec<u8> {
    let mut jpeg = Vec::new();
    image::RgbImage::from_pixel(16, 16, image::Rgb([40, 80, 120]))
        .write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .unwrap();
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).expect("a baseline frame header");
    // Marker, length (2), precision (1), then height and width.
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xDC, 0xFF, 0xDC]);
    jpeg
}

/// A real lossless WebP whose header was rewritten to declare 12,000 × 12,000 pixels.
fn webp_huge_declared() -> Vec<u8> {
    let mut webp = Vec::new();
    image::RgbImage::from_pixel(16, 16, image::Rgb([40, 80, 120]))
        .write_to(&mut std::io::Cursor::new(&mut webp), image::ImageFormat::WebP)
        .unwrap();
    let vp8l = webp.windows(4).position(|w| w == b"VP8L").expect("a lossless bitstream") + 8;
    assert_eq!(webp[vp8l], 0x2F, "VP8L signature");
    // 14 bits of width − 1, 14 of height − 1, then the alpha and version bits, kept.
    let bits = u32::from_le_bytes(webp[vp8l + 1..vp8l + 5].try_into().unwrap());
    let huge = (bits & !((1 << 28) - 1)) | 11999 | (11999 << 14);
    webp[vp8l + 1..vp8l + 5].copy_from_slice(&huge.to_le_bytes());
    webp
}

/// A BMP header declaring 60,000 × 60,000 24-bit pixels.
fn bmp_huge_declared() -> Vec<u8> {
    let mut bmp = b"BM".to_vec();
    bmp.extend(54u32.to_le_bytes()); // file size (a lie)
    bmp.extend([0u8; 4]);
    bmp.extend(54u32.to_le_bytes());
    bmp.extend(40u32.to_le_bytes());
    bmp.extend(60_000i32.to_le_bytes());
    bmp.extend(60_000i32.to_le_bytes());
    bmp.extend(1u16.to_le_bytes());
    bmp.extend(24u16.to_le_bytes());
    bmp.extend([0u8; 24]);
    bmp
}

/// A GIF with a 1×1 logical screen whose first frame claims 20,000 × 20,000 pixels.
fn gif_frame_larger_than_screen() -> Vec<u8> {
    let mut gif = b"GIF89a".to_vec();
    gif.extend([1, 0, 1, 0, 0x80, 0, 0]); // 1×1 screen, 2-colour global table
    gif.extend([0, 0, 0, 255, 255, 255]);
    gif.push(0x2C);
    gif.extend([0, 0, 0, 0]);
    gif.extend(20_000u16.to_le_bytes());
    gif.extend(20_000u16.to_le_bytes());
    gif.push(0);
    gif.extend([2, 2, 0x4C, 0x01, 0]); // minimal LZW data
    gif.push(0x3B);
    gif
}

/// A 1×1 GIF of 2,000 frames: only the first is decoded.
fn gif_many_frames() -> Vec<u8> {
    let mut gif = b"GIF89a".to_vec();
    gif.extend([1, 0, 1, 0, 0x80, 0, 0]);
    gif.extend([0, 0, 0, 255, 255, 255]);
    for _ in 0..2000 {
        gif.push(0x2C);
        gif.extend([0, 0, 0, 0, 1, 0, 1, 0, 0]);
        gif.extend([2, 2, 0x4C, 0x01, 0]);
    }
    gif.push(0x3B);
    gif
}

/// A 16×16 RGB TIFF whose single uncompressed strip claims 1 GiB.
fn tiff_huge_strip() -> Vec<u8> {
    let entries: [(u16, u16, u32, u32); 9] = [
        (256, 3, 1, 16),      // width
        (257, 3, 1, 16),      // height
        (258, 3, 1, 8),       // bits per sample (one value for all three)
        (259, 3, 1, 1),       // no compression
        (262, 3, 1, 2),       // RGB
        (273, 4, 1, 8),       // strip offset
        (277, 3, 1, 3),       // samples per pixel
        (278, 3, 1, 16),      // rows per strip
        (279, 4, 1, 1 << 30), // strip byte count
    ];
    let mut tiff = b"II*\0".to_vec();
    tiff.extend(8u32.to_le_bytes());
    tiff.extend((entries.len() as u16).to_le_bytes());
    for (tag, kind, count, value) in entries {
        tiff.extend(tag.to_le_bytes());
        tiff.extend(kind.to_le_bytes());
        tiff.extend(count.to_le_bytes());
        tiff.extend(value.to_le_bytes());
    }
    tiff.extend(0u32.to_le_bytes());
    tiff.extend(vec![7u8; 16 * 16 * 3]);
    tiff
}

/// A status and the error code that comes with it (empty for 200).
type Answer = (StatusCode, &'static str);

async fn send(client: &Client, server: &Server, body: Vec<u8>) -> (StatusCode, String, String) {
    let response = client.post(server.url("/translate?direction=x2y")).body(body).send().await.unwrap();
    let status = response.status();
    if status == StatusCode::OK {
        return (status, String::new(), String::new());
    }
    assert_eq!(response.headers()["content-type"], "application/json", "{status} without a JSON body");
    let body: serde_json::Value = response.json().await.unwrap();
    let field = |f: &str| body["error"][f].as_str().unwrap_or_default().to_string();
    (status, field("code"), field("message"))
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_files_get_their_4xx_and_the_server_stays_small() {
    let models = tiny_models_dir();
    let server = Server::start(models.path(), &["--memory-budget", "1GiB"]).ready().await;
    let client = Client::new();
    let cases: [(&str, Vec<u8>, &[Answer]); 8] = [
        ("16,777,216 × 1 PNG", png_one_pixel_tall(), &[(StatusCode::PAYLOAD_TOO_LARGE, "too_many_pixels")]),
        // The decoder drops a profile that inflates past its allowance; the pixels are fine.
        (
            "iCCP bomb",
            png_with_iccp_bomb(),
            &[(StatusCode::OK, ""), (StatusCode::PAYLOAD_TOO_LARGE, "too_much_memory")],
        ),
        ("JPEG 65,500²", jpeg_huge_declared(), &[(StatusCode::PAYLOAD_TOO_LARGE, "too_many_pixels")]),
        ("WebP 12,000²", webp_huge_declared(), &[(StatusCode::PAYLOAD_TOO_LARGE, "too_many_pixels")]),
        ("BMP 60,000²", bmp_huge_declared(), &[(StatusCode::PAYLOAD_TOO_LARGE, "too_many_pixels")]),
        (
            "GIF frame over the screen",
            gif_frame_larger_than_screen(),
            &[
                (StatusCode::PAYLOAD_TOO_LARGE, "too_much_memory"),
                (StatusCode::UNPROCESSABLE_ENTITY, "corrupt_image"),
            ],
        ),
        ("GIF of 2,000 frames", gif_many_frames(), &[(StatusCode::OK, "")]),
        (
            "TIFF 1 GiB strip",
            tiff_huge_strip(),
            &[
                (StatusCode::PAYLOAD_TOO_LARGE, "too_much_memory"),
                (StatusCode::UNPROCESSABLE_ENTITY, "corrupt_image"),
            ],
        ),
    ];
    for (name, body, expected) in cases {
        server.reset_peak();
        let before = server.status_bytes("VmRSS:");
        let (status, code, message) = send(&client, &server, body).await;
        let growth = server.status_bytes("VmHWM:").saturating_sub(before);
        println!(
            "{name}: {status} {code} ({message}); peak RSS growth {:.1} MiB",
            growth as f64 / MIB as f64
        );
        assert!(
            expected.iter().any(|(s, c)| *s == status && *c == code),
            "{name}: got {status} {code} ({message}), expected one of {expected:?}"
        );
        assert!(growth < 50 * MIB, "{name}: the server grew by {} MiB", growth / MIB);
    }
    assert_eq!(client.get(server.url("/readyz")).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn images_beyond_the_budget_are_refused_with_the_largest_size_or_downscaled() {
    let models = tiny_models_dir();
    let client = Client::new();
    let photo =
        image::RgbImage::from_fn(1024, 768, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
    let mut body = Vec::new();
    photo.write_to(&mut std::io::Cursor::new(&mut body), image::ImageFormat::Png).unwrap();

    let strict =
        Server::start(models.path(), &["--memory-budget", "24MiB", "--oversize", "reject"]).ready().await;
    let view: serde_json::Value =
        client.get(strict.url("/v1/models/tiny")).send().await.unwrap().json().await.unwrap();
    let side = view["memory"]["largest_square_side"].as_u64().unwrap();
    assert!(view["memory"]["bytes_per_megapixel"].as_u64().unwrap() > 0);
    assert_eq!(view["memory"]["budget_bytes"], 24 << 20);
    assert!((64..768).contains(&side), "a 24 MiB budget takes squares up to {side}");
    let (status, code, message) = send(&client, &strict, body.clone()).await;
    assert_eq!((status, code.as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "too_much_memory"), "{message}");
    assert!(message.contains(&format!("about {side}×{side}")), "{message}");
    // A square of the advertised size is served.
    let fits = image::RgbImage::from_pixel(side as u32, side as u32, image::Rgb([9, 99, 199]));
    let mut fits_body = Vec::new();
    fits.write_to(&mut std::io::Cursor::new(&mut fits_body), image::ImageFormat::Png).unwrap();
    assert_eq!(send(&client, &strict, fits_body).await.0, StatusCode::OK);
    drop(strict);

    let shrinking = Server::start(models.path(), &["--memory-budget", "24MiB"]).ready().await;
    let response = client.post(shrinking.url("/translate?direction=x2y")).body(body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-downscaled-from"], "1024x768");
    let result = image::load_from_memory(&response.bytes().await.unwrap()).unwrap();
    assert!(result.width() < 1024 && result.width() as f64 / result.height() as f64 > 1.3);
}

#[test]
fn a_model_that_cannot_fit_the_budget_is_refused_at_start() {
    let models = tiny_models_dir();
    let dir = models.path().to_str().unwrap();
    let args = ["serve", "--port", "0", "--device", "cpu", "--memory-budget", "100KiB", "--models-dir", dir];
    let out = run_binary(env!("CARGO_BIN_EXE_cycleserve"), &args);
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(message.contains("model `tiny`") && message.contains("for even an 8×8 image"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_past_its_deadline_keeps_its_slot_until_its_decode_ends() {
    let models = tiny_models_dir();
    // Batches never fill or fall due, so no network pass runs: what memory shows is decodes.
    let flags = ["--queue-capacity", "1", "--request-timeout-ms", "150", "--max-batch-delay-ms", "600000"];
    let server = Server::start(models.path(), &flags).ready().await;
    // 16 megapixels that take far longer than 150 ms to decode, in a small PNG.
    let large = image::RgbImage::from_fn(4096, 4096, |x, y| image::Rgb([(x / 16) as u8, (y / 16) as u8, 99]));
    let mut body = Vec::new();
    large.write_to(&mut std::io::Cursor::new(&mut body), image::ImageFormat::Png).unwrap();
    let one_decode = 4096 * 4096 * 3 * 2;
    let client = Client::new();
    server.reset_peak();
    let before = server.status_bytes("VmRSS:");
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let (status, code, message) = send(&client, &server, body.clone()).await;
        assert!(
            [StatusCode::GATEWAY_TIMEOUT, StatusCode::SERVICE_UNAVAILABLE].contains(&status),
            "{status} {code} {message}"
        );
        statuses.push(status.as_u16());
    }
    let growth = server.status_bytes("VmHWM:").saturating_sub(before);
    println!("statuses {statuses:?}; peak RSS growth {:.0} MiB", growth as f64 / MIB as f64);
    // Six decodes at once would need six times this; one slot allows one.
    assert!(growth < 2 * one_decode, "{} MiB: more decodes ran than there are slots", growth / MIB);
}
