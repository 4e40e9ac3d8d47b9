//! How images meet the networks: the value an 8-bit level becomes, and the sizes the generator
//! runs at. Serving, evaluation and training all map pixels through here.

/// The generator downsamples twice, so it maps sizes that are multiples of 4 onto themselves.
pub const SIZE_MULTIPLE: u32 = 4;

/// The smallest side the generator runs at: its 2×2 bottleneck can still be reflection-padded
/// by one pixel. Smaller images are padded up to it and cropped back.
pub const MIN_NETWORK_SIDE: u32 = 8;

/// The side the network runs at for an image side: rounded up to a multiple of 4, at least 8.
pub fn padded_side(side: u32) -> u32 {
    (side.div_ceil(SIZE_MULTIPLE) * SIZE_MULTIPLE).max(MIN_NETWORK_SIDE)
}

/// An 8-bit level as a network input value in [-1, 1].
pub fn from_level(v: u8) -> f32 {
    v as f32 / 127.5 - 1.0
}

/// A network output value in [-1, 1] as an 8-bit level.
pub fn to_level(v: f32) -> u8 {
    ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8
}
