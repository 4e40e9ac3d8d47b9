//! Image decoding and encoding, and the conversion between pixels and network tensors.
//!
//! Pixels map to `u8 / 127.5 - 1` on the way in and `round((y + 1) * 127.5)` on the way out.
//! Sizes that are not multiples of 4 are reflect-padded on the right and bottom and cropped back
//! afterwards, which reproduces what PyTorch computes on the padded image. Sides under 8 pixels
//! are padded up to 8 (reflecting repeatedly when the padding outgrows the image).

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage, RgbaImage};
use serde::Serialize;

use crate::model::layers::reflect_indices;

/// The generator downsamples twice, so it maps sizes that are multiples of 4 onto themselves.
pub const SIZE_MULTIPLE: u32 = 4;
/// The smallest side the generator runs at: its 2×2 bottleneck can still be reflection-padded
/// by one pixel. Smaller images are padded up to it and cropped back.
pub const MIN_NETWORK_SIDE: u32 = 8;

/// Bounds on what a caller may send, and how large an image the network is given.
#[derive(Clone, Copy, Debug)]
pub struct DecodeOptions {
    /// Encoded size in bytes.
    pub max_bytes: usize,
    /// Decoded width × height, checked from the header before any pixel is decoded.
    pub max_pixels: u64,
    /// Larger images are downscaled (Lanczos3, aspect kept) so their longer side is this long.
    pub max_side: Option<u32>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self { max_bytes: 20 * 1024 * 1024, max_pixels: 16_777_216, max_side: None }
    }
}

/// Why an image could not be used; each case has its own HTTP status in the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("image is {size} bytes, more than the limit of {limit} bytes")]
    TooManyBytes { size: usize, limit: usize },
    #[error("image is {width}×{height} = {} pixels, more than the limit of {limit} pixels", *width as u64 * *height as u64)]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("not a supported image: {0}")]
    Unsupported(String),
    #[error("image data is corrupt or truncated: {0}")]
    Corrupt(String),
    #[error("image is {width}×{height}: it has no pixels")]
    Empty { width: u32, height: u32 },
    #[error("cannot encode the result: {0}")]
    Encode(String),
}

/// A decoded RGB image, with its alpha channel kept aside to be put back on the result.
#[derive(Clone, Debug)]
pub struct DecodedImage {
    pub rgb: RgbImage,
    pub alpha: Option<Vec<u8>>,
    pub format: ImageFormat,
    /// The size before `max_side` downscaling, when that happened.
    pub downscaled_from: Option<(u32, u32)>,
}

impl DecodedImage {
    pub fn width(&self) -> u32 {
        self.rgb.width()
    }

    pub fn height(&self) -> u32 {
        self.rgb.height()
    }

    /// The size the network runs at: each side rounded up to a multiple of 4, and to at least 8.
    pub fn padded_size(&self) -> (u32, u32) {
        (padded(self.width()), padded(self.height()))
    }

    /// Builds a decoded image from an RGB buffer (no alpha), e.g. a downscaled or generated one.
    pub fn from_rgb(rgb: RgbImage) -> Self {
        Self { rgb, alpha: None, format: ImageFormat::Png, downscaled_from: None }
    }
}

fn padded(side: u32) -> u32 {
    (side.div_ceil(SIZE_MULTIPLE) * SIZE_MULTIPLE).max(MIN_NETWORK_SIDE)
}

/// Sniffs the format from the bytes, checks the limits against the header, decodes, applies the
/// EXIF orientation, downscales past `max_side`, and splits off alpha. Grayscale and 16-bit
/// images become 8-bit RGB.
pub fn decode(bytes: &[u8], limits: &DecodeOptions) -> Result<DecodedImage, ImageError> {
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooManyBytes { size: bytes.len(), limit: limits.max_bytes });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    let Some(format) = reader.format() else {
        return Err(ImageError::Unsupported(
            "unrecognised format; send PNG, JPEG, WebP, BMP, GIF or TIFF".into(),
        ));
    };
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(format, e))?;
    let (width, height) = decoder.dimensions();
    if width as u64 * height as u64 > limits.max_pixels {
        return Err(ImageError::TooManyPixels { width, height, limit: limits.max_pixels });
    }
    // Belt and braces for decoders whose header understates what they allocate: 8 bytes per
    // pixel covers 16-bit RGBA, plus room for decoder state.
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    decoder.set_limits(decoder_limits).map_err(|e| decode_error(format, e))?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(format, e))?;
    image.apply_orientation(orientation);
    let mut downscaled_from = None;
    if let Some(side) = limits.max_side.filter(|&s| image.width().max(image.height()) > s) {
        downscaled_from = Some((image.width(), image.height()));
        image = image.resize(side, side, image::imageops::FilterType::Lanczos3);
    }
    if image.width() == 0 || image.height() == 0 {
        return Err(ImageError::Empty { width: image.width(), height: image.height() });
    }
    let alpha = image.color().has_alpha().then(|| image.to_rgba8().pixels().map(|p| p.0[3]).collect());
    Ok(DecodedImage { rgb: image.to_rgb8(), alpha, format, downscaled_from })
}

