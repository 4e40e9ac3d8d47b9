//! Held-out evaluation: mean L1 cycle-reconstruction and identity-mapping errors per direction,
//! on whole images at their own size (padded as the server pads them).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::data::read_image;
use super::samples::{grid, to_rgb};
use crate::engine::codec::{self, DecodedImage};

/// A generator as evaluation sees it: NCHW batch in, NCHW batch out.
pub type Translate<'a> = &'a dyn Fn(&Tensor) -> candle_core::Result<Tensor>;

/// Mean absolute errors in the networks' [-1, 1] pixel scale (×127.5 for 8-bit levels).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    pub step: u64,
    pub images_x: usize,
    pub images_y: usize,
    /// |F(G(x)) − x|
    pub cycle_x: f64,
    /// |G(F(y)) − y|
    pub cycle_y: f64,
    /// |F(x) − x|: how much F alters images already in its target domain.
    pub identity_x: f64,
    /// |G(y) − y|
    pub identity_y: f64,
}

/// Held-out images of both domains, ready as network inputs.
pub struct EvalSet {
    x: Vec<Tensor>,
    y: Vec<Tensor>,
}

impl EvalSet {
    pub fn load(x_dir: &Path, y_dir: &Path, device: &Device) -> anyhow::Result<Self> {
        Ok(Self { x: load_dir(x_dir, device)?, y: load_dir(y_dir, device)? })
    }

    /// Evaluates G (X→Y) and F (Y→X).
    pub fn evaluate(&self, g: Translate, f: Translate, step: u64) -> candle_core::Result<EvalReport> {
        let (cycle_x, identity_x) = errors(&self.x, g, f)?;
        let (cycle_y, identity_y) = errors(&self.y, f, g)?;
        Ok(EvalReport {
            step,
            images_x: self.x.len(),
            images_y: self.y.len(),
            cycle_x,
            cycle_y,
            identity_x,
            identity_y,
        })
    }
}

/// Mean |back(there(a)) − a| and |back(a) − a| over `images`.
fn errors(images: &[Tensor], there: Translate, back: Translate) -> candle_core::Result<(f64, f64)> {
    let (mut cycle, mut identity) = (0.0, 0.0);
    for a in images {
        let l1 = |b: &Tensor| -> candle_core::Result<f64> {
            (b - a)?.abs()?.mean_all()?.to_scalar::<f32>().map(f64::from)
        };
        cycle += l1(&back(&there(a)?)?)?;
        identity += l1(&back(a)?)?;
    }
    let n = images.len().max(1) as f64;
    Ok((cycle / n, identity / n))
}

/// Writes a grid of `count` rows, each: x, G(x), F(G(x)), y, F(y), G(F(y)), every tile resized
/// to `tile`² for display.
pub fn write_grid(
    set: &EvalSet,
    g: Translate,
    f: Translate,
    count: usize,
    tile: u32,
    path: &Path,
) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for (x, y) in set.x.iter().zip(&set.y).take(count) {
        let (gx, fy) = (g(x)?, f(y)?);
        let columns = [x.clone(), gx.clone(), f(&gx)?, y.clone(), fy.clone(), g(&fy)?];
        rows.push(columns.iter().map(|c| to_rgb(&c.get(0)?)).collect::<anyhow::Result<Vec<_>>>()?);
    }
    grid(&rows, tile).save(path)?;
    Ok(())
}

fn load_dir(dir: &Path, device: &Device) -> anyhow::Result<Vec<Tensor>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read evaluation folder {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut images = Vec::new();
    for path in files {
        let Ok(image) = read_image(&path) else {
            tracing::warn!("skipping unreadable evaluation image {}", path.display());
            continue;
        };
        let decoded = DecodedImage::from_rgb(image.to_rgb8());
        let (w, h) = decoded.padded_size();
        let data = codec::to_network_input(&[&decoded], w, h);
        images.push(Tensor::from_vec(data, (1, 3, h as usize, w as usize), device)?);
    }
    anyhow::ensure!(!images.is_empty(), "no readable image in evaluation folder {}", dir.display());
    Ok(images)
}
