//! `cycleserve healthcheck`: exit 0 when the server answers 200, 1 otherwise — for container
//! health checks on images without curl.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

/// Longest status line accepted ("HTTP/1.1 503 Service Unavailable\r\n" is 34 bytes).
const MAX_STATUS_LINE: u64 = 1024;

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

/// One HTTP/1.1 GET, all of it within `timeout`; returns the status code.
fn get_status(url: &str, timeout: Duration) -> anyhow::Result<u16> {
    let deadline = Instant::now() + timeout;
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
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")?;
    read_status(UntilDeadline { stream: &stream, deadline })
        .with_context(|| format!("no HTTP status line from {authority}"))
}

/// Reads the status line, however the server splits it over packets, up to its CRLF and at most
/// [`MAX_STATUS_LINE`] bytes; returns its status code.
fn read_status(reader: impl Read) -> anyhow::Result<u16> {
    let mut line = Vec::new();
    BufReader::new(reader.take(MAX_STATUS_LINE)).read_until(b'\n', &mut line)?;
    let Some(line) = line.strip_suffix(b"\r\n") else {
        bail!("the response ended before a CRLF, or its first line exceeds {MAX_STATUS_LINE} bytes");
    };
    let line = String::from_utf8_lossy(line);
    let mut fields = line.split(' ');
    let (version, code) = (fields.next().unwrap_or_default(), fields.next().unwrap_or_default());
    if !version.starts_with("HTTP/") || code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        bail!("malformed status line `{}`", line.escape_debug());
    }
    Ok(code.parse()?)
}

/// A stream whose reads all end by one deadline, so a server trickling bytes cannot stretch
/// the check past its timeout.
struct UntilDeadline<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Read for UntilDeadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        let mut stream = self.stream;
        stream.set_read_timeout(Some(left))?;
        stream.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out its bytes `chunk` at a time, as a server writing in pieces would.
    struct Trickle<'a> {
        bytes: &'a [u8],
        chunk: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.chunk.min(buf.len()).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    fn status(bytes: &[u8], chunk: usize) -> anyhow::Result<u16> {
        read_status(Trickle { bytes, chunk })
    }

    #[test]
    fn status_line_split_into_pieces_is_read_whole() {
        let response = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        for chunk in [1, 2, 3, 7, 64] {
            assert_eq!(status(response, chunk).unwrap(), 200, "chunks of {chunk}");
        }
        assert_eq!(status(b"HTTP/1.1 503 Service Unavailable\r\n\r\n", 5).unwrap(), 503);
    }

    #[test]
    fn incomplete_or_foreign_status_lines_are_refused() {
        let cut = status(b"HTTP/1.1 20", 4).unwrap_err().to_string();
        assert!(cut.contains("ended before a CRLF"), "{cut}");
        let endless = vec![b'a'; 4096];
        assert!(status(&endless, 100).unwrap_err().to_string().contains("exceeds 1024 bytes"));
        for line in [&b"SSH-2.0-OpenSSH_9.6\r\n"[..], b"HTTP/1.1 2000 OK\r\n", b"HTTP/1.1 OK\r\n"] {
            let err = status(line, 64).unwrap_err().to_string();
            assert!(err.contains("malformed status line"), "{err}");
        }
    }
}
