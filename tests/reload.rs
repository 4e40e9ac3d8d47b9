//! Models added, replaced and removed while serving: first the engine with a runner that
//! records what it is told, then a real server under load from concurrent clients.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::Device;
use common::server::Server;
use common::*;
use cycleserve::engine::catalog::{load_models_dir, sha256_hex};
use cycleserve::engine::codec::{self, DecodeOptions, DecodedImage, ImageHeader, OutputFormat};
use cycleserve::engine::footprint::MemoryModel;
use cycleserve::engine::reload::{Reloader, Trigger};
use cycleserve::engine::worker::{BatchRunner, RunnerFactory};
use cycleserve::engine::{run_batch, Engine, EngineConfig, EngineError, Target};
use cycleserve::model::{Direction, Domains, Executor, Model, ModelFile, Precision, WeightStorage};
use image::DynamicImage;
use reqwest::header::CONTENT_TYPE;
use reqwest::Client;

/// Polls a condition (not time): up to two minutes, then fails.
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < Duration::from_secs(120), "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The same, for conditions that take a request to check.
async fn until_async<F: std::future::Future<Output = bool>>(what: &str, mut condition: impl FnMut() -> F) {
    let started = Instant::now();
    while !condition().await {
        assert!(started.elapsed() < Duration::from_secs(120), "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Three small, different networks (ngf 8), both directions, as `photo,painting` model files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Weights {
    Upsample,
    Transpose,
    TransposeAffine,
}

/// Writes `weights` as a model file at `out`.
fn write_model(weights: Weights, out: &Path) {
    let pth = golden(match weights {
        Weights::Upsample => "generator_upsample.pth",
        Weights::Transpose => "generator_transpose.pth",
        Weights::TransposeAffine => "generator_transpose_affine.pth",
    });
    let domains = Domains::parse("photo,painting").unwrap();
    cycleserve::model::import::import(&pth, Some(&pth), domains, out, WeightStorage::F32).unwrap();
}

/// Puts `content` at `path` the way operators should: a hidden temporary name, then a rename, so
/// a rescan never reads half a file.
fn place(content: &[u8], path: &Path) {
    let tmp = path.with_file_name(format!(".{}.partial", path.file_name().unwrap().to_string_lossy()));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn sha(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).unwrap())
}

// ---- The engine, with a runner that records what it is told -------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    Load(u64),
    Unload(u64),
    Run(u64),
}

/// Echoes its inputs, recording loads, unloads and runs; refuses loads while `refuse` is set.
struct RecordingRunner {
    events: Arc<Mutex<Vec<Event>>>,
    refuse: Arc<AtomicBool>,
}

impl BatchRunner for RecordingRunner {
    fn load(&mut self, version: u64, _: ModelFile) -> Result<(), String> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err("the device is out of memory".into());
        }
        self.events.lock().unwrap().push(Event::Load(version));
        Ok(())
    }
    fn unload(&mut self, version: u64) {
        self.events.lock().unwrap().push(Event::Unload(version));
    }
    fn run(
        &mut self,
        version: u64,
        _: Direction,
        images: &[&DecodedImage],
    ) -> Result<Vec<DynamicImage>, String> {
        self.events.lock().unwrap().push(Event::Run(version));
        Ok(images.iter().map(|i| DynamicImage::ImageRgb8(i.rgb.clone())).collect())
    }
}

struct Recorded {
    engine: Arc<Engine>,
    reloader: Reloader,
    /// One list per worker.
    events: Vec<Arc<Mutex<Vec<Event>>>>,
    /// Makes the second worker refuse loads.
    refuse: Arc<AtomicBool>,
}

impl Recorded {
    /// An engine with two recording workers over the models in `dir`.
    async fn start(dir: &Path) -> Self {
        Self::with_config(dir, EngineConfig::default()).await
    }

