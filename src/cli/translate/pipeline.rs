//! The threads of a `translate` run and the bounded channels between them:
//!
//! decode threads (read + decode, next job first) → batcher and network on the calling thread
//! (the network's kernels use the rayon pool) → encode threads (encode + write).
//!
//! Decoding and encoding overlap the network; every channel is bounded, so at most a few
//! batches' worth of images are held whatever the number of files. A file that cannot be read,
//! decoded, translated, encoded or written is recorded and the run goes on; a panic in any of
//! those steps fails its own images only.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;
use std::time::Instant;

use image::DynamicImage;

use super::batcher::{Batch, Batcher};
use super::inputs::{Failure, Job};
use crate::engine::codec::{self, DecodeOptions, DecodedImage, OutputFormat};

pub struct Settings {
    pub decode: DecodeOptions,
    pub format: OutputFormat,
    /// Most images per batch; the network's `batch_limit` may lower it for large sizes.
    pub batch_size: usize,
    /// Threads decoding, and as many encoding.
    pub threads: usize,
}

/// Runs one batch of images sharing a padded size and returns each result at its own size.
pub trait Network {
    fn run(&mut self, images: &[&DecodedImage]) -> Result<Vec<DynamicImage>, String>;

    /// The most images of padded size `(width, height)` a batch may hold, at most `most`.
    fn batch_limit(&self, size: (u32, u32), most: usize) -> usize;
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    pub written: usize,
    pub batches: usize,
    /// In job order.
    pub failures: Vec<Failure>,
}

/// Translates every job; `done(ok)` is called once per job as it finishes, from any thread.
pub fn run(
    jobs: &[Job],
    settings: &Settings,
    network: &mut dyn Network,
    done: &(dyn Fn(bool) + Sync),
) -> Report {
    let threads = settings.threads.max(1);
    let batch_size = settings.batch_size.max(1);
    let next = AtomicUsize::new(0);
    let (decoded_tx, decoded_rx) = sync_channel(batch_size);
    let (encode_tx, encode_rx) = sync_channel(batch_size);
    let encode_rx = Mutex::new(encode_rx);
    let mut failures: Vec<(usize, String)> = Vec::new();
    let mut report = Report::default();
    std::thread::scope(|scope| {
        for i in 0..threads {
            let (tx, next) = (decoded_tx.clone(), &next);
            spawn(scope, format!("decode-{i}"), move || decode_loop(jobs, next, &settings.decode, tx));
        }
        drop(decoded_tx);
        let encoders: Vec<_> = (0..threads)
            .map(|i| {
                let encode_rx = &encode_rx;
                spawn(scope, format!("encode-{i}"), move || {
                    encode_loop(jobs, encode_rx, settings.format, done)
                })
            })
            .collect();

        // Up to four sizes arriving interleaved still fill their batches.
        let mut batcher = Batcher::new(4 * batch_size);
        for (index, decoded) in decoded_rx {
            let image = match decoded {
                Ok(image) => image,
                Err(reason) => {
                    failures.push((index, reason));
                    done(false);
                    continue;
                }
            };
            let size = image.padded_size();
            let limit = || network.batch_limit(size, batch_size).clamp(1, batch_size);
            if let Some(batch) = batcher.push(size, (index, image), limit) {
                translate(batch, network, &encode_tx, &mut failures, done);
                report.batches += 1;
            }
        }
        for batch in batcher.drain() {
            translate(batch, network, &encode_tx, &mut failures, done);
            report.batches += 1;
        }
        drop(encode_tx);
        for encoder in encoders {
            let (written, failed) = encoder.join().expect("encode threads catch their panics");
            report.written += written;
            failures.extend(failed);
        }
    });
    failures.sort_by_key(|(index, _)| *index);
    report.failures = failures
        .into_iter()
        .map(|(index, reason)| Failure { input: jobs[index].input.clone(), reason })
        .collect();
    report
}

