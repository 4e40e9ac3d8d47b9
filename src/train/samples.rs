//! What a run shows of itself: sample grids on fixed images, and the loss curves.

use std::path::Path;

use candle_core::{Device, Module, Tensor};
use image::imageops::FilterType;
use image::RgbImage;

use super::data::{read_image, to_chw, Dataset};
use super::networks::Networks;
use crate::engine::codec::to_level;

/// The fixed images a run's sample grids show: the first readable files of each domain.
pub struct SampleSet {
    x: Tensor,
    y: Tensor,
    size: u32,
}

impl SampleSet {
    pub fn new(dataset: &Dataset, count: usize, size: u32, device: &Device) -> anyhow::Result<Self> {
        let load = |files: &[std::path::PathBuf]| -> anyhow::Result<Tensor> {
            let images: Vec<f32> = files
                .iter()
                .filter_map(|p| read_image(p).ok())
                .take(count)
                .flat_map(|img| to_chw(&img.resize_exact(size, size, FilterType::CatmullRom).to_rgb8()))
                .collect();
            let n = images.len() / (3 * (size * size) as usize);
            Ok(Tensor::from_vec(images, (n, 3, size as usize, size as usize), device)?)
        };
        Ok(Self { x: load(dataset.x_files())?, y: load(dataset.y_files())?, size })
    }

    /// Writes a grid with one row per sample: real X, G(x), F(G(x)), real Y, F(y), G(F(y)).
    pub fn write_grid(&self, nets: &Networks, path: &Path) -> anyhow::Result<()> {
        let fake_y = nets.g.forward(&self.x)?;
        let rec_x = nets.f.forward(&fake_y)?;
        let fake_x = nets.f.forward(&self.y)?;
        let rec_y = nets.g.forward(&fake_x)?;
        let columns = [&self.x, &fake_y, &rec_x, &self.y, &fake_x, &rec_y];
        let rows = self.x.dim(0)?.min(self.y.dim(0)?);
        let s = self.size;
        let mut grid = RgbImage::new(s * columns.len() as u32, s * rows as u32);
        for (c, column) in columns.iter().enumerate() {
            for r in 0..rows {
                let tile = column.get(r)?.flatten_all()?.to_vec1::<f32>()?;
                let plane = (s * s) as usize;
                for (i, px) in (0..plane).enumerate() {
                    let (x, y) = (c as u32 * s + i as u32 % s, r as u32 * s + i as u32 / s);
                    grid.put_pixel(x, y, image::Rgb([0, 1, 2].map(|ch| to_level(tile[ch * plane + px]))));
                }
            }
        }
        grid.save(path)?;
        Ok(())
    }
}
