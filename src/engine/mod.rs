//! From encoded image to encoded result: decoding, batching, inference, encoding.

pub mod codec;

use candle_core::{Device, Tensor};
use image::DynamicImage;

use crate::model::{Direction, Model, ModelError};
use codec::DecodedImage;

/// Runs one direction of `model` on images that share a padded size and returns each result at
/// its own input size. This is the whole numeric path; batching only decides what to group.
pub fn run_batch(
    model: &Model,
    direction: Direction,
    images: &[&DecodedImage],
    device: &Device,
) -> Result<Vec<DynamicImage>, ModelError> {
    let Some(first) = images.first() else { return Ok(Vec::new()) };
    let (width, height) = first.padded_size();
    if let Some(other) = images.iter().find(|i| i.padded_size() != (width, height)) {
        return Err(candle_core::Error::Msg(format!(
            "a batch must share one padded size: {:?} and {:?}",
            (width, height),
            other.padded_size()
        ))
        .into());
    }
    let data = codec::to_network_input(images, width, height);
    let shape = (images.len(), 3, height as usize, width as usize);
    let input = Tensor::from_vec(data, shape, device)?;
    let output = model.forward(direction, &input)?.to_device(&Device::Cpu)?;
    let output = output.flatten_from(1)?.to_vec2::<f32>()?;
    Ok(output.iter().zip(images).map(|(chw, image)| codec::from_network_output(chw, width, image)).collect())
}
