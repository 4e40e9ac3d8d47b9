//! The engine driven directly, with real images and many concurrent callers.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::Device;
use common::*;
use cycleserve::engine::catalog::load_model;
use cycleserve::engine::codec::{self, DecodeOptions, DecodedImage, ImageError, OutputFormat};
use cycleserve::engine::observer::{Observer, Outcome};
use cycleserve::engine::worker::{BatchRunner, RunnerFactory};
use cycleserve::engine::{run_batch, Engine, EngineConfig, EngineError, Target, Translation};
use cycleserve::model::{Direction, Executor, Model, ModelFile};
use image::DynamicImage;

/// Records every event, for assertions.
#[derive(Default)]
struct Recorder {
    batches: Mutex<Vec<usize>>,
    outcomes: Mutex<Vec<Outcome>>,
    decoded: AtomicUsize,
}

impl Observer for Recorder {
    fn batch(&self, _: &str, _: Direction, size: usize, _: Duration) {
        self.batches.lock().unwrap().push(size);
    }
    fn decoded(&self, _: Duration) {
        self.decoded.fetch_add(1, Ordering::SeqCst);
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
    Engine::new(vec![loaded], vec![Device::Cpu], Executor::FastCpu, config, observer)
}

async fn wait_ready(engine: &Engine) {
    until("the engine ready", || engine.is_ready()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_get_byte_identical_results_in_real_batches() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = Arc::new(Recorder::default());
    // A batch closes when full or after 5 s: long enough that all 24 callers are queued first,
    // so batches form whatever the machine's load.
    let config =
        EngineConfig { max_batch_size: 4, max_batch_delay: Duration::from_secs(5), ..Default::default() };
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
            (name, target.clone(), submit(&engine, target, bytes_of(name)).await.unwrap())
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

/// Admits and translates one image, as the HTTP handler does.
async fn submit(engine: &Engine, target: Target, bytes: Bytes) -> Result<Translation, EngineError> {
    let ticket = engine.admit(bytes.len() as u64)?;
    engine.translate(ticket, target, bytes, OutputFormat::Png).await
}

/// Lets the test decide when each batch may finish, and tells it when one has started: tests
/// wait for states, never for time.
#[derive(Clone)]
struct Gate {
    started: Arc<AtomicUsize>,
    opened: Arc<(Mutex<usize>, Condvar)>,
}

impl Gate {
    fn new(open: bool) -> Self {
        let opened = if open { usize::MAX } else { 0 };
        Self { started: Arc::default(), opened: Arc::new((Mutex::new(opened), Condvar::new())) }
    }

    /// Lets `n` more batches finish.
    fn open(&self, n: usize) {
        let (count, changed) = &*self.opened;
        let mut count = count.lock().unwrap();
        *count = count.saturating_add(n);
        changed.notify_all();
    }

    /// Waits until `n` batches have started.
    async fn wait_started(&self, n: usize) {
        until("a batch started", || self.started.load(Ordering::SeqCst) >= n).await;
    }

    /// Called by the runner: counts the batch as started, then waits for the gate.
    fn pass(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
        let (count, changed) = &*self.opened;
        let mut count = changed.wait_while(count.lock().unwrap(), |c| *c == 0).unwrap();
        *count -= 1;
    }
}

/// Returns its inputs once the gate lets it, counting images; fails its first batch when asked.
struct TestRunner {
    gate: Gate,
    computed: Arc<AtomicUsize>,
    panic_on_first: bool,
}

impl BatchRunner for TestRunner {
    fn load(&mut self, _: u64, _: ModelFile) -> Result<(), String> {
        Ok(())
    }
    fn unload(&mut self, _: u64) {}
    fn run(&mut self, _: u64, _: Direction, images: &[&DecodedImage]) -> Result<Vec<DynamicImage>, String> {
        if std::mem::take(&mut self.panic_on_first) {
            panic!("deliberate failure");
        }
        self.gate.pass();
        self.computed.fetch_add(images.len(), Ordering::SeqCst);
        Ok(images.iter().map(|i| DynamicImage::ImageRgb8(i.rgb.clone())).collect())
    }
}

fn test_engine(
    dir: &Path,
    config: EngineConfig,
    gate: Gate,
    panic_on_first: bool,
) -> (Arc<Engine>, Arc<Recorder>, Arc<AtomicUsize>) {
    let loaded = load_model(&model_file(dir)).unwrap();
    let computed = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&computed);
    let factory: RunnerFactory = Box::new(move || {
        Ok(Box::new(TestRunner { gate, computed: counter, panic_on_first }) as Box<dyn BatchRunner>)
    });
    let recorder = Arc::new(Recorder::default());
    let engine =
        Engine::with_runners(vec![loaded], Executor::FastCpu, vec![factory], config, recorder.clone());
    (Arc::new(engine), recorder, computed)
}

fn x2y(engine: &Engine) -> Target {
    engine.resolve(None, "x2y").unwrap()
}

/// Polls a condition on the engine's state (not on time): up to a minute, then fails.
async fn until(what: &str, condition: impl Fn() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < Duration::from_secs(60), "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn spawn_x2y(
    engine: &Arc<Engine>,
    name: &'static str,
) -> tokio::task::JoinHandle<Result<Translation, EngineError>> {
    let engine = Arc::clone(engine);
    tokio::spawn(async move { submit(&engine, x2y(&engine), bytes_of(name)).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_refuses_at_once_and_frees_up_after() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig { max_batch_size: 1, queue_capacity: 2, ..Default::default() };
    let gate = Gate::new(false);
    let (engine, recorder, _) = test_engine(dir.path(), config, gate.clone(), false);
    wait_ready(&engine).await;
    let first = spawn_x2y(&engine, "gray16.png");
    gate.wait_started(1).await; // computing: its slot is free again
    let queued = [spawn_x2y(&engine, "gray16.png"), spawn_x2y(&engine, "gray16.png")];
    until("two requests queued", || engine.queue_depth() == 2).await;
    // Admission takes no await: a full queue is refused at once.
    let refused = engine.admit(1000);
    assert!(matches!(refused, Err(EngineError::Overloaded)), "{:?}", refused.err());
    gate.open(3);
    assert!(first.await.unwrap().is_ok());
    for q in queued {
        assert!(q.await.unwrap().is_ok());
    }
    gate.open(1);
    assert!(submit(&engine, x2y(&engine), bytes_of("gray16.png")).await.is_ok());
    assert_eq!(recorder.count(Outcome::Overloaded), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_departed_caller_is_not_computed_and_deadlines_hold() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        EngineConfig { max_batch_size: 1, request_timeout: Duration::from_secs(3), ..Default::default() };
    let gate = Gate::new(false);
    let (engine, recorder, computed) = test_engine(dir.path(), config, gate.clone(), false);
    wait_ready(&engine).await;
    let busy = spawn_x2y(&engine, "gray16.png");
    gate.wait_started(1).await;
    let departing = spawn_x2y(&engine, "gray16.png");
    // Once decoded it is queued (no await lies between the two).
    until("the second request decoded", || recorder.decoded.load(Ordering::SeqCst) == 2).await;
    departing.abort();
    // Aborting only asks; awaiting the handle makes sure the caller is gone.
    assert!(departing.await.unwrap_err().is_cancelled());
    gate.open(1);
    assert!(busy.await.unwrap().is_ok());
    until("the departed request purged", || recorder.count(Outcome::Dropped) == 1).await;
    assert_eq!(computed.load(Ordering::SeqCst), 1, "the departed caller's image never reached the network");

    // One request computing and one queued when their deadlines pass: both time out; the
    // queued one is never computed.
    let computing = spawn_x2y(&engine, "gray16.png");
    gate.wait_started(2).await;
    let waiting = spawn_x2y(&engine, "gray16.png");
    assert!(matches!(computing.await.unwrap(), Err(EngineError::TimedOut)));
    assert!(matches!(waiting.await.unwrap(), Err(EngineError::TimedOut)));
    gate.open(usize::MAX);
    until("the expired request purged", || engine.queue_depth() == 0).await;
    assert_eq!(computed.load(Ordering::SeqCst), 2, "the request that expired in the queue was not computed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_batch_fails_alone_and_bad_images_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        decode: DecodeOptions { max_pixels: 1 << 20, ..Default::default() },
        ..Default::default()
    };
    let (engine, recorder, _) = test_engine(dir.path(), config, Gate::new(true), true);
    wait_ready(&engine).await;
    let failed = submit(&engine, x2y(&engine), bytes_of("gray16.png")).await;
    assert!(
        matches!(&failed, Err(EngineError::Internal(m)) if m.contains("deliberate failure")),
        "{failed:?}"
    );
    assert!(submit(&engine, x2y(&engine), bytes_of("gray16.png")).await.is_ok());

    let png = std::fs::read(fixture("photo_250x198.png")).unwrap();
    let truncated = submit(&engine, x2y(&engine), Bytes::from(png[..png.len() / 3].to_vec())).await;
    assert!(matches!(truncated, Err(EngineError::Image(ImageError::Corrupt(_)))), "{truncated:?}");
    let mut bomb = image::GrayImage::new(4000, 4000);
    bomb.put_pixel(0, 0, image::Luma([1]));
    let mut encoded = Vec::new();
    bomb.write_to(&mut std::io::Cursor::new(&mut encoded), image::ImageFormat::Png).unwrap();
    assert!(encoded.len() < 100_000, "16 Mpixel PNG compresses to {} bytes", encoded.len());
    let refused = submit(&engine, x2y(&engine), Bytes::from(encoded)).await;
    assert!(
        matches!(
            refused,
            Err(EngineError::Image(ImageError::TooManyPixels { width: 4000, height: 4000, .. }))
        ),
        "{refused:?}"
    );
    assert!(submit(&engine, x2y(&engine), bytes_of("photo_250x198.png")).await.is_ok());
    assert_eq!(recorder.count(Outcome::Internal), 1);
    assert_eq!(recorder.count(Outcome::BadImage), 1);
    assert_eq!(recorder.count(Outcome::TooLarge), 1);
    assert_eq!(recorder.count(Outcome::Ok), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_finishes_what_is_admitted_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        max_batch_size: 2,
        decode: DecodeOptions { max_side: Some(64), ..Default::default() },
        ..Default::default()
    };
    let gate = Gate::new(false);
    let (engine, _, computed) = test_engine(dir.path(), config, gate.clone(), false);
    wait_ready(&engine).await;
    let bytes = bytes_of("photo_250x198.png");
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let ticket = engine.admit(bytes.len() as u64).unwrap();
            let (engine, bytes) = (Arc::clone(&engine), bytes.clone());
            tokio::spawn(
                async move { engine.translate(ticket, x2y(&engine), bytes, OutputFormat::Png).await },
            )
        })
        .collect();
    gate.wait_started(1).await;
    engine.begin_shutdown();
    assert!(matches!(engine.admit(10), Err(EngineError::ShuttingDown)));
    gate.open(usize::MAX);
    engine.shutdown().await;
    for task in tasks {
        let done = task.await.unwrap().unwrap();
        assert_eq!(done.downscaled_from, Some((250, 198)));
        assert_eq!((done.width, done.height), (64, 51));
    }
    assert_eq!(computed.load(Ordering::SeqCst), 5);
    assert!(!engine.is_ready());
}

#[test]
fn requests_name_models_and_directions_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _, _) = test_engine(dir.path(), EngineConfig::default(), Gate::new(true), false);
    assert_eq!(engine.resolve(Some("tiny"), "painting2photo").unwrap().direction, Direction::YtoX);
    let err = engine.resolve(Some("huge"), "x2y").unwrap_err().to_string();
    assert_eq!(err, "no model named `huge`; loaded: tiny");
    let err = engine.resolve(None, "up").unwrap_err().to_string();
    assert!(err.contains("expected x2y, y2x, photo2painting or painting2photo"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_load_reports_why() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = load_model(&model_file(dir.path())).unwrap();
    let factory: RunnerFactory = Box::new(|| Err("out of device memory".to_string()));
    let engine = Engine::with_runners(
        vec![loaded],
        Executor::FastCpu,
        vec![factory],
        EngineConfig::default(),
        Arc::new(Recorder::default()),
    );
    until("the failure reported", || engine.failed_worker().is_some()).await;
    assert_eq!(engine.failed_worker().unwrap(), "an inference worker could not start: out of device memory");
    assert!(!engine.is_ready());
}
