//! The server's edges, over raw TCP where an HTTP client would hide what happens: refused bodies
//! that clients can still read the answer to, slow and idle connections closed, the connection
//! cap, API keys and the metrics port.

mod common;

use std::time::{Duration, Instant};

use common::server::Server;
use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A generous bound for anything that should happen "soon": tests assert upper bounds only this
/// loosely, so that a loaded machine cannot fail them.
const SOON: Duration = Duration::from_secs(20);

struct Answer {
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn status(&self) -> u16 {
        self.head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{}", self.head))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim().to_ascii_lowercase())
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.head))
    }
}

/// Reads one response (head and a Content-Length body) from `stream`.
async fn read_answer(stream: &mut (impl AsyncRead + Unpin)) -> Answer {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n =
            tokio::time::timeout(SOON, stream.read(&mut chunk)).await.expect("no answer in time").unwrap();
        assert!(n > 0, "connection closed before an answer: {:?}", String::from_utf8_lossy(&buffer));
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buffer[..head_end].to_vec()).unwrap();
    let mut answer = Answer { head, body: buffer[head_end..].to_vec() };
    let length: usize = answer.header("content-length").map_or(0, |v| v.parse().unwrap());
    while answer.body.len() < length {
        let n = tokio::time::timeout(SOON, stream.read(&mut chunk)).await.expect("body not in time").unwrap();
        assert!(n > 0, "connection closed inside a body");
        answer.body.extend_from_slice(&chunk[..n]);
    }
    answer
}

