//! Traces exported over OTLP/HTTP: a real `cycleserve` process posting to a small OTLP receiver
//! run by the test, which decodes the protobuf the way a collector does. A caller's
//! `traceparent` is continued, every stage of a request is a span in the right place, the
//! attributes are there, a shared batch shows in each request's trace, the last spans are
//! flushed on SIGTERM, and a collector that is down costs requests nothing.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::server::Server;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;
use reqwest::Client;
use tokio::sync::watch;

/// How long spans may take to arrive; generous, for a loaded machine.
const PATIENCE: Duration = Duration::from_secs(120);

/// A span as received, with the `service.name` of its resource.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    kind: i32,
    /// The status code: unset, ok or error.
    status: i32,
    attributes: HashMap<String, Value>,
}

/// An OTLP/HTTP receiver on an ephemeral port: every span posted to `/v1/traces`.
struct Collector {
    addr: SocketAddr,
    spans: watch::Receiver<Vec<Received>>,
}

impl Collector {
    async fn start() -> Self {
        let (tx, spans) = watch::channel(Vec::new());
        let app = axum::Router::new().route("/v1/traces", post(receive)).with_state(tx);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, spans }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until the trace `trace_id` holds spans named `names` (at least), and returns it.
    async fn trace(&mut self, trace_id: &[u8], names: &[&str]) -> Vec<Received> {
        let of_trace = |all: &[Received]| -> Vec<Received> {
            all.iter().filter(|s| s.trace_id == trace_id).cloned().collect()
        };
        let complete = |all: &Vec<Received>| {
            let trace = of_trace(all);
            names.iter().all(|n| trace.iter().any(|s| s.name == *n))
        };
        let arrived = tokio::time::timeout(PATIENCE, self.spans.wait_for(complete)).await.is_ok();
        let trace = of_trace(&self.spans.borrow());
        assert!(arrived, "trace {} incomplete: {trace:#?}", hex(trace_id));
        trace
    }
}

async fn receive(State(spans): State<watch::Sender<Vec<Received>>>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
    let mut received = Vec::new();
    for resource_spans in request.resource_spans {
        let resource = resource_spans.resource.map(|r| attributes(r.attributes)).unwrap_or_default();
        let service = match resource.get("service.name") {
            Some(Value::StringValue(s)) => s.clone(),
            other => panic!("service.name: {other:?}"),
        };
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            received.push(Received {
                service: service.clone(),
                name: span.name,
                trace_id: span.trace_id,
                span_id: span.span_id,
                parent: span.parent_span_id,
                kind: span.kind,
                status: span.status.map_or(0, |s| s.code),
                attributes: attributes(span.attributes),
            });
        }
    }
    spans.send_modify(|all| all.extend(received));
    // An empty ExportTraceServiceResponse.
    Vec::new()
}

fn attributes(pairs: Vec<KeyValue>) -> HashMap<String, Value> {
    pairs.into_iter().filter_map(|kv| Some((kv.key, kv.value?.value?))).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A caller's W3C trace context: its trace id and the id of its own (parent) span.
struct Caller {
    trace_id: [u8; 16],
    span_id: [u8; 8],
}

impl Caller {
    fn new(seed: u8) -> Self {
        Self { trace_id: [seed; 16], span_id: [seed.wrapping_add(1); 8] }
    }

    fn traceparent(&self) -> String {
        format!("00-{}-{}-01", hex(&self.trace_id), hex(&self.span_id))
    }
}

fn photo() -> Vec<u8> {
    std::fs::read(fixture("photo_250x198.png")).unwrap()
}

/// Sends a traced translation; returns its request id.
async fn translate(client: &Client, server: &Server, caller: &Caller) -> String {
    let response = client
        .post(server.url("/translate?direction=x2y"))
        .header("traceparent", caller.traceparent())
        .body(photo())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.headers()["x-request-id"].to_str().unwrap().to_string()
}

/// The request's span is named after its method and route, as OpenTelemetry's HTTP conventions ask.
const REQUEST: &str = "POST /translate";
const STAGES: [&str; 8] =
    [REQUEST, "read_body", "decode", "memory_wait", "queue_wait", "batch", "inference", "encode"];

fn one<'a>(trace: &'a [Received], name: &str) -> &'a Received {
    let found: Vec<_> = trace.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one `{name}` span in {trace:#?}");
    found[0]
}

fn int(span: &Received, key: &str) -> i64 {
    match span.attributes.get(key) {
        Some(Value::IntValue(v)) => *v,
        other => panic!("{key} of `{}`: {other:?}", span.name),
    }
}

fn string<'a>(span: &'a Received, key: &str) -> &'a str {
    match span.attributes.get(key) {
        Some(Value::StringValue(v)) => v,
        other => panic!("{key} of `{}`: {other:?}", span.name),
    }
}

/// Checks one request's trace: it continues `caller`, each stage has its place, and the
/// attributes are there. Returns the batch's id.
fn check_request_trace(trace: &[Received], caller: &Caller, request_id: &str, batch_size: i64) -> i64 {
    let request = one(trace, REQUEST);
    assert_eq!(request.parent, caller.span_id, "the request span is a child of the caller's");
    assert_eq!(request.kind, SpanKind::Server as i32);
    assert_eq!(string(request, "request_id"), request_id);
    assert_eq!(int(request, "http.response.status_code"), 200);
    assert_eq!(string(request, "http.route"), "/translate");
    assert_eq!(string(request, "http.request.method"), "POST");
    assert!(trace.iter().all(|s| s.service == "cycleserve-test"), "service.name from the flag");
    for stage in ["read_body", "decode", "queue_wait", "batch", "encode"] {
        assert_eq!(one(trace, stage).parent, request.span_id, "`{stage}` is a child of the request");
    }
    let decode = one(trace, "decode");
    assert_eq!(one(trace, "memory_wait").parent, decode.span_id);
    assert_eq!((int(decode, "width"), int(decode, "height")), (250, 198));
    assert_eq!(int(one(trace, "read_body"), "bytes"), photo().len() as i64);
    assert_eq!(string(one(trace, "encode"), "format"), "image/png");
    let batch = one(trace, "batch");
    assert_eq!(one(trace, "inference").parent, batch.span_id, "inference runs inside the batch");
    assert_eq!(int(batch, "batch.size"), batch_size);
    assert_eq!(string(batch, "model"), "tiny");
    assert_eq!(string(batch, "direction"), "x2y");
    assert_eq!((int(batch, "padded_width"), int(batch, "padded_height")), (252, 200));
    int(batch, "batch.id")
}

