//! The engine driven directly, with real images and many concurrent callers.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::Device;
use common::*;
use cycleserve::engine::catalog::{load_model, ModelInfo};
use cycleserve::engine::codec::{self, DecodeOptions, DecodedImage, ImageError, OutputFormat};
use cycleserve::engine::observer::{Observer, Outcome};
use cycleserve::engine::worker::{BatchRunner, RunnerFactory};
use cycleserve::engine::{run_batch, Engine, EngineConfig, EngineError, Target};
use cycleserve::model::{Direction, Model};
use image::DynamicImage;

/// Records every event, for assertions.
#[derive(Default)]
struct Recorder {
    batches: Mutex<Vec<usize>>,
    outcomes: Mutex<Vec<Outcome>>,
}

impl Observer for Recorder {
    fn batch(&self, _: &str, _: Direction, size: usize, _: Duration) {
        self.batches.lock().unwrap().push(size);
    }
    fn outcome(&self, outcome: Outcome) {
        self.outcomes.lock().unwrap().push(outcome);
    }
}

impl Recorder {
    fn count(&self, outcome: Outcome) -> usize {
        self.outcomes.lock().unwrap().iter().filter(|o| **o == outcome).count()
    }
}

/// The golden upsample generator, both directions, as a model file in `dir`.
fn model_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tiny.safetensors");
    import_golden(&path, Directions::Both);
    path
}

fn bytes_of(name: &str) -> Bytes {
    Bytes::from(std::fs::read(fixture(name)).unwrap())
}

fn real_engine(dir: &Path, config: EngineConfig, observer: Arc<Recorder>) -> Engine {
    let loaded = load_model(&model_file(dir)).unwrap();
    Engine::new(vec![loaded], vec![Device::Cpu], config, observer)
}

