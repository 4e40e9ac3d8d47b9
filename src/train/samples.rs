//! What a run shows of itself: sample grids on fixed images, and the loss curves.

use std::path::Path;

use candle_core::{Device, Module, Tensor};
use image::imageops::FilterType;
use image::RgbImage;

use super::data::{read_image, to_chw, Dataset};
use super::networks::Networks;
use crate::model::pixels::to_level;

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
        let rows = (0..self.x.dim(0)?.min(self.y.dim(0)?))
            .map(|r| columns.iter().map(|c| to_rgb(&c.get(r)?)).collect())
            .collect::<anyhow::Result<Vec<Vec<_>>>>()?;
        grid(&rows, self.size).save(path)?;
        Ok(())
    }
}

/// One CHW image in [-1, 1] as 8-bit RGB.
pub(super) fn to_rgb(chw: &Tensor) -> anyhow::Result<RgbImage> {
    let (_, h, w) = chw.dims3()?;
    let data = chw.flatten_all()?.to_vec1::<f32>()?;
    let plane = h * w;
    Ok(RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = y as usize * w + x as usize;
        image::Rgb([0, 1, 2].map(|c| to_level(data[c * plane + i])))
    }))
}

/// Lays rows of images out as a grid of `tile`×`tile` cells, resizing cells of another size.
pub(super) fn grid(rows: &[Vec<RgbImage>], tile: u32) -> RgbImage {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let mut grid = RgbImage::new(columns * tile, rows.len() as u32 * tile);
    for (r, row) in rows.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            let cell = if cell.dimensions() == (tile, tile) {
                cell.clone()
            } else {
                image::imageops::resize(cell, tile, tile, FilterType::Triangle)
            };
            image::imageops::replace(&mut grid, &cell, (c as u32 * tile) as i64, (r as u32 * tile) as i64);
        }
    }
    grid
}