#[tokio::test(flavor = "multi_thread")]
async fn traced_requests_continue_the_callers_trace_with_a_span_for_every_stage() {
    let mut collector = Collector::start().await;
    let models = tiny_models_dir();
    let server = Server::start_with_env(
        models.path(),
        &[
            "--otlp-endpoint",
            &collector.endpoint(),
            "--otlp-service-name",
            "cycleserve-test",
            // Two requests make a full batch; nothing else closes it.
            "--max-batch-size",
            "2",
            "--max-batch-delay-ms",
            "600000",
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "50")],
    )
    .ready()
    .await;
    let client = Client::new();
    let callers = [Caller::new(0x11), Caller::new(0x22)];
    let (first, second) =
        tokio::join!(translate(&client, &server, &callers[0]), translate(&client, &server, &callers[1]));
    let mut batch_ids = Vec::new();
    for (caller, request_id) in callers.iter().zip([first, second]) {
        let trace = collector.trace(&caller.trace_id, &STAGES).await;
        batch_ids.push(check_request_trace(&trace, caller, &request_id, 2));
    }
    assert_eq!(batch_ids[0], batch_ids[1], "both traces show the batch they shared");

    // A client error is answered and traced, and is no failure of the server's.
    let caller = Caller::new(0x44);
    let refused = client
        .post(server.url("/translate?direction=sideways"))
        .header("traceparent", caller.traceparent())
        .body(photo())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let trace = collector.trace(&caller.trace_id, &[REQUEST]).await;
    let request = one(&trace, REQUEST);
    assert_eq!(request.parent, caller.span_id);
    assert_eq!(int(request, "http.response.status_code"), 400);
    assert_eq!(request.status, StatusCode::Unset as i32);
    // The readiness polls of `ready()` came first; had they been traced, they would be here.
    let all = collector.spans.borrow();
    assert!(all.iter().all(|s| !s.name.contains("/readyz")), "readiness probes are not traced");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_flushes_the_spans_still_queued() {
    let mut collector = Collector::start().await;
    let models = tiny_models_dir();
    // An hour between scheduled exports: only the shutdown flush can deliver these spans.
    let mut server = Server::start_with_env(
        models.path(),
        &["--otlp-endpoint", &collector.endpoint(), "--otlp-service-name", "cycleserve-test"],
        &[("OTEL_BSP_SCHEDULE_DELAY", "3600000")],
    )
    .ready()
    .await;
    let caller = Caller::new(0x33);
    let request_id = translate(&Client::new(), &server, &caller).await;
    assert!(collector.spans.borrow().iter().all(|s| s.trace_id != caller.trace_id), "nothing sent yet");
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let exit = tokio::task::spawn_blocking(move || server.child.wait().unwrap()).await.unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    let trace = collector.trace(&caller.trace_id, &STAGES).await;
    check_request_trace(&trace, &caller, &request_id, 1);
}

/// The value of a counter sample (`name{labels}`) in a Prometheus scrape.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {metrics}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_collector_down_requests_succeed_and_dropped_spans_are_counted() {
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let models = tiny_models_dir();
    // Readiness polls and scrapes are not traced: the only spans are the ones this test sends.
    let server = Server::start_with_env(
        models.path(),
        &["--otlp-endpoint", &format!("http://{closed}")],
        &[("OTEL_BSP_SCHEDULE_DELAY", "50"), ("OTEL_EXPORTER_OTLP_TIMEOUT", "500")],
    )
    .ready()
    .await;
    let client = Client::new();
    let dropped = || async {
        let scrape = client.get(server.url("/metrics")).send().await.unwrap();
        let text = scrape.text().await.unwrap();
        assert_eq!(sample(&text, "cycleserve_otlp_spans_dropped_total{reason=\"queue_full\"}"), 0.0);
        assert_eq!(sample(&text, "cycleserve_otlp_spans_exported_total"), 0.0);
        sample(&text, "cycleserve_otlp_spans_dropped_total{reason=\"export_failed\"}")
    };
    // Each request's spans fail to export before the next request starts, so the failures are
    // at least two separate exports.
    for round in 1..=2 {
        translate(&client, &server, &Caller::new(round)).await;
        let wanted = (round as usize * STAGES.len()) as f64;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while dropped().await < wanted {
            assert!(tokio::time::Instant::now() < deadline, "spans of round {round} never counted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(dropped().await, wanted, "every span of the request, no more");
    }
    // The failure is logged once, not once per export.
    let warnings = || {
        let logs = server.logs();
        let message = |l: &&serde_json::Value| l["fields"]["message"].as_str().map(str::to_string);
        logs.iter().filter_map(|l| message(&l)).filter(|m| m.starts_with("cannot export traces")).count()
    };
    until(|| (warnings() > 0).then_some(())).await;
    assert_eq!(warnings(), 1, "{:#?}", server.logs());
}

/// Polls `check` until it gives a value, for at most [`PATIENCE`].
async fn until<T>(check: impl Fn() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