fn decode_error(format: ImageFormat, err: image::ImageError) -> ImageError {
    let name = format.extensions_str().first().copied().unwrap_or("image").to_uppercase();
    match err {
        image::ImageError::Unsupported(e) => ImageError::Unsupported(format!("{name}: {e}")),
        image::ImageError::Limits(e) => {
            ImageError::Corrupt(format!("{name} needs more memory than allowed: {e}"))
        }
        other => ImageError::Corrupt(format!("{name}: {other}")),
    }
}

/// Writes a batch of same-padded-size images as NCHW f32 in [-1, 1], each reflect-padded on the
/// right and bottom to `(width, height)`.
pub fn to_network_input(images: &[&DecodedImage], width: u32, height: u32) -> Vec<f32> {
    let (pw, ph) = (width as usize, height as usize);
    let mut out = Vec::with_capacity(images.len() * 3 * pw * ph);
    for image in images {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let cols = reflect_indices(w, 0, pw - w);
        let rows = reflect_indices(h, 0, ph - h);
        let raw = image.rgb.as_raw();
        for channel in 0..3 {
            for &row in &rows {
                let line = &raw[row as usize * w * 3..(row as usize + 1) * w * 3];
                out.extend(cols.iter().map(|&col| from_level(line[col as usize * 3 + channel])));
            }
        }
    }
    out
}

/// An 8-bit level as a network input value in [-1, 1].
pub fn from_level(v: u8) -> f32 {
    v as f32 / 127.5 - 1.0
}

/// A network output value in [-1, 1] as an 8-bit level.
pub fn to_level(v: f32) -> u8 {
    ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8
}

/// Turns one network output (CHW f32 at the padded size) back into pixels: crop the top-left
/// `image`-sized region, quantise, and put the input's alpha back.
pub fn from_network_output(chw: &[f32], padded_width: u32, source: &DecodedImage) -> DynamicImage {
    let (w, h) = (source.width(), source.height());
    let pw = padded_width as usize;
    let plane = chw.len() / 3;
    let level =
        |channel: usize, x: u32, y: u32| to_level(chw[channel * plane + y as usize * pw + x as usize]);
    match &source.alpha {
        None => DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([level(0, x, y), level(1, x, y), level(2, x, y)])
        })),
        Some(alpha) => DynamicImage::ImageRgba8(RgbaImage::from_fn(w, h, |x, y| {
            let a = alpha[(y * w + x) as usize];
            image::Rgba([level(0, x, y), level(1, x, y), level(2, x, y), a])
        })),
    }
}

/// The formats results can be sent back in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    pub fn mime_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }
}

/// JPEG quality for `Accept: image/jpeg`; high because these are artworks, not thumbnails.
const JPEG_QUALITY: u8 = 92;

pub fn encode(image: &DynamicImage, format: OutputFormat) -> Result<Vec<u8>, ImageError> {
    let mut out = Cursor::new(Vec::new());
    let result = match format {
        OutputFormat::Png => image.write_to(&mut out, ImageFormat::Png),
        // JPEG has no alpha channel: drop it.
        OutputFormat::Jpeg => DynamicImage::ImageRgb8(image.to_rgb8())
            .write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)),
        // The image crate writes lossless WebP only.
        OutputFormat::Webp => {
            image.write_with_encoder(image::codecs::webp::WebPEncoder::new_lossless(&mut out))
        }
    };
    result.map_err(|e| ImageError::Encode(e.to_string()))?;
    Ok(out.into_inner())
}
