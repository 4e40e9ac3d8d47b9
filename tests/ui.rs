//! The try-it page at `/`: served from the binary with its security headers, its assets loadable
//! under a self-only Content-Security-Policy (nothing inline), and gone with `--ui false`.
//! `.ci/ui_e2e.py` drives the same page in a real browser.

mod common;

use common::server::Server;
use common::*;
use reqwest::header::CONTENT_TYPE;
use reqwest::{Client, Response, StatusCode};

fn assert_security_headers(response: &Response) {
    let headers = response.headers();
    let csp = headers["content-security-policy"].to_str().unwrap();
    for directive in
        ["default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' blob: data:"]
    {
        assert!(csp.contains(directive), "`{directive}` missing from {csp}");
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["referrer-policy"], "no-referrer");
}

async fn get(client: &Client, server: &Server, path: &str) -> Response {
    client.get(server.url(path)).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn page_and_assets_are_served_with_security_headers() {
    let models = tiny_models_dir();
    let server = Server::start(models.path(), &[]);
    let client = Client::new();

    let page = get(&client, &server, "/").await;
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
    assert_security_headers(&page);
    let html = page.text().await.unwrap();
    assert!(html.starts_with("<!doctype html>"));
    // The policy forbids inline code and styles: the page must not need any.
    assert!(!html.contains("<style") && !html.contains(" style="), "inline styles in the page");
    assert!(!html.contains(" onclick=") && !html.contains(" onload="), "inline handlers in the page");
    for script in html.split("<script").skip(1) {
        let tag = &script[..script.find('>').unwrap()];
        assert!(tag.contains("src=\"/ui/"), "a script without a same-origin src: <script{tag}>");
    }

    for (path, content_type, needle) in [
        ("/ui/app.js", "text/javascript; charset=utf-8", "/translate?"),
        ("/ui/app.css", "text/css; charset=utf-8", "prefers-color-scheme"),
    ] {
        assert!(html.contains(&format!("\"{path}\"")), "the page does not load {path}");
        let asset = get(&client, &server, path).await;
        assert_eq!(asset.status(), StatusCode::OK, "{path}");
        assert_eq!(asset.headers()[CONTENT_TYPE], content_type, "{path}");
        assert_security_headers(&asset);
        assert!(asset.text().await.unwrap().contains(needle), "{path}");
    }

    let unknown = get(&client, &server, "/ui/other.js").await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(unknown.headers()[CONTENT_TYPE], "application/json");
}

#[tokio::test(flavor = "multi_thread")]
async fn ui_false_leaves_root_a_json_404() {
    let models = tiny_models_dir();
    let server = Server::start(models.path(), &["--ui", "false"]);
    let client = Client::new();
    for path in ["/", "/ui/app.js", "/ui/app.css"] {
        let response = get(&client, &server, path).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json", "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found", "{path}");
    }
    // The API itself is unaffected.
    assert_eq!(get(&client, &server, "/healthz").await.status(), StatusCode::OK);
}
