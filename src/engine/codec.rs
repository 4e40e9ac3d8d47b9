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
use crate::model::pixels::{from_level, padded_side, to_level};

/// Bounds on what a caller may send, and how large an image the network is given.
#[derive(Clone, Copy, Debug)]
pub struct DecodeOptions {
    /// Encoded size in bytes.
    pub max_bytes: usize,
    /// Pixels of the padded size the network runs at (each side rounded up to a multiple of 4,
    /// at least 8), checked from the header before any pixel is decoded.
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
    #[error(
        "image is {width}×{height}: it runs at {}×{} = {} pixels, more than the limit of {limit} pixels",
        padded_side(*width), padded_side(*height), padded_side(*width) as u64 * padded_side(*height) as u64
    )]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("not a supported image: {0}")]
    Unsupported(String),
    #[error("image data is corrupt or truncated: {0}")]
    Corrupt(String),
    #[error("{0}")]
    TooMuchMemory(String),
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
        (padded_side(self.width()), padded_side(self.height()))
    }

    /// Builds a decoded image from an RGB buffer (no alpha), e.g. a downscaled or generated one.
    pub fn from_rgb(rgb: RgbImage) -> Self {
        Self { rgb, alpha: None, format: ImageFormat::Png, downscaled_from: None }
    }
}

/// Bytes a decoder may allocate while reading headers and metadata (ICC profiles, text chunks,
/// TIFF tags) before any pixel: enough for real files, far below what a metadata bomb asks for.
const HEADER_ALLOC: u64 = 16 << 20;

/// Room for a decoder's own state beside the image buffer it fills.
const DECODER_SLACK: u64 = 8 << 20;

/// What an image's header says, read before any pixel is decoded.
#[derive(Clone, Copy, Debug)]
pub struct ImageHeader {
    /// As stored (before the EXIF orientation is applied).
    pub stored: (u32, u32),
    /// As displayed, after the EXIF orientation.
    pub width: u32,
    pub height: u32,
    /// Bytes per pixel of the decoder's output (16-bit RGBA: 8).
    pub bytes_per_pixel: u64,
    pub has_alpha: bool,
}

impl ImageHeader {
    /// The header of a plain `width`×`height` 8-bit RGB image, for costing sizes in general.
    pub fn rgb(width: u32, height: u32) -> Self {
        Self { stored: (width, height), width, height, bytes_per_pixel: 3, has_alpha: false }
    }

    pub fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }

    /// The size after fitting the longer side within `side`, as [`decode`] does.
    pub fn fitted(&self, side: Option<u32>) -> (u32, u32) {
        match side {
            Some(side) if self.width.max(self.height) > side => fit_within(self.width, self.height, side),
            _ => (self.width, self.height),
        }
    }
}

/// The size of a `width`×`height` image scaled (aspect kept, as `DynamicImage::resize`) so its
/// longer side is `side`.
fn fit_within(width: u32, height: u32, side: u32) -> (u32, u32) {
    let scale = side as f64 / width.max(height) as f64;
    let scaled = |v: u32| ((v as f64 * scale).round() as u32).clamp(1, side);
    (scaled(width), scaled(height))
}

/// A reader over an in-memory image.
type BytesReader<'a> = ImageReader<Cursor<&'a [u8]>>;

fn reader(bytes: &[u8], limits: image::Limits) -> Result<(BytesReader<'_>, ImageFormat), ImageError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    let Some(format) = reader.format() else {
        return Err(ImageError::Unsupported(
            "unrecognised format; send PNG, JPEG, WebP, BMP, GIF or TIFF".into(),
        ));
    };
    // Limits set on the reader reach the decoder as it is built (PNG reads its metadata
    // chunks while being built); set later they would come too late.
    reader.limits(limits);
    Ok((reader, format))
}

