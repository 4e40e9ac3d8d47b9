//! Unpaired training data: two folders of images, random pairing, resize + random crop + flip,
//! prepared on worker threads ahead of the training loop.
//!
//! Every random choice is a function of (seed, epoch, index), not of thread timing, so a run is
//! repeatable and a resumed run sees exactly the batches the uninterrupted one would have.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::engine::codec::{self, DecodeOptions};
use crate::model::pixels;

/// Batches each worker prepares ahead of the training loop.
const PREFETCH_PER_WORKER: usize = 2;

/// One batch as NCHW f32 in [-1, 1], on the host.
pub struct Batch {
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    pub size: usize,
}

pub struct Dataset {
    x: Vec<PathBuf>,
    y: Vec<PathBuf>,
    load_size: u32,
    crop_size: u32,
    flip: bool,
    seed: u64,
    /// Files already reported as unreadable, so each is reported once.
    reported: Mutex<HashSet<PathBuf>>,
}

impl Dataset {
    /// Lists both folders (every regular, non-hidden file; decoding decides what is an image).
    pub fn open(
        x_dir: &Path,
        y_dir: &Path,
        load_size: u32,
        crop_size: u32,
        flip: bool,
        seed: u64,
    ) -> anyhow::Result<Self> {
        if crop_size > load_size {
            bail!("crop size {crop_size} is larger than load size {load_size}");
        }
        if crop_size % pixels::SIZE_MULTIPLE != 0 || crop_size < 16 {
            bail!("crop size {crop_size} must be a multiple of 4 and at least 16 (the discriminator downsamples 16×)");
        }
        Ok(Self {
            x: list_images(x_dir)?,
            y: list_images(y_dir)?,
            load_size,
            crop_size,
            flip,
            seed,
            reported: Mutex::new(HashSet::new()),
        })
    }

    /// An epoch visits the larger domain once, as the reference implementation does.
    pub fn len(&self) -> usize {
        self.x.len().max(self.y.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn steps_per_epoch(&self, batch_size: usize) -> usize {
        (self.len() / batch_size).max(1)
    }

    pub fn x_files(&self) -> &[PathBuf] {
        &self.x
    }

    pub fn y_files(&self) -> &[PathBuf] {
        &self.y
    }

    /// Batch `step` of `epoch`: X in a per-epoch shuffled order, each paired with a random Y.
    pub fn batch(&self, epoch: usize, step: usize, batch_size: usize) -> anyhow::Result<Batch> {
        let mut order: Vec<usize> = (0..self.x.len()).collect();
        order.shuffle(&mut self.rng(epoch, u32::MAX));
        let pixels = 3 * (self.crop_size * self.crop_size) as usize;
        let mut batch = Batch {
            x: Vec::with_capacity(batch_size * pixels),
            y: Vec::with_capacity(batch_size * pixels),
            size: batch_size,
        };
        for i in step * batch_size..(step + 1) * batch_size {
            let mut rng = self.rng(epoch, i as u32);
            let y_index = rng.random_range(0..self.y.len());
            batch.x.extend(self.load(&self.x, order[i % self.x.len()], &mut rng)?);
            batch.y.extend(self.load(&self.y, y_index, &mut rng)?);
        }
        Ok(batch)
    }

    fn rng(&self, epoch: usize, index: u32) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(((epoch as u64) << 32) | index as u64);
        rng
    }

    /// Loads file `index` (or, if it cannot be read, the next readable one), augmented.
    fn load(&self, files: &[PathBuf], index: usize, rng: &mut ChaCha8Rng) -> anyhow::Result<Vec<f32>> {
        let max_offset = self.load_size - self.crop_size;
        let (ox, oy) = (rng.random_range(0..=max_offset), rng.random_range(0..=max_offset));
        let flip = self.flip && rng.random::<bool>();
        for k in 0..files.len() {
            let path = &files[(index + k) % files.len()];
            match read_image(path) {
                Ok(image) => {
                    let resized = image.resize_exact(self.load_size, self.load_size, FilterType::CatmullRom);
                    let mut crop = resized.crop_imm(ox, oy, self.crop_size, self.crop_size).to_rgb8();
                    if flip {
                        image::imageops::flip_horizontal_in_place(&mut crop);
                    }
                    return Ok(to_chw(&crop));
                }
                Err(err) => {
                    if self.reported.lock().expect("report lock poisoned").insert(path.clone()) {
                        tracing::warn!("skipping unreadable training image {}: {err:#}", path.display());
                    }
                }
            }
        }
        bail!(
            "no readable image among the {} files of {}",
            files.len(),
            files[0].parent().unwrap_or(Path::new("")).display()
        )
    }
}

/// Decodes any image the server accepts, as RGB.
pub fn read_image(path: &Path) -> anyhow::Result<DynamicImage> {
    let bytes = std::fs::read(path)?;
    let limits = DecodeOptions { max_bytes: usize::MAX, max_pixels: 1 << 28, max_side: None };
    Ok(DynamicImage::ImageRgb8(codec::decode(&bytes, &limits)?.rgb))
}

/// CHW f32 in [-1, 1], the pixel mapping the server uses.
pub fn to_chw(image: &RgbImage) -> Vec<f32> {
    let raw = image.as_raw();
    (0..3).flat_map(|c| raw.iter().skip(c).step_by(3).map(|&v| pixels::from_level(v))).collect()
}

fn list_images(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read image folder {}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if path.is_file() && !hidden {
            files.push(path);
        }
    }
    if files.is_empty() {
        bail!("image folder {} is empty", dir.display());
    }
    files.sort();
    Ok(files)
}

/// Batches of one epoch from `start` on, prepared by `workers` threads: worker k makes batches
/// k, k + workers, … and the loop takes them round-robin, so order never depends on timing.
pub struct Loader {
    receivers: Vec<Receiver<anyhow::Result<Batch>>>,
    next: usize,
    end: usize,
}

impl Loader {
    pub fn start(
        dataset: Arc<Dataset>,
        epoch: usize,
        start: usize,
        end: usize,
        batch_size: usize,
        workers: usize,
    ) -> Self {
        let workers = workers.max(1);
        let receivers = (0..workers)
            .map(|w| {
                let (tx, rx) = sync_channel(PREFETCH_PER_WORKER);
                let dataset = Arc::clone(&dataset);
                std::thread::Builder::new()
                    .name(format!("loader-{w}"))
                    .spawn(move || {
                        for step in (start..end).filter(|s| s % workers == w) {
                            // A closed channel means the loop is done with this epoch.
                            if tx.send(dataset.batch(epoch, step, batch_size)).is_err() {
                                break;
                            }
                        }
                    })
                    .expect("cannot spawn a data loader thread");
                rx
            })
            .collect();
        Self { receivers, next: start, end }
    }
}

impl Iterator for Loader {
    type Item = anyhow::Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let receiver = &self.receivers[self.next % self.receivers.len()];
        self.next += 1;
        Some(receiver.recv().unwrap_or_else(|_| Err(anyhow::anyhow!("a data loader thread stopped"))))
    }
}
