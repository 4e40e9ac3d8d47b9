//! Decoding, padding and encoding: every supported kind of input, and a clear error for each
//! kind of bad one.

mod common;

use candle_core::Device;
use common::*;
use cycleserve::engine::codec::{self, DecodeOptions, ImageError, OutputFormat};
use cycleserve::engine::run_batch;
use cycleserve::model::{Direction, Model};
use image::GenericImageView;

fn decode_fixture(name: &str) -> Result<codec::DecodedImage, ImageError> {
    codec::decode(&std::fs::read(fixture(name)).unwrap(), &DecodeOptions::default())
}

/// PNG chunk CRC (ISO 3309), so a hand-made header passes the decoder's checks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    let body: Vec<u8> = kind.iter().chain(data).copied().collect();
    chunk.extend(&body);
    chunk.extend(crc32(&body).to_be_bytes());
    chunk
}

/// A 100 000 × 100 000 RGB PNG header (30 GB decoded) followed by a few bytes of data.
fn decompression_bomb() -> Vec<u8> {
    let mut ihdr = 100_000u32.to_be_bytes().to_vec();
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(b"IDAT", &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

#[test]
fn decodes_png_jpeg_grayscale_sixteen_bit_and_alpha() {
    let photo = decode_fixture("photo_250x198.png").unwrap();
    assert_eq!((photo.width(), photo.height(), photo.alpha.is_none()), (250, 198, true));
    assert_eq!(photo.padded_size(), (252, 200));

    let gray16 = decode_fixture("gray16.png").unwrap();
    assert_eq!((gray16.width(), gray16.height()), (10, 12));
    let p = gray16.rgb.get_pixel(3, 4).0;
    assert!(p[0] == p[1] && p[1] == p[2], "grayscale becomes equal RGB channels: {p:?}");

    let gray_alpha = decode_fixture("gray_alpha.png").unwrap();
    let alpha = gray_alpha.alpha.as_ref().expect("alpha kept");
    assert_eq!(alpha[3], 60, "alpha ramps 0, 20, 40, 60… along each row");
}

#[test]
fn exif_orientation_is_applied() {
    // Stored 16 wide × 8 high with orientation 6 (rotate 90° clockwise to display).
    let rotated = decode_fixture("exif_rotated.jpg").unwrap();
    assert_eq!((rotated.width(), rotated.height()), (8, 16));
}

#[test]
fn each_bad_input_gets_its_own_error() {
    let png = std::fs::read(fixture("photo_250x198.png")).unwrap();
    let limits = DecodeOptions::default();

    let err = codec::decode(&png[..png.len() / 2], &limits).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt(_)), "{err:?}");
    assert!(err.to_string().starts_with("image data is corrupt or truncated: PNG"), "{err}");

    let err = codec::decode(b"GIF? no, plain text", &limits).unwrap_err();
    assert!(err.to_string().contains("unrecognised format; send PNG, JPEG"), "{err}");

    let err = codec::decode(&decompression_bomb(), &limits).unwrap_err();
    assert_eq!(err, ImageError::TooManyPixels { width: 100_000, height: 100_000, limit: limits.max_pixels });
    assert!(err.to_string().contains("10000000000 pixels, more than the limit of 16777216"), "{err}");

    let small = DecodeOptions { max_bytes: 1000, ..limits };
    let err = codec::decode(&png, &small).unwrap_err();
    assert_eq!(err, ImageError::TooManyBytes { size: png.len(), limit: 1000 });

    let tiny = DecodeOptions { max_pixels: 250 * 197, ..limits };
    assert!(matches!(codec::decode(&png, &tiny), Err(ImageError::TooManyPixels { .. })));
}

#[test]
fn tiny_images_are_padded_up_to_the_networks_minimum() {
    let one = codec::DecodedImage::from_rgb(image::RgbImage::from_pixel(1, 30, image::Rgb([10, 20, 30])));
    assert_eq!(one.padded_size(), (8, 32));
    let data = codec::to_network_input(&[&one], 8, 32);
    assert!(data[..8 * 32].iter().all(|&v| v == data[0]), "a 1-pixel-wide image repeats its column");
    let stripes =
        codec::DecodedImage::from_rgb(image::RgbImage::from_fn(2, 8, |x, _| image::Rgb([x as u8, 0, 0])));
    let data = codec::to_network_input(&[&stripes], 8, 8);
    let red = |x: usize| ((data[x] + 1.0) * 127.5).round() as u8;
    assert_eq!((0..8).map(red).collect::<Vec<_>>(), vec![0, 1, 0, 1, 0, 1, 0, 1], "reflects back and forth");
}

#[test]
fn padding_reflects_on_the_right_and_bottom_only() {
    let img = image::RgbImage::from_fn(5, 6, |x, y| image::Rgb([(10 * y + x) as u8, 0, 255]));
    let decoded = codec::DecodedImage::from_rgb(img);
    assert_eq!(decoded.padded_size(), (8, 8));
    let data = codec::to_network_input(&[&decoded], 8, 8);
    let red = |x: usize, y: usize| ((data[y * 8 + x] + 1.0) * 127.5).round() as u8;
    // Row 0 reads 0 1 2 3 4 | 3 2 1; rows 6 and 7 reflect rows 4 and 3.
    assert_eq!((0..8).map(|x| red(x, 0)).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 3, 2, 1]);
    assert_eq!(red(0, 6), 40);
    assert_eq!(red(6, 7), 32);
    assert_eq!(data[64], -1.0, "green 0 maps to -1");
    assert_eq!(data[128], 1.0, "blue 255 maps to 1");
}

#[test]
fn translation_keeps_size_and_alpha_and_encodes_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    import_golden(&path, Directions::X2yOnly);
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let input = decode_fixture("gray_alpha.png").unwrap();
    let out = run_batch(&model, Direction::XtoY, &[&input], &Device::Cpu).unwrap().remove(0);
    assert_eq!(out.dimensions(), (11, 9));
    let rgba = out.to_rgba8();
    assert_eq!(rgba.pixels().map(|p| p.0[3]).collect::<Vec<_>>(), *input.alpha.as_ref().unwrap());

    for format in [OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::Webp] {
        let bytes = codec::encode(&out, format).unwrap();
        let back = image::load_from_memory(&bytes).unwrap();
        assert_eq!(back.dimensions(), (11, 9), "{format:?}");
        assert_eq!(image::guess_format(&bytes).unwrap().to_mime_type(), format.mime_type());
    }
}