    async fn with_config(dir: &Path, config: EngineConfig) -> Self {
        let refuse = Arc::new(AtomicBool::new(false));
        let events: Vec<Arc<Mutex<Vec<Event>>>> = (0..2).map(|_| Arc::default()).collect();
        let factories: Vec<RunnerFactory> = events
            .iter()
            .enumerate()
            .map(|(worker, events)| {
                let refuse = if worker == 1 { Arc::clone(&refuse) } else { Arc::default() };
                let runner = RecordingRunner { events: Arc::clone(events), refuse };
                Box::new(move || Ok(Box::new(runner) as Box<dyn BatchRunner>)) as RunnerFactory
            })
            .collect();
        let models = load_models_dir(dir).unwrap();
        let observer = Arc::new(cycleserve::engine::observer::NoopObserver);
        let engine = Engine::with_runners(models, Executor::FastCpu, factories, config, observer);
        let engine = Arc::new(engine);
        until("the engine ready", || engine.is_ready()).await;
        let reloader = Reloader::new(Arc::clone(&engine), dir.to_path_buf());
        Self { engine, reloader, events, refuse }
    }

    /// Whether every worker has recorded `event`.
    fn all_saw(&self, event: &Event) -> bool {
        self.events.iter().all(|e| e.lock().unwrap().contains(event))
    }

    fn saw_any(&self, event: &Event) -> bool {
        self.events.iter().any(|e| e.lock().unwrap().contains(event))
    }

