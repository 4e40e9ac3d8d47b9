//! `cycleserve healthcheck`: exit 0 when the server answers 200, 1 otherwise — for container
//! health checks on images without curl.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// URL to GET (plain http).
    #[arg(long, env = "CYCLESERVE_HEALTHCHECK_URL")]
    url: Option<String>,
    /// Port of the local server, when no --url is given.
    #[arg(long, env = "CYCLESERVE_PORT", default_value_t = 8080)]
    port: u16,
    /// Seconds before giving up.
    #[arg(long, default_value_t = 5)]
    timeout_secs: u64,
}

pub fn run(args: HealthcheckArgs) -> anyhow::Result<()> {
    let url = args.url.unwrap_or_else(|| format!("http://127.0.0.1:{}/readyz", args.port));
    let status = get_status(&url, Duration::from_secs(args.timeout_secs))?;
    if status != 200 {
        bail!("{url} answered {status}");
    }
    Ok(())
}

/// One HTTP/1.1 GET; returns the status code.
fn get_status(url: &str, timeout: Duration) -> anyhow::Result<u16> {
    let rest = url.strip_prefix("http://").context("only http:// URLs are supported")?;
    let (authority, path) =
        rest.split_once('/').map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {authority}"))?
        .next()
        .with_context(|| format!("cannot resolve {authority}"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to {authority}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP response from {authority}"))
}