/// Sniffs the format and reads the header with a small allocation cap, checking the byte and
/// pixel limits (pixels of the padded size the network would run at) before any pixel is
/// decoded.
pub fn probe(bytes: &[u8], options: &DecodeOptions) -> Result<ImageHeader, ImageError> {
    if bytes.len() > options.max_bytes {
        return Err(ImageError::TooManyBytes { size: bytes.len(), limit: options.max_bytes });
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(HEADER_ALLOC);
    let (reader, format) = reader(bytes, limits)?;
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(format, e))?;
    let stored = decoder.dimensions();
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let (width, height) = match orientation {
        image::metadata::Orientation::Rotate90
        | image::metadata::Orientation::Rotate270
        | image::metadata::Orientation::Rotate90FlipH
        | image::metadata::Orientation::Rotate270FlipH => (stored.1, stored.0),
        _ => stored,
    };
    if width == 0 || height == 0 {
        return Err(ImageError::Empty { width, height });
    }
    let padded = padded_side(width) as u64 * padded_side(height) as u64;
    if padded > options.max_pixels {
        return Err(ImageError::TooManyPixels { width, height, limit: options.max_pixels });
    }
    let color = decoder.color_type();
    Ok(ImageHeader {
        stored,
        width,
        height,
        bytes_per_pixel: color.bytes_per_pixel() as u64,
        has_alpha: color.has_alpha(),
    })
}

/// Bytes [`decode_probed`] holds at its peak, body excluded: the decoder's buffer (and a rotated
/// copy), the downscaling passes, and the RGB and alpha planes it returns.
pub fn decode_peak_bytes(header: &ImageHeader, fit_side: Option<u32>) -> u64 {
    let source = header.pixels();
    let (w, h) = header.fitted(fit_side);
    let target = w as u64 * h as u64;
    let decoded = 2 * source * header.bytes_per_pixel + DECODER_SLACK;
    // Lanczos resizing goes through a width × new-height RGBA f32 image.
    let resize = if target < source {
        header.width as u64 * h as u64 * 16 + target * header.bytes_per_pixel
    } else {
        0
    };
    // Splitting off alpha goes through an RGBA copy.
    decoded + resize + target * (3 + 4 + 1)
}

/// Bytes a decoded image keeps: its RGB plane and its alpha plane.
pub fn decoded_bytes(width: u32, height: u32, has_alpha: bool) -> u64 {
    width as u64 * height as u64 * if has_alpha { 4 } else { 3 }
}

/// Sniffs, probes and decodes in one go, fitting within `options.max_side` (the command-line
/// tools and training; the server probes first and budgets the decode).
pub fn decode(bytes: &[u8], options: &DecodeOptions) -> Result<DecodedImage, ImageError> {
    let header = probe(bytes, options)?;
    decode_probed(bytes, &header, options.max_side)
}

/// Decodes an image whose header [`probe`] read, with the decoder allowed no more memory than
/// that header implies; applies the EXIF orientation, fits the longer side within `fit_side`,
/// and splits off alpha. Grayscale and 16-bit images become 8-bit RGB.
pub fn decode_probed(
    bytes: &[u8],
    header: &ImageHeader,
    fit_side: Option<u32>,
) -> Result<DecodedImage, ImageError> {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(header.stored.0);
    limits.max_image_height = Some(header.stored.1);
    let buffer = header.stored.0 as u64 * header.stored.1 as u64 * header.bytes_per_pixel;
    limits.max_alloc = Some(buffer + DECODER_SLACK);
    let (reader, format) = reader(bytes, limits)?;
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(format, e))?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(format, e))?;
    image.apply_orientation(orientation);
    let mut downscaled_from = None;
    if let Some(side) = fit_side.filter(|&s| image.width().max(image.height()) > s) {
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
        image::ImageError::Limits(e) => ImageError::TooMuchMemory(format!(
            "{name}: decoding it needs more memory than its size allows ({e})"
        )),
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

/// The formats results can be sent back in (or, from the command line, written in).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Png,
    #[value(alias = "jpg")]
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

    /// The usual file-name extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
            Self::Webp => "webp",
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