    async fn translate(&self, target: Target) -> Result<cycleserve::engine::Translation, EngineError> {
        let bytes = Bytes::from(std::fs::read(fixture("gray16.png")).unwrap());
        let ticket = self.engine.admit(bytes.len() as u64)?;
        self.engine.translate(ticket, target, bytes, OutputFormat::Png).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_swapped_or_removed_version_finishes_the_requests_holding_it_and_only_then_unloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.safetensors");
    write_model(Weights::Upsample, &path);
    let recorded = Recorded::start(dir.path()).await;
    let engine = &recorded.engine;
    let first = engine.resolve(Some("tiny"), "x2y").unwrap();
    assert!(recorded.all_saw(&Event::Load(first.model.id)), "first models load before readiness");
    assert_eq!(recorded.reloader.rescan(Trigger::Poll).await, Default::default(), "nothing changed yet");

    // A request resolved (its body still arriving, say) when the file is replaced.
    let in_flight = first.clone();
    write_model(Weights::Transpose, &path);
    let rescan = recorded.reloader.rescan(Trigger::Poll).await;
    assert_eq!(rescan.replaced, ["tiny"]);
    let second = engine.resolve(Some("tiny"), "x2y").unwrap();
    assert_ne!(second.model.id, first.model.id);
    assert_eq!(second.model.info.sha256, sha(&path));
    assert!(recorded.all_saw(&Event::Load(second.model.id)), "loaded everywhere before it is routed to");
    // Each version's requests are costed by its own architecture.
    assert_eq!(first.model.memory.architecture.n_blocks, 2);
    assert_eq!(second.model.memory.architecture, second.model.info.metadata.architecture);
    assert_eq!(second.model.memory.architecture.n_blocks, 3);
    drop(second);
    assert_eq!(engine.versions_in_memory(), 2);
    drop(first);
    assert!(!recorded.saw_any(&Event::Unload(in_flight.model.id)), "a request still holds the old version");

    // The old version computes the request that holds it; then it is unloaded everywhere.
    let old_id = in_flight.model.id;
    recorded.translate(in_flight).await.unwrap();
    until("the old version unloaded", || recorded.all_saw(&Event::Unload(old_id))).await;
    assert_eq!(engine.versions_in_memory(), 1);
    for events in &recorded.events {
        let events = events.lock().unwrap();
        let ran = events.iter().position(|e| *e == Event::Run(old_id));
        let unloaded = events.iter().position(|e| *e == Event::Unload(old_id)).unwrap();
        assert!(ran.is_none_or(|ran| ran < unloaded), "ran after its unload: {events:?}");
    }
    assert!(recorded.saw_any(&Event::Run(old_id)));

    // Removal: new requests are refused at once, the one holding the version still finishes.
    let held = engine.resolve(Some("tiny"), "x2y").unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(recorded.reloader.rescan(Trigger::Poll).await.removed, ["tiny"]);
    let refused = engine.resolve(Some("tiny"), "x2y").unwrap_err();
    assert!(matches!(refused, EngineError::UnknownModel { .. }), "{refused:?}");
    assert!(!engine.is_ready(), "no model left to serve");
    let held_id = held.model.id;
    recorded.translate(held).await.unwrap();
    until("the removed version unloaded", || recorded.all_saw(&Event::Unload(held_id))).await;
    assert_eq!(engine.versions_in_memory(), 0);

    // Added back: routed to once loaded, and ready again.
    write_model(Weights::Upsample, &path);
    assert_eq!(recorded.reloader.rescan(Trigger::Poll).await.added, ["tiny"]);
    assert!(engine.is_ready());
    let again = engine.resolve(None, "x2y").unwrap();
    assert!(recorded.all_saw(&Event::Load(again.model.id)));
    recorded.translate(again).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_that_fails_to_load_leaves_the_old_version_and_is_retried_only_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.safetensors");
    write_model(Weights::Upsample, &path);
    let recorded = Recorded::start(dir.path()).await;
    let engine = &recorded.engine;
    let serving = sha(&path);

    // Not a model file: the old version serves on.
    let staged = dir.path().join("staged");
    write_model(Weights::Transpose, &staged);
    let good = std::fs::read(&staged).unwrap();
    place(&good[..good.len() / 2], &path);
    let rescan = recorded.reloader.rescan(Trigger::Poll).await;
    assert_eq!(rescan.failed, ["tiny"]);
    let failure = engine.load_failure("tiny").expect("the failure is recorded");
    assert_eq!(failure.sha256.as_deref(), Some(sha(&path).as_str()));
    assert_eq!(failure.file, "tiny.safetensors");
    assert!(failure.error.contains("truncated"), "{}", failure.error);
    assert_eq!(engine.resolve(None, "x2y").unwrap().model.info.sha256, serving);
    assert!(engine.is_ready());

    // Polling does not retry the same content; SIGHUP does.
    assert_eq!(recorded.reloader.rescan(Trigger::Poll).await, Default::default());
    assert_eq!(recorded.reloader.rescan(Trigger::Signal).await.failed, ["tiny"]);

    // A file that parses but that one worker cannot load fails the same way, and the worker
    // that did load it drops it.
    recorded.refuse.store(true, Ordering::SeqCst);
    place(&good, &path);
    assert_eq!(recorded.reloader.rescan(Trigger::Poll).await.failed, ["tiny"]);
    let failure = engine.load_failure("tiny").unwrap();
    assert!(failure.error.contains("out of memory"), "{}", failure.error);
    assert!(!failure.error.contains(&*dir.path().to_string_lossy()), "no server paths: {}", failure.error);
    assert_eq!(engine.resolve(None, "x2y").unwrap().model.info.sha256, serving);
    let loaded = recorded.events[0].lock().unwrap().iter().rev().find_map(|e| match e {
        Event::Load(id) => Some(*id),
        _ => None,
    });
    let loaded = loaded.expect("the first worker loaded the new version");
    until("the failed version unloaded", || recorded.all_saw(&Event::Unload(loaded))).await;
    assert_eq!(engine.versions_in_memory(), 1);

    // Once it loads, it replaces the old version and the failure is cleared.
    recorded.refuse.store(false, Ordering::SeqCst);
    assert_eq!(recorded.reloader.rescan(Trigger::Signal).await.replaced, ["tiny"]);
    assert!(engine.load_failures().is_empty());
    assert_eq!(engine.resolve(None, "x2y").unwrap().model.info.sha256, sha(&path));

    // A new file that fails is listed, and its model does not exist.
    place(b"not a model", &dir.path().join("broken.safetensors"));
    assert_eq!(recorded.reloader.rescan(Trigger::Poll).await.failed, ["broken"]);
    assert!(matches!(engine.resolve(Some("broken"), "x2y"), Err(EngineError::UnknownModel { .. })));
    std::fs::remove_file(dir.path().join("broken.safetensors")).unwrap();
    recorded.reloader.rescan(Trigger::Poll).await;
    assert!(engine.load_failures().is_empty(), "a removed file's failure is forgotten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_too_large_for_the_memory_budget_is_refused_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let small_file = dir.path().join("small.safetensors");
    write_model(Weights::Upsample, &small_file);
    let mut wide = ModelFile::from_bytes(&std::fs::read(&small_file).unwrap(), &Device::Cpu).unwrap();
    widen(&mut wide, 256);
    // Room for the smallest image on the small model, not on the wide one: the engine's own
    // costing, whatever the thread count.
    let smallest = |file: &ModelFile| {
        let memory = MemoryModel {
            architecture: file.metadata.architecture,
            executor: Executor::FastCpu,
            threads: rayon::current_num_threads(),
        };
        64 * 3 + memory.footprint(&ImageHeader::rgb(8, 8), None).alone()
    };
    let small = ModelFile::from_bytes(&std::fs::read(&small_file).unwrap(), &Device::Cpu).unwrap();
    let budget = smallest(&wide) - 1;
    assert!(smallest(&small) <= budget);
    let config = EngineConfig { memory_budget: budget, ..Default::default() };
    let recorded = Recorded::with_config(dir.path(), config).await;
    let engine = &recorded.engine;
    let serving = engine.resolve(None, "x2y").unwrap();
    assert!(engine.check_fits_budget(&serving.model.info, &serving.model.memory).is_ok());

    ModelFile::save(
        &dir.path().join("wide.safetensors"),
        &wide.metadata,
        &wide.generators,
        WeightStorage::F32,
    )
    .unwrap();
    let rescan = recorded.reloader.rescan(Trigger::Poll).await;
    assert_eq!(rescan.failed, ["wide"]);
    let failure = engine.load_failure("wide").unwrap();
    assert!(
        failure.error.contains("needs") && failure.error.contains("more than the memory budget"),
        "{}",
        failure.error
    );
    for events in &recorded.events {
        assert_eq!(
            *events.lock().unwrap(),
            [Event::Load(serving.model.id)],
            "refused before any worker loads it"
        );
    }
    assert_eq!(engine.models().len(), 1);
}

/// Gives `file` `ngf` filters (zero weights): the same layers, wider.
fn widen(file: &mut ModelFile, ngf: usize) {
    let architecture = cycleserve::model::GeneratorConfig { ngf, ..file.metadata.architecture };
    file.metadata.architecture = architecture;
    for weights in file.generators.values_mut() {
        *weights = architecture
            .parameters()
            .into_iter()
            .map(|p| {
                (p.name, candle_core::Tensor::zeros(p.shape, candle_core::DType::F32, &Device::Cpu).unwrap())
            })
            .collect();
    }
}

// ---- A real server under load --------------------------------------------------------------

/// A small fixed input, and what each network answers to it.
struct Expected {
    input: Vec<u8>,
    /// Decoded result pixels, by model file SHA-256.
    outputs: HashMap<String, Vec<u8>>,
}

impl Expected {
    fn new() -> Self {
        let image =
            image::RgbImage::from_fn(24, 20, |x, y| image::Rgb([(x * 10) as u8, (y * 12) as u8, 128]));
        let mut input = Vec::new();
        image.write_to(&mut std::io::Cursor::new(&mut input), image::ImageFormat::Png).unwrap();
        Self { input, outputs: HashMap::new() }
    }

    /// Runs `file` on the input here, on its own, with the executor the server picks by default,
    /// and remembers the result under its checksum.
    fn learn(&mut self, file: &Path) -> String {
        let executor = Executor::choose(&Device::Cpu, Precision::Auto).unwrap();
        let model = Model::load_with(file, &Device::Cpu, executor).unwrap();
        let decoded = codec::decode(&self.input, &DecodeOptions::default()).unwrap();
        let output = run_batch(&model, Direction::XtoY, &[&decoded], &Device::Cpu).unwrap().remove(0);
        let sha = sha(file);
        self.outputs.insert(sha.clone(), output.as_bytes().to_vec());
        sha
    }

    /// The version a 200 answer came from; fails unless its pixels are that version's.
    fn check(&self, sha: &str, body: &[u8]) {
        let expected =
            self.outputs.get(sha).unwrap_or_else(|| panic!("answered by an unknown version {sha}"));
        let got = image::load_from_memory(body).unwrap();
        assert!(got.as_bytes() == expected.as_slice(), "the answer is not version {sha}'s output");
    }
}

/// The driver's progress through the reloads; clients note it before and after each request.
mod phase {
    pub const ADD_WRITTEN: usize = 1;
    pub const ADD_SEEN: usize = 2;
    pub const REPLACE_WRITTEN: usize = 3;
    pub const REPLACE_SEEN: usize = 4;
    pub const REMOVE_WRITTEN: usize = 5;
    pub const REMOVE_SEEN: usize = 6;
}

#[derive(Debug)]
struct Answer {
    model: &'static str,
    /// Phases when the request was sent and when its answer arrived.
    started: usize,
    ended: usize,
    /// `Some(sha256)` for a 200, `None` for the unknown-model 404.
    version: Option<String>,
}

/// The models the routing table holds now, by name, with their checksums.
async fn routed(client: &Client, server: &Server) -> HashMap<String, String> {
    let body: serde_json::Value =
        client.get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let models = body["models"].as_array().unwrap();
    models
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_string(), m["sha256"].as_str().unwrap().to_string()))
        .collect()
}