async fn wait_ready(engine: &Engine) {
    let started = Instant::now();
    while !engine.is_ready() {
        assert!(started.elapsed() < Duration::from_secs(30), "engine never became ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_get_byte_identical_results_in_real_batches() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Arc::new(Recorder::default());
    let config =
        EngineConfig { max_batch_size: 4, max_batch_delay: Duration::from_millis(50), ..Default::default() };
    let engine = Arc::new(real_engine(dir.path(), config, recorder.clone()));
    wait_ready(&engine).await;

    // Three padded sizes, RGB, RGBA-from-gray and JPEG input, both directions.
    let inputs = ["photo_256x256.png", "photo_250x198.png", "gray_alpha.png", "exif_rotated.jpg"];
    let mut tasks = Vec::new();
    for i in 0..24 {
        let engine = Arc::clone(&engine);
        let name = inputs[i % inputs.len()];
        let direction = if i % 3 == 0 { "y2x" } else { "photo2painting" };
        tasks.push(tokio::spawn(async move {
            let target = engine.resolve(None, direction).unwrap();
            (name, target, engine.translate(target, bytes_of(name), OutputFormat::Png).await.unwrap())
        }));
    }
    let model = Model::load(&model_file(dir.path()), &Device::Cpu).unwrap();
    for task in tasks {
        let (name, target, result) = task.await.unwrap();
        let input = codec::decode(&bytes_of(name), &DecodeOptions::default()).unwrap();
        let alone = run_batch(&model, target.direction, &[&input], &Device::Cpu).unwrap().remove(0);
        let served = image::load_from_memory(&result.bytes).unwrap();
        assert_eq!(served.as_bytes(), alone.as_bytes(), "{name}: batched result differs from unbatched");
        assert_eq!((result.width, result.height), (input.width(), input.height()));
    }
    let batches = recorder.batches.lock().unwrap().clone();
    assert_eq!(batches.iter().sum::<usize>(), 24, "every request computed once");
    assert!(batches.iter().any(|&b| b > 1), "batches of more than one formed: {batches:?}");
    assert!(batches.iter().all(|&b| b <= 4), "max batch size respected: {batches:?}");
    assert_eq!(recorder.count(Outcome::Ok), 24);
}

/// Returns its inputs after `delay`, counting images; fails its first batch when asked.
struct TestRunner {
    delay: Duration,
    computed: Arc<AtomicUsize>,
    panic_on_first: bool,
}

impl BatchRunner for TestRunner {
    fn run(&mut self, _: usize, _: Direction, images: &[&DecodedImage]) -> Result<Vec<DynamicImage>, String> {
        if std::mem::take(&mut self.panic_on_first) {
            panic!("deliberate failure");
        }
        std::thread::sleep(self.delay);
        self.computed.fetch_add(images.len(), Ordering::SeqCst);
        Ok(images.iter().map(|i| DynamicImage::ImageRgb8(i.rgb.clone())).collect())
    }
}

fn test_engine(
    dir: &Path,
    config: EngineConfig,
    delay: Duration,
    panic_on_first: bool,
) -> (Arc<Engine>, Arc<Recorder>, Arc<AtomicUsize>) {
    let (info, _): (ModelInfo, _) = load_model(&model_file(dir)).unwrap();
    let computed = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&computed);
    let factory: RunnerFactory = Box::new(move || {
        Ok(Box::new(TestRunner { delay, computed: counter, panic_on_first }) as Box<dyn BatchRunner>)
    });
    let recorder = Arc::new(Recorder::default());
    let engine = Engine::with_runners(vec![info], vec![factory], config, recorder.clone());
    (Arc::new(engine), recorder, computed)
}

fn x2y() -> Target {
    Target { model: 0, direction: Direction::XtoY }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_refuses_at_once_and_frees_up_after() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig { max_batch_size: 1, queue_capacity: 2, ..Default::default() };
    let (engine, recorder, _) = test_engine(dir.path(), config, Duration::from_millis(400), false);
    wait_ready(&engine).await;
    let spawn = |engine: &Arc<Engine>| {
        let engine = Arc::clone(engine);
        tokio::spawn(async move { engine.translate(x2y(), bytes_of("gray16.png"), OutputFormat::Png).await })
    };
    let first = spawn(&engine);
    tokio::time::sleep(Duration::from_millis(100)).await; // computing: its slot is free again
    let queued = [spawn(&engine), spawn(&engine)];
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let refused = engine.translate(x2y(), bytes_of("gray16.png"), OutputFormat::Png).await;
    assert!(matches!(refused, Err(EngineError::Overloaded)), "{refused:?}");
    assert!(started.elapsed() < Duration::from_millis(50), "refused at once, not after a wait");
    assert!(first.await.unwrap().is_ok());
    for q in queued {
        assert!(q.await.unwrap().is_ok());
    }
    assert!(engine.translate(x2y(), bytes_of("gray16.png"), OutputFormat::Png).await.is_ok());
    assert_eq!(recorder.count(Outcome::Overloaded), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_departed_caller_is_not_computed_and_deadlines_hold() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        EngineConfig { max_batch_size: 1, request_timeout: Duration::from_millis(450), ..Default::default() };
    let (engine, recorder, computed) = test_engine(dir.path(), config, Duration::from_millis(300), false);
    wait_ready(&engine).await;
    let spawn = |engine: &Arc<Engine>| {
        let engine = Arc::clone(engine);
        tokio::spawn(async move { engine.translate(x2y(), bytes_of("gray16.png"), OutputFormat::Png).await })
    };
    let busy = spawn(&engine);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let departing = spawn(&engine);
    tokio::time::sleep(Duration::from_millis(50)).await;
    departing.abort();
    assert!(busy.await.unwrap().is_ok());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(computed.load(Ordering::SeqCst), 1, "the departed caller's image never reached the network");
    assert_eq!(recorder.count(Outcome::Dropped), 1);

    // Three at once through a 300 ms network with a 450 ms deadline, one at a time: the first
    // finishes at 300 ms; the second is computing when its deadline passes; the third's deadline
    // passes while it waits, so it is never computed.
    let results: Vec<_> = [spawn(&engine), spawn(&engine), spawn(&engine)].into_iter().collect();
    let mut timed_out = 0;
    for r in results {
        if matches!(r.await.unwrap(), Err(EngineError::TimedOut)) {
            timed_out += 1;
        }
    }
    assert_eq!(timed_out, 2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(computed.load(Ordering::SeqCst), 3, "the request that expired in the queue was not computed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_batch_fails_alone_and_bad_images_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        decode: DecodeOptions { max_pixels: 1 << 20, ..Default::default() },
        ..Default::default()
    };
    let (engine, recorder, _) = test_engine(dir.path(), config, Duration::ZERO, true);
    wait_ready(&engine).await;
    let failed = engine.translate(x2y(), bytes_of("gray16.png"), OutputFormat::Png).await;
    assert!(
        matches!(&failed, Err(EngineError::Internal(m)) if m.contains("deliberate failure")),
        "{failed:?}"
    );
    assert!(engine.translate(x2y(), bytes_of("gray16.png"), OutputFormat::Png).await.is_ok());

    let png = std::fs::read(fixture("photo_250x198.png")).unwrap();
    let truncated =
        engine.translate(x2y(), Bytes::from(png[..png.len() / 3].to_vec()), OutputFormat::Png).await;
    assert!(matches!(truncated, Err(EngineError::Image(ImageError::Corrupt(_)))), "{truncated:?}");
    let mut bomb = image::GrayImage::new(4000, 4000);
    bomb.put_pixel(0, 0, image::Luma([1]));
    let mut encoded = Vec::new();
    bomb.write_to(&mut std::io::Cursor::new(&mut encoded), image::ImageFormat::Png).unwrap();
    assert!(encoded.len() < 100_000, "16 Mpixel PNG compresses to {} bytes", encoded.len());
    let refused = engine.translate(x2y(), Bytes::from(encoded), OutputFormat::Png).await;
    assert!(
        matches!(
            refused,
            Err(EngineError::Image(ImageError::TooManyPixels { width: 4000, height: 4000, .. }))
        ),
        "{refused:?}"
    );
    assert!(engine.translate(x2y(), bytes_of("photo_250x198.png"), OutputFormat::Jpeg).await.is_ok());
    assert_eq!(recorder.count(Outcome::Internal), 1);
    assert_eq!(recorder.count(Outcome::BadImage), 2);
    assert_eq!(recorder.count(Outcome::Ok), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_finishes_what_is_queued_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        max_batch_size: 2,
        decode: DecodeOptions { max_side: Some(64), ..Default::default() },
        ..Default::default()
    };
    let (engine, _, computed) = test_engine(dir.path(), config, Duration::from_millis(100), false);
    wait_ready(&engine).await;
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let engine = Arc::clone(&engine);
            tokio::spawn(async move {
                engine.translate(x2y(), bytes_of("photo_250x198.png"), OutputFormat::Png).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    engine.shutdown().await;
    for task in tasks {
        let done = task.await.unwrap().unwrap();
        assert_eq!(done.downscaled_from, Some((250, 198)));
        assert_eq!((done.width, done.height), (64, 51));
    }
    assert_eq!(computed.load(Ordering::SeqCst), 5);
    assert!(!engine.is_ready());
    let late = engine.translate(x2y(), bytes_of("gray16.png"), OutputFormat::Png).await;
    assert!(matches!(late, Err(EngineError::ShuttingDown)), "{late:?}");
}

#[test]
fn requests_name_models_and_directions_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _, _) = test_engine(dir.path(), EngineConfig::default(), Duration::ZERO, false);
    assert_eq!(engine.resolve(Some("tiny"), "painting2photo").unwrap().direction, Direction::YtoX);
    let err = engine.resolve(Some("huge"), "x2y").unwrap_err().to_string();
    assert_eq!(err, "no model named `huge`; loaded: tiny");
    let err = engine.resolve(None, "up").unwrap_err().to_string();
    assert!(err.contains("expected x2y, y2x, photo2painting or painting2photo"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_load_reports_why() {
    let dir = tempfile::tempdir().unwrap();
    let (info, _) = load_model(&model_file(dir.path())).unwrap();
    let factory: RunnerFactory = Box::new(|| Err("out of device memory".to_string()));
    let engine = Engine::with_runners(
        vec![info],
        vec![factory],
        EngineConfig::default(),
        Arc::new(Recorder::default()),
    );
    let started = Instant::now();
    while engine.failed_worker().is_none() {
        assert!(started.elapsed() < Duration::from_secs(10), "the failure was never reported");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(engine.failed_worker().unwrap(), "an inference worker could not start: out of device memory");
    assert!(!engine.is_ready());
}