fn spawn<'scope, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    name: String,
    work: impl FnOnce() -> T + Send + 'scope,
) -> std::thread::ScopedJoinHandle<'scope, T> {
    std::thread::Builder::new().name(name).spawn_scoped(scope, work).expect("cannot spawn a translate thread")
}

type Decoded = (usize, Result<DecodedImage, String>);

/// Takes the next job until none is left; stops early if the network side has gone.
fn decode_loop(jobs: &[Job], next: &AtomicUsize, options: &DecodeOptions, out: SyncSender<Decoded>) {
    loop {
        let index = next.fetch_add(1, Ordering::Relaxed);
        let Some(job) = jobs.get(index) else { return };
        let decoded = guarded("decoding", || decode(&job.input, options));
        if out.send((index, decoded)).is_err() {
            return;
        }
    }
}

fn decode(path: &Path, options: &DecodeOptions) -> Result<DecodedImage, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    codec::decode(&bytes, options).map_err(|e| e.to_string())
}

/// Runs one batch and hands its results to the encoders, or fails each of its images.
fn translate(
    batch: Batch<(usize, DecodedImage)>,
    network: &mut dyn Network,
    encode: &SyncSender<(usize, DynamicImage)>,
    failures: &mut Vec<(usize, String)>,
    done: &(dyn Fn(bool) + Sync),
) {
    let started = Instant::now();
    let images: Vec<&DecodedImage> = batch.items.iter().map(|(_, image)| image).collect();
    let results = guarded("translating", || network.run(&images));
    drop(images);
    tracing::debug!(
        images = batch.items.len(),
        width = batch.size.0,
        height = batch.size.1,
        seconds = started.elapsed().as_secs_f64(),
        "batch"
    );
    match results {
        Ok(results) => {
            for ((index, _), result) in batch.items.into_iter().zip(results) {
                // The encoders outlive this loop: the channel is open.
                let _ = encode.send((index, result));
            }
        }
        Err(reason) => {
            for (index, _) in batch.items {
                failures.push((index, format!("translation failed: {reason}")));
                done(false);
            }
        }
    }
}

/// Encodes and writes results until the network side closes the channel; returns how many
/// were written and the failures.
fn encode_loop(
    jobs: &[Job],
    results: &Mutex<Receiver<(usize, DynamicImage)>>,
    format: OutputFormat,
    done: &(dyn Fn(bool) + Sync),
) -> (usize, Vec<(usize, String)>) {
    let (mut written, mut failures) = (0, Vec::new());
    loop {
        // The lock is held only to take the next result, never while encoding.
        let next = results.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((index, image)) = next else { break };
        let output = &jobs[index].output;
        let result = guarded("encoding", || {
            let bytes = codec::encode(&image, format).map_err(|e| e.to_string())?;
            write_replacing(output, &bytes).map_err(|e| format!("cannot write {}: {e}", output.display()))
        });
        done(result.is_ok());
        match result {
            Ok(()) => written += 1,
            Err(reason) => failures.push((index, reason)),
        }
    }
    (written, failures)
}

/// Runs `work`, turning a panic into an error naming the `step`.
fn guarded<T>(step: &str, work: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(format!("internal error while {step}: {message}"))
    })
}

