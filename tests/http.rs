//! The HTTP service end to end: a real `cycleserve` process, a real HTTP client, every route and
//! every error status, batching visible in /metrics, overload, and draining on SIGTERM.

mod common;

use std::time::Duration;

use common::server::Server;
use common::*;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Client, StatusCode};

fn png(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

async fn error_code(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    assert_eq!(response.headers()[CONTENT_TYPE], "application/json", "{status} must carry a JSON body");
    assert!(response.headers().contains_key("x-request-id"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    (status, body["error"]["code"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_formats_and_every_client_error() {
    let models = tiny_models_dir();
    let server =
        Server::start(models.path(), &["--max-body-bytes", "150000", "--max-pixels", "60000"]).ready().await;
    let client = Client::new();
    let translate = |query: &str| client.post(server.url(&format!("/translate?{query}")));

    // Raw PNG at an odd size, with a client request id echoed back.
    let r = translate("direction=photo2painting")
        .header(CONTENT_TYPE, "image/png")
        .header("x-request-id", "abc-123")
        .body(png("photo_250x198.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    assert_eq!(r.headers()[CONTENT_TYPE], "image/png");
    assert_eq!(r.headers()["x-direction"], "photo2painting");
    let timing = r.headers()["server-timing"].to_str().unwrap().to_string();
    for stage in ["decode;dur=", "queue;dur=", "inference;dur=", "encode;dur="] {
        assert!(timing.contains(stage), "{timing}");
    }
    let out = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
    assert_eq!((out.width(), out.height()), (250, 198));

    // JPEG in, JPEG out; grayscale+alpha in multipart, RGBA out; 16-bit gray in, WebP out.
    let r = translate("direction=y2x&model=tiny")
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(ACCEPT, "image/jpeg")
        .body(png("exif_rotated.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()[CONTENT_TYPE], "image/jpeg");
    assert_eq!(image::load_from_memory(&r.bytes().await.unwrap()).unwrap().height(), 16);
    let form = reqwest::multipart::Form::new()
        .part("image", reqwest::multipart::Part::bytes(png("gray_alpha.png")).file_name("g.png"));
    let r = translate("direction=x2y").multipart(form).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let out = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
    assert!(out.color().has_alpha() && out.width() == 11);
    let r =
        translate("direction=x2y").header(ACCEPT, "image/webp").body(png("gray16.png")).send().await.unwrap();
    assert_eq!(r.headers()[CONTENT_TYPE], "image/webp");
    // A 4×4 icon runs padded to 8×8; an Accept naming nothing we make is disregarded.
    let r = translate("direction=x2y").header(ACCEPT, "text/html").body(tiny_png()).send().await.unwrap();
    assert_eq!(r.headers()[CONTENT_TYPE], "image/png");
    assert_eq!(image::load_from_memory(&r.bytes().await.unwrap()).unwrap().width(), 4);

    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (translate("model=tiny").body(png("gray16.png")), StatusCode::BAD_REQUEST, "missing_direction"),
        (translate("direction=sideways").body(png("gray16.png")), StatusCode::BAD_REQUEST, "bad_direction"),
        (
            translate("direction=x2y").multipart(reqwest::multipart::Form::new().text("other", "x")),
            StatusCode::BAD_REQUEST,
            "bad_multipart",
        ),
        (
            translate("direction=x2y&model=huge").body(png("gray16.png")),
            StatusCode::NOT_FOUND,
            "unknown_model",
        ),
        (
            translate("direction=x2y").body(vec![7u8; 200_000]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_bytes",
        ),
        (
            translate("direction=x2y").body(png("photo_256x256.png")),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_pixels",
        ),
        (
            translate("direction=x2y").body("just text"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_image",
        ),
        (
            translate("direction=x2y").header(CONTENT_TYPE, "text/plain").body(png("gray16.png")),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_type",
        ),
        (
            translate("direction=x2y").body(png("photo_250x198.png")[..20_000].to_vec()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "corrupt_image",
        ),
        (client.get(server.url("/nowhere")), StatusCode::NOT_FOUND, "not_found"),
        (client.get(server.url("/v1/models/huge")), StatusCode::NOT_FOUND, "unknown_model"),
        (client.delete(server.url("/healthz")), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        (client.get(server.url("/translate")), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
    ];
    for (i, (request, status, code)) in cases.into_iter().enumerate() {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "case {i} ({code})");
        assert_eq!(error_code(response).await, (status, code.to_string()));
    }

    let health: serde_json::Value =
        client.get(server.url("/healthz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "ok");
    let models: serde_json::Value =
        client.get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    let model = &models["models"][0];
    assert_eq!(model["name"], "tiny");
    assert_eq!(model["domains"]["x"], "photo");
    assert_eq!(model["directions"][1]["name"], "painting2photo");
    assert_eq!(model["architecture"]["ngf"], 8);
    assert_eq!(model["sha256"].as_str().unwrap().len(), 64);
    let one: serde_json::Value =
        client.get(server.url("/v1/models/tiny")).send().await.unwrap().json().await.unwrap();
    assert_eq!(&one, model);
    let spec = client.get(server.url("/openapi.yaml")).send().await.unwrap().text().await.unwrap();
    assert!(spec.starts_with("openapi: 3.1"));
    let metrics = client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(
            r#"cycleserve_requests_total{route="/translate",status="413",model="tiny",direction="x2y"} 2"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"cycleserve_build_info{version="0.1.0",device="cpu"} 1"#));
}

fn tiny_png() -> Vec<u8> {
    let mut bytes = Vec::new();
    image::RgbImage::new(4, 4)
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    bytes
}

fn histogram_count(metrics: &str, bucket: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(bucket))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {bucket} in {metrics}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_batch_and_overload_answers_503() {
    let models = tiny_models_dir();
    let server = Server::start(models.path(), &["--max-batch-size", "8", "--max-batch-delay-ms", "60000"])
        .ready()
        .await;
    let client = Client::new();
    let requests =
        (0..8).map(|_| client.post(server.url("/translate?direction=x2y")).body(png("photo_256x256.png")));
    for response in all_at_once(requests).await {
        assert_eq!(response.status(), 200);
    }
    let metrics = client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let total = histogram_count(&metrics, "cycleserve_batch_size_count");
    let singles = histogram_count(&metrics, "cycleserve_batch_size_bucket{le=\"1\"}");
    assert!(total < 8.0 && singles < total, "batches formed: {total} batches, {singles} of size 1");
    assert!(metrics.contains("cycleserve_images_processed_total{model=\"tiny\",direction=\"x2y\"} 8"));
    drop(server);

    // A queue of one, held by an upload that has sent half its body: the next request is
    // refused at once with 503, and the held one completes once its body arrives.
    let busy = Server::start(models.path(), &["--queue-capacity", "1"]).ready().await;
    let held = SplitUpload::start(&busy, &png("photo_256x256.png"));
    until_queue_depth(&client, &busy, 1).await;
    let refused = client
        .post(busy.url("/translate?direction=x2y"))
        .body(png("photo_256x256.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(error_code(refused).await.1, "overloaded");
    assert_eq!(tokio::task::spawn_blocking(move || held.finish()).await.unwrap(), 200);
}

/// Sends requests at once, each on its own task, and collects the responses in order.
async fn all_at_once(requests: impl Iterator<Item = reqwest::RequestBuilder>) -> Vec<reqwest::Response> {
    let tasks: Vec<_> = requests.map(|r| tokio::spawn(r.send())).collect();
    let mut responses = Vec::new();
    for task in tasks {
        responses.push(task.await.unwrap().unwrap());
    }
    responses
}

#[tokio::test(flavor = "multi_thread")]
async fn deadlines_answer_504() {
    let models = tiny_models_dir();
    let server = Server::start(models.path(), &["--request-timeout-ms", "1", "--body-timeout-ms", "60000"])
        .ready()
        .await;
    let response = Client::new()
        .post(server.url("/translate?direction=x2y"))
        .body(png("photo_256x256.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(response).await, (StatusCode::GATEWAY_TIMEOUT, "timed_out".to_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_fails_readiness_and_drains_in_flight_requests() {
    let models = tiny_models_dir();
    let mut server = Server::start(models.path(), &[]).ready().await;
    let client = Client::new();
    // In flight: admitted, its body half sent.
    let in_flight = SplitUpload::start(&server, &png("photo_256x256.png"));
    until_queue_depth(&client, &server, 1).await;
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // Readiness fails: refused outright, or 503 on a connection that was already open.
    let mut ready = true;
    for _ in 0..1200 {
        ready = match client.get(server.url("/readyz")).send().await {
            Err(e) => !e.is_connect(),
            Ok(r) => r.status() == StatusCode::OK,
        };
        if !ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(!ready, "readiness never failed after SIGTERM");
    let status = tokio::task::spawn_blocking(move || in_flight.finish()).await.unwrap();
    assert_eq!(status, 200, "the in-flight request finished");
    let exit = tokio::task::spawn_blocking(move || server.child.wait().unwrap()).await.unwrap();
    assert!(exit.success(), "exit status {exit:?}");
}

/// An upload sent in two parts over a raw connection: the head and half the body at once, the
/// rest when the test says. While it waits, the server holds it as an admitted request, so tests
/// can create "a request in flight" as a state rather than by timing.
struct SplitUpload {
    stream: std::net::TcpStream,
    rest: Vec<u8>,
}

impl SplitUpload {
    fn start(server: &Server, body: &[u8]) -> Self {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
        let head = format!(
            "POST /translate?direction=x2y HTTP/1.1\r\nHost: {}\r\nContent-Type: image/png\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            server.addr,
            body.len()
        );
        let (first, rest) = body.split_at(body.len() / 2);
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(first).unwrap();
        Self { stream, rest: rest.to_vec() }
    }

    /// Sends the rest and returns the response's status code.
    fn finish(mut self) -> u16 {
        use std::io::{Read, Write};
        self.stream.write_all(&self.rest).unwrap();
        let mut response = Vec::new();
        self.stream.read_to_end(&mut response).unwrap();
        let text = String::from_utf8_lossy(&response);
        text.split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status in {text}"))
    }
}

/// Polls `/metrics` until the queue depth gauge reads `depth`.
async fn until_queue_depth(client: &Client, server: &Server, depth: usize) {
    let wanted = format!("cycleserve_queue_depth {depth}\n");
    for _ in 0..1200 {
        let metrics = client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if metrics.contains(&wanted) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the queue depth never reached {depth}");
}