async fn metric(client: &Client, server: &Server, series: &str) -> Option<f64> {
    let text = client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_are_added_replaced_and_removed_under_load_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let staging = tempfile::tempdir().unwrap();
    let mut expected = Expected::new();
    let stable_file = dir.path().join("stable.safetensors");
    write_model(Weights::TransposeAffine, &stable_file);
    let stable = expected.learn(&stable_file);
    let (v1_file, v2_file) = (staging.path().join("v1.safetensors"), staging.path().join("v2.safetensors"));
    write_model(Weights::Upsample, &v1_file);
    write_model(Weights::Transpose, &v2_file);
    let (v1, v2) = (expected.learn(&v1_file), expected.learn(&v2_file));
    assert!(expected.outputs[&v1] != expected.outputs[&v2], "the two versions must answer differently");
    let expected = Arc::new(expected);

    let server = Server::start(dir.path(), &["--models-watch", "50ms"]).ready().await;
    let server = Arc::new(server);
    let client = Client::new();
    let phase = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let done: Arc<Vec<AtomicUsize>> = Arc::new((0..8).map(|_| AtomicUsize::new(0)).collect());

    // Eight clients alternate between the model being swapped and one left alone.
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (server, client, phase, stop, done, expected) =
                (server.clone(), client.clone(), phase.clone(), stop.clone(), done.clone(), expected.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for i in c.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let model = if i % 2 == 0 { "swap" } else { "stable" };
                    let started = phase.load(Ordering::SeqCst);
                    let response = client
                        .post(server.url(&format!("/translate?direction=x2y&model={model}")))
                        .header(CONTENT_TYPE, "image/png")
                        .body(expected.input.clone())
                        .send()
                        .await
                        .unwrap();
                    let status = response.status();
                    let version =
                        response.headers().get("x-model-sha256").map(|v| v.to_str().unwrap().to_string());
                    let body = response.bytes().await.unwrap();
                    let ended = phase.load(Ordering::SeqCst);
                    let version = match status.as_u16() {
                        200 => {
                            let version = version.expect("a 200 names its model version");
                            expected.check(&version, &body);
                            Some(version)
                        }
                        404 => {
                            let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            assert_eq!(error["error"]["code"], "unknown_model", "{error}");
                            None
                        }
                        other => panic!("{model}: {other} {}", String::from_utf8_lossy(&body)),
                    };
                    answers.push(Answer { model, started, ended, version });
                    done[c].fetch_add(1, Ordering::SeqCst);
                }
                answers
            })
        })
        .collect();
    let readiness = {
        let (server, client, stop) = (server.clone(), client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut checks = 0;
            while !stop.load(Ordering::SeqCst) {
                let status = client.get(server.url("/readyz")).send().await.unwrap().status();
                assert_eq!(status, 200, "readiness must hold through reloads");
                checks += 1;
            }
            checks
        })
    };
    // Every client gets a few more answers in each phase, so each change happens under load.
    let done = &done;
    let progress = move || async move {
        let marks: Vec<usize> = done.iter().map(|d| d.load(Ordering::SeqCst) + 4).collect();
        until("every client answered in this phase", || {
            done.iter().zip(&marks).all(|(d, mark)| d.load(Ordering::SeqCst) >= *mark)
        })
        .await;
    };
    let swap_file = dir.path().join("swap.safetensors");
    let swap_is = |want: Option<&str>| {
        let (client, server) = (&client, &server);
        let want = want.map(str::to_string);
        move || {
            let want = want.clone();
            async move { routed(client, server).await.get("swap").cloned() == want }
        }
    };

    progress().await;
    phase.store(phase::ADD_WRITTEN, Ordering::SeqCst);
    place(&std::fs::read(&v1_file).unwrap(), &swap_file);
    until_async("the new model routed to", swap_is(Some(&v1))).await;
    phase.store(phase::ADD_SEEN, Ordering::SeqCst);
    progress().await;
    phase.store(phase::REPLACE_WRITTEN, Ordering::SeqCst);
    place(&std::fs::read(&v2_file).unwrap(), &swap_file);
    until_async("the new version routed to", swap_is(Some(&v2))).await;
    phase.store(phase::REPLACE_SEEN, Ordering::SeqCst);
    progress().await;
    phase.store(phase::REMOVE_WRITTEN, Ordering::SeqCst);
    std::fs::remove_file(&swap_file).unwrap();
    until_async("the model gone", swap_is(None)).await;
    phase.store(phase::REMOVE_SEEN, Ordering::SeqCst);
    progress().await;
    stop.store(true, Ordering::SeqCst);

    let mut seen = HashMap::<Option<String>, usize>::new();
    for client in clients {
        let answers = client.await.unwrap();
        let mut last_rank = 0;
        for a in &answers {
            if a.model == "stable" {
                assert_eq!(a.version.as_deref(), Some(stable.as_str()), "{a:?}");
                continue;
            }
            *seen.entry(a.version.clone()).or_default() += 1;
            // What the phases allow, and each client's answers in order: absent, v1, v2, absent.
            let rank = match a.version.as_deref() {
                None if a.started < phase::ADD_SEEN && last_rank == 0 => 0,
                None => {
                    assert!(a.ended >= phase::REMOVE_WRITTEN, "404 while the model was routed to: {a:?}");
                    3
                }
                Some(v) if v == v1 => {
                    assert!(a.ended >= phase::ADD_WRITTEN && a.started < phase::REPLACE_SEEN, "{a:?}");
                    1
                }
                Some(v) if v == v2 => {
                    assert!(a.ended >= phase::REPLACE_WRITTEN && a.started < phase::REMOVE_SEEN, "{a:?}");
                    2
                }
                Some(other) => panic!("swap answered by {other}"),
            };
            assert!(rank >= last_rank, "a client saw versions go back: {answers:?}");
            last_rank = rank;
        }
    }
    for version in [Some(v1.clone()), Some(v2.clone()), None] {
        assert!(seen.get(&version).is_some_and(|n| *n > 0), "no answer from {version:?}: {seen:?}");
    }
    assert!(readiness.await.unwrap() > 0);

    // Every change counted, and the versions that left are gone from memory.
    for change in ["added", "replaced", "removed"] {
        let series = format!("cycleserve_model_reloads_total{{model=\"swap\",change=\"{change}\"}}");
        assert_eq!(metric(&client, &server, &series).await, Some(1.0), "{series}");
    }
    until_async("old versions unloaded", || async {
        metric(&client, &server, "cycleserve_model_versions").await == Some(1.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_file_leaves_the_old_version_serving_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected = Expected::new();
    let path = dir.path().join("swap.safetensors");
    write_model(Weights::Upsample, &path);
    let v1 = expected.learn(&path);
    let staging = tempfile::tempdir().unwrap();
    let v2_file = staging.path().join("v2.safetensors");
    write_model(Weights::Transpose, &v2_file);
    let v2 = expected.learn(&v2_file);
    let server = Server::start(dir.path(), &[]).ready().await;
    let client = Client::new();
    let hangup = || {
        let pid = server.child.id().to_string();
        assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    };
    let (client, server) = (&client, &server);
    let models = move || async move {
        let body: serde_json::Value =
            client.get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
        body
    };
    let translate = |model: &str| {
        client
            .post(server.url(&format!("/translate?direction=x2y&model={model}")))
            .header(CONTENT_TYPE, "image/png")
            .body(expected.input.clone())
            .send()
    };

    let mut corrupt = std::fs::read(&path).unwrap();
    corrupt.truncate(corrupt.len() / 2);
    place(&corrupt, &path);
    hangup();
    until_async("the failure reported", || async { models().await["failed"].as_array().unwrap().len() == 1 })
        .await;
    let listed = models().await;
    let failure = &listed["failed"][0];
    assert_eq!(failure["model"], "swap");
    assert_eq!(failure["file"], "swap.safetensors");
    assert_eq!(failure["sha256"], sha256_hex(&corrupt));
    assert!(failure["error"].as_str().unwrap().contains("truncated"), "{failure}");
    assert_eq!(listed["models"][0]["sha256"], v1.as_str(), "the old version still serves");
    assert_eq!(listed["models"][0]["load_error"]["sha256"], sha256_hex(&corrupt));

    let r = translate("swap").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-model-sha256"], v1.as_str());
    expected.check(&v1, &r.bytes().await.unwrap());
    assert_eq!(client.get(server.url("/readyz")).send().await.unwrap().status(), 200);
    let failures = "cycleserve_model_reload_failures_total{model=\"swap\"}";
    assert_eq!(metric(client, server, failures).await, Some(1.0));
    assert_eq!(metric(client, server, "cycleserve_model_files_failing").await, Some(1.0));
    let logged = server.logs().iter().any(|l| {
        l["level"] == "ERROR"
            && l["fields"]["model"] == "swap"
            && l["fields"]["message"].as_str().is_some_and(|m| m.contains("failed to load"))
    });
    assert!(logged, "the failure is logged");

    // A new file that cannot load: reported, and no model of that name.
    place(b"not a model", &dir.path().join("broken.safetensors"));
    hangup();
    until_async("the second failure reported", || async {
        models().await["failed"].as_array().unwrap().len() == 2
    })
    .await;
    let r = translate("broken").await.unwrap();
    assert_eq!(r.status(), 404);

    // Fixed: the new version replaces the old one and the failure is cleared.
    place(&std::fs::read(&v2_file).unwrap(), &path);
    std::fs::remove_file(dir.path().join("broken.safetensors")).unwrap();
    hangup();
    until_async("the fixed file routed to", || async {
        let listed = models().await;
        listed["models"][0]["sha256"] == v2.as_str() && listed["failed"].as_array().unwrap().is_empty()
    })
    .await;
    let r = translate("swap").await.unwrap();
    assert_eq!(r.headers()["x-model-sha256"], v2.as_str());
    expected.check(&v2, &r.bytes().await.unwrap());
    assert_eq!(metric(client, server, "cycleserve_model_files_failing").await, Some(0.0));
}