/// Writes `bytes` to `path` through a temporary file renamed over it, so that an interrupted
/// run never leaves a truncated result under the final name. A path that exists and is not a
/// regular file (`/dev/stdout`, a pipe) is written directly.
fn write_replacing(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return std::fs::write(path, bytes);
    }
    let name = path.file_name().ok_or_else(|| std::io::Error::other("not a file name"))?;
    let mut temporary = name.to_os_string();
    temporary.push(format!(".{}.partial", std::process::id()));
    let temporary = path.with_file_name(format!(".{}", temporary.to_string_lossy()));
    let written = std::fs::write(&temporary, bytes).and_then(|()| std::fs::rename(&temporary, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    /// Inverts each image, and records the batches it was given.
    struct Invert {
        batches: Vec<Vec<(u32, u32)>>,
    }

    impl Network for Invert {
        fn run(&mut self, images: &[&DecodedImage]) -> Result<Vec<DynamicImage>, String> {
            self.batches.push(images.iter().map(|i| (i.width(), i.height())).collect());
            if images.iter().any(|i| i.rgb.get_pixel(0, 0).0 == [7, 7, 7]) {
                panic!("a poisoned pixel");
            }
            Ok(images
                .iter()
                .map(|i| {
                    let mut rgb = i.rgb.clone();
                    image::imageops::invert(&mut rgb);
                    DynamicImage::ImageRgb8(rgb)
                })
                .collect())
        }

        fn batch_limit(&self, size: (u32, u32), most: usize) -> usize {
            if size.0 > 100 {
                1
            } else {
                most
            }
        }
    }

    #[test]
    fn every_job_is_written_or_reported_and_same_sizes_share_batches() {
        let dir = tempfile::tempdir().unwrap();
        let mut jobs = Vec::new();
        let mut add = |name: &str, bytes: Vec<u8>| {
            let input = dir.path().join(name);
            std::fs::write(&input, bytes).unwrap();
            jobs.push(Job { input, output: dir.path().join(format!("{name}.out.png")) });
        };
        let png = |w: u32, h: u32, level: u8| {
            let mut bytes = Vec::new();
            RgbImage::from_pixel(w, h, Rgb([level; 3]))
                .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
                .unwrap();
            bytes
        };
        // 10×10 and 11×12 both run at 12×12; 13×9 runs at 16×12.
        add("a", png(10, 10, 1));
        add("b", png(13, 9, 2));
        add("c", png(11, 12, 3));
        add("broken", b"not an image".to_vec());
        add("d", png(10, 10, 4));
        add("poisoned", png(16, 8, 7));
        add("wide1", png(101, 8, 5));
        add("wide2", png(101, 8, 6));
        jobs.push(Job { input: dir.path().join("missing.png"), output: dir.path().join("missing.out.png") });

        let settings = Settings {
            decode: DecodeOptions::default(),
            format: OutputFormat::Png,
            batch_size: 8,
            threads: 2,
        };
        let mut network = Invert { batches: Vec::new() };
        let finished = AtomicUsize::new(0);
        let report = run(&jobs, &settings, &mut network, &|_| {
            finished.fetch_add(1, Ordering::Relaxed);
        });

        assert_eq!(finished.into_inner(), jobs.len());
        let failed: Vec<&str> =
            report.failures.iter().map(|f| f.input.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(failed, ["broken", "poisoned", "missing.png"], "{:?}", report.failures);
        assert!(report.failures[0].reason.contains("not a supported image"), "{:?}", report.failures);
        assert!(report.failures[1].reason.contains("a poisoned pixel"), "{:?}", report.failures);
        assert!(report.failures[2].reason.starts_with("cannot read"), "{:?}", report.failures);
        assert_eq!(report.written, 6);
        for (name, level) in [("a", 1u8), ("b", 2), ("c", 3), ("d", 4), ("wide1", 5), ("wide2", 6)] {
            let out = image::open(dir.path().join(format!("{name}.out.png"))).unwrap().to_rgb8();
            assert!(out.pixels().all(|p| p.0 == [255 - level; 3]), "{name}");
        }
        // Each padded size in one batch, except the wide ones, one at a time by their limit.
        let mut batches = network.batches;
        batches.iter_mut().for_each(|b| b.sort());
        batches.sort();
        assert_eq!(
            batches,
            [
                vec![(10, 10), (10, 10), (11, 12)],
                vec![(13, 9)],
                vec![(16, 8)],
                vec![(101, 8)],
                vec![(101, 8)]
            ]
        );
        assert_eq!(report.batches, 5);
        // No temporary file is left beside the results.
        let leftovers = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".partial"))
            .count();
        assert_eq!(leftovers, 0);
    }
}