/// Waits until the server closes `stream` (end of file or reset), reading and discarding any
/// data, at most `bound` after `since`; returns how long after `since` that was.
async fn closed_within(stream: &mut TcpStream, since: Instant, bound: Duration) -> Duration {
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((since + bound).into(), stream.read(&mut chunk)).await {
            Err(_) => panic!("connection still open after {bound:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return since.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

fn translate_head(length: usize, extra: &str) -> String {
    format!(
        "POST /translate?direction=x2y HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n\
         Content-Length: {length}\r\n{extra}\r\n"
    )
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn refused_bodies_are_answered_so_that_clients_read_the_answer() {
    let models = tiny_models_dir();
    let server = Server::start(models.path(), &["--max-body-bytes", "150000"]).ready().await;

    // Expect: 100-continue: refused from Content-Length before any body is asked for.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(translate_head(200_000, "Expect: 100-continue\r\n").as_bytes()).await.unwrap();
    let answer = read_answer(&mut stream).await;
    assert_eq!(answer.status(), 413, "{}", answer.head);
    assert_eq!(answer.json()["error"]["code"], "too_many_bytes");
    assert_eq!(answer.header("connection").as_deref(), Some("close"));
    closed_within(&mut stream, Instant::now(), SOON).await;

    // No Expect, 50 kB over the limit: the body is read to its end before the answer, so the
    // connection stays usable (a reset could not happen) and serves the next request.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut reader, mut writer) = stream.split();
    let send = async {
        writer.write_all(translate_head(200_000, "").as_bytes()).await.unwrap();
        writer.write_all(&vec![7u8; 200_000]).await.unwrap();
    };
    let (answer, ()) = tokio::join!(read_answer(&mut reader), send);
    assert_eq!(answer.status(), 413, "{}", answer.head);
    assert_eq!(answer.json()["error"]["code"], "too_many_bytes");
    assert_eq!(answer.header("connection"), None);
    stream.write_all(HEALTHZ).await.unwrap();
    assert_eq!(read_answer(&mut stream).await.status(), 200);

    // Far beyond the limit and the drain allowance: answered at once, then closed.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(translate_head(150_000 + 64 * 1024 + 1024 * 1024 + 1, "").as_bytes()).await.unwrap();
    let answer = read_answer(&mut stream).await;
    assert_eq!(answer.status(), 413, "{}", answer.head);
    assert_eq!(answer.header("connection").as_deref(), Some("close"));
    closed_within(&mut stream, Instant::now(), SOON).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_heads_idle_connections_and_dribbled_bodies_are_cut_off() {
    let models = tiny_models_dir();
    let flags = ["--header-timeout-secs", "1", "--idle-timeout-secs", "2", "--body-timeout-ms", "2000"];
    let server = Server::start(models.path(), &flags).ready().await;

    // Half a request head, then nothing: closed after the header timeout, not before.
    // (Times are measured from before the client's first write, so never after the server's.)
    let mut slow_head = TcpStream::connect(server.addr).await.unwrap();
    let since = Instant::now();
    slow_head.write_all(b"POST /translate HTTP/1.1\r\nHost: test\r\n").await.unwrap();
    let waited = closed_within(&mut slow_head, since, Duration::from_secs(10)).await;
    assert!(waited >= Duration::from_secs(1), "closed after {waited:?}");

    // A kept-alive connection with nothing more to ask: closed after the idle timeout.
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    let since = Instant::now();
    idle.write_all(HEALTHZ).await.unwrap();
    assert_eq!(read_answer(&mut idle).await.status(), 200);
    let waited = closed_within(&mut idle, since, Duration::from_secs(20)).await;
    assert!(waited >= Duration::from_secs(2), "closed after {waited:?}");

    // A body dribbled a byte a second: 408 once the body deadline has passed.
    let mut dribble = TcpStream::connect(server.addr).await.unwrap();
    let (mut reader, mut writer) = dribble.split();
    let send = async {
        writer.write_all(translate_head(1000, "").as_bytes()).await.unwrap();
        for _ in 0..1000 {
            if writer.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let answer = tokio::select! {
        answer = tokio::time::timeout(Duration::from_secs(20), read_answer(&mut reader)) => answer,
        () = send => panic!("the whole body was sent"),
    };
    let answer = answer.expect("no answer within 10× the body timeout");
    assert_eq!(answer.status(), 408, "{}", answer.head);
    assert_eq!(answer.json()["error"]["code"], "timed_out");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_cap_wait_while_open_ones_are_served() {
    let models = tiny_models_dir();
    let server = Server::start(models.path(), &["--max-connections", "2"]).ready().await;
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    for stream in [&mut first, &mut second] {
        stream.write_all(HEALTHZ).await.unwrap();
        assert_eq!(read_answer(stream).await.status(), 200);
    }
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    third.write_all(HEALTHZ).await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_secs(1), third.peek(&mut byte)).await;
    assert!(early.is_err(), "a third connection was served beside two open ones");
    // The open connections keep being served meanwhile.
    first.write_all(HEALTHZ).await.unwrap();
    assert_eq!(read_answer(&mut first).await.status(), 200);
    drop(second);
    assert_eq!(read_answer(&mut third).await.status(), 200, "served once a connection closed");
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_guard_the_model_routes_and_metrics_have_their_own_port() {
    let models = tiny_models_dir();
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), "second-key\n\n  third-key  \n").unwrap();
    let metrics_port =
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let key_path = key_file.path().to_str().unwrap();
    let flags = ["--api-key", "first-key", "--api-key-file", key_path, "--metrics-port", &metrics_port];
    let server = Server::start(models.path(), &flags).ready().await;
    let client = reqwest::Client::new();
    let image = std::fs::read(fixture("gray16.png")).unwrap();
    let guarded = |authorization: Option<&str>| {
        let with = |request: reqwest::RequestBuilder| match authorization {
            Some(value) => request.header("authorization", value),
            None => request,
        };
        vec![
            with(client.get(server.url("/v1/models"))),
            with(client.get(server.url("/v1/models/tiny"))),
            with(client.post(server.url("/translate?direction=x2y")).body(image.clone())),
        ]
    };
    for authorization in
        [None, Some("Bearer nope"), Some("Bearer first-key-and-more"), Some("Basic first-key")]
    {
        for request in guarded(authorization) {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{authorization:?}");
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        }
    }
    for key in ["first-key", "second-key", "third-key"] {
        for request in guarded(Some(&format!("Bearer {key}"))) {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200, "{key}");
        }
    }
    for open in ["/healthz", "/readyz", "/", "/ui/app.js", "/openapi.yaml"] {
        assert_eq!(client.get(server.url(open)).send().await.unwrap().status(), 200, "{open}");
    }

    assert_eq!(client.get(server.url("/metrics")).send().await.unwrap().status(), 404);
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let metrics = client.get(&metrics_url).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let metrics = metrics.text().await.unwrap();
    assert!(metrics.contains("cycleserve_build_info"), "{metrics}");
    assert!(metrics.contains(r#"route="/translate",status="401""#), "{metrics}");
    let elsewhere = client.get(format!("http://127.0.0.1:{metrics_port}/v1/models")).send().await.unwrap();
    assert_eq!(elsewhere.status(), 404);
}

#[test]
fn any_origin_cors_with_api_keys_is_warned_about() {
    use std::io::{BufRead, BufReader};
    let models = tiny_models_dir();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cycleserve"))
        .args(["--host", "127.0.0.1", "--port", "0", "--log-format", "json", "--device", "cpu"])
        .args(["--cors-origins", "*", "--api-key", "secret-key-value"])
        .arg("--models-dir")
        .arg(models.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok) {
        let listening = line.contains("\"listening\"");
        log.push(line);
        if listening {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = log.join("\n");
    assert!(log.lines().any(|l| l.contains("WARN") && l.contains("CORS")), "{log}");
    assert!(!log.contains("secret-key-value"), "a key was logged: {log}");
}
