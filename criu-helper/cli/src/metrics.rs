//! `kybernate metrics`: the store's attempt journal as Prometheus text exposition (format
//! 0.0.4), printed once or served over HTTP at `/metrics`.
//!
//! Every number is computed from the journal when asked (`kybernate_checkpoint::journal`), so
//! the server holds no state of its own and a restarted server reports the same counters.
//! The server is hyper's HTTP/1 (already in the build through tonic): each request is
//! bounded in header size and time, connections are capped, and a bad request gets an HTTP
//! error, never a panic.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use kybernate_checkpoint::journal::{Histogram, Journal, KindTotals, Totals, DURATION_BUCKETS, FROZEN_BUCKETS};
use kybernate_checkpoint::Store;

use crate::error::CliError;
use crate::output::{self, Output};

/// Content type of the text exposition format.
pub const CONTENT_TYPE_0_0_4: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The port `--listen` examples and the installer's DaemonSet use.
pub const DEFAULT_PORT: u16 = 9474;
/// Connections served at once; more are closed on accept (a scraper needs one).
const MAX_CONNECTIONS: usize = 16;
/// A request's head must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection (keep-alive included) lives at most this long.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);

/// `kybernate metrics`: prints the exposition (or the totals as JSON), or serves it on `listen`.
pub fn metrics(store: &Store, out: Output, listen: Option<SocketAddr>) -> Result<ExitCode, CliError> {
    let journal = Journal::in_store(store.root());
    let Some(addr) = listen else {
        let totals = read(&journal)?;
        match out {
            Output::Json => output::json(&totals)?,
            Output::Table => output::write(&exposition(&totals))?,
        }
        return Ok(ExitCode::SUCCESS);
    };
    serve(journal, addr)
}

fn read(journal: &Journal) -> Result<Totals, CliError> {
    journal.totals().map_err(|e| {
        CliError::Failed(format!("{e}; check that the store's .journal directory is readable by you (usually root)"))
    })
}

/// Serves `/metrics` on `addr` until the process is stopped.
fn serve(journal: Journal, addr: SocketAddr) -> Result<ExitCode, CliError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("cannot start the HTTP server: {e}")))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            CliError::Failed(format!("cannot listen on {addr}: {e}; choose another address with --listen"))
        })?;
        eprintln!("kybernate: serving metrics of {} on http://{addr}/metrics", journal.dir().display());
        let journal = Arc::new(journal);
        let active = Arc::new(AtomicUsize::new(0));
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                // Out of descriptors and the like: pause instead of spinning.
                Err(e) => {
                    eprintln!("kybernate: metrics: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::AcqRel);
                drop(stream);
                continue;
            }
            let (journal, active) = (journal.clone(), active.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(journal.clone(), req));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(16 * 1024)
                    .serve_connection(TokioIo::new(stream), service);
                // Errors of one connection (a client gone, a malformed request) concern only it.
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
                active.fetch_sub(1, Ordering::AcqRel);
            });
        }
    })
}

async fn handle(journal: Arc<Journal>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    match req.uri().path() {
        "/metrics" => {}
        "/" => return Ok(reply(StatusCode::OK, "kybernate metrics: see /metrics\n".into())),
        _ => return Ok(reply(StatusCode::NOT_FOUND, "not found: see /metrics\n".into())),
    }
    // Reading the journal is blocking file I/O (a few MiB at most).
    let totals = tokio::task::spawn_blocking(move || journal.totals()).await;
    Ok(match totals {
        Ok(Ok(t)) => {
            let mut r = reply(StatusCode::OK, exposition(&t));
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_0_0_4));
            r
        }
        Ok(Err(e)) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("reading the journal failed: {e}\n")),
    })
}

/// The text exposition of `t`: every family with HELP and TYPE, counters that start at zero
/// present from the start (so that `rate()` sees the first attempt).
pub fn exposition(t: &Totals) -> String {
    let mut w = Writer(String::new());
    kind_families(&mut w, "checkpoint", "checkpoints", &t.checkpoint, true);
    kind_families(&mut w, "restore", "restores", &t.restore, false);
    w.family(
        "kybernate_journal_skipped_lines_total",
        "counter",
        "Lines of the attempt journal that could not be read (not counted in any other metric).",
    );
    w.sample("kybernate_journal_skipped_lines_total", &[], t.skipped_lines as f64);
    w.0
}

fn kind_families(w: &mut Writer, kind: &str, plural: &str, k: &KindTotals, checkpoint: bool) {
    let total = format!("kybernate_{plural}_total");
    w.family(&total, "counter", &format!("{} attempts, by result (ok or error).", title(kind)));
    w.sample(&total, &[("result", "ok")], k.ok as f64);
    w.sample(&total, &[("result", "error")], k.error as f64);

    let errors = format!("kybernate_{kind}_errors_total");
    w.family(&errors, "counter", &format!("Failed {kind} attempts, by error class."));
    for (class, n) in &k.errors {
        w.sample(&errors, &[("class", class)], *n as f64);
    }

    let duration = format!("kybernate_{kind}_duration_seconds");
    w.family(&duration, "histogram", &format!("Duration of successful {plural}, from the request to the result."));
    w.histogram(&duration, &k.duration, &DURATION_BUCKETS);

    let phases = format!("kybernate_{kind}_phase_seconds_total");
    w.family(&phases, "counter", &format!("Time spent in each phase of {kind} attempts."));
    for (phase, s) in &k.phase_seconds {
        w.sample(&phases, &[("phase", phase)], *s);
    }

    let (bytes_help, gpu_help) = if checkpoint {
        ("Bytes written by successful checkpoints.", "Bytes of GPU device memory in successful checkpoints.")
    } else {
        ("Bytes of the checkpoints of successful restores.", "Bytes of GPU device memory restored.")
    };
    let bytes = format!("kybernate_{kind}_bytes_total");
    w.family(&bytes, "counter", bytes_help);
    w.sample(&bytes, &[], k.bytes as f64);
    let gpu = format!("kybernate_{kind}_gpu_bytes_total");
    w.family(&gpu, "counter", gpu_help);
    w.sample(&gpu, &[], k.gpu_bytes as f64);

    if checkpoint {
        let frozen = "kybernate_checkpoint_frozen_seconds";
        w.family(
            frozen,
            "histogram",
            "How long checkpoints kept the container frozen (freeze to thaw, or to the kill with exit), failed ones too.",
        );
        w.histogram(frozen, &k.frozen, &FROZEN_BUCKETS);
    }
    if k.last_success > 0.0 {
        let last = format!("kybernate_{kind}_last_success_timestamp_seconds");
        w.family(&last, "gauge", &format!("Unix time at which the last successful {kind} ended."));
        w.sample(&last, &[], k.last_success);
    }
}

fn title(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

/// Builds the exposition text.
struct Writer(String);

impl Writer {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // HELP text escapes backslash and newline.
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {}", number(value));
    }

    fn histogram(&mut self, name: &str, h: &Histogram, bounds: &[f64]) {
        let bucket = format!("{name}_bucket");
        let counts = h.cumulative(bounds);
        for (bound, n) in bounds.iter().zip(&counts) {
            self.sample(&bucket, &[("le", &number(*bound))], *n as f64);
        }
        self.sample(&bucket, &[("le", "+Inf")], h.count as f64);
        self.sample(&format!("{name}_sum"), &[], h.sum);
        self.sample(&format!("{name}_count"), &[], h.count as f64);
    }
}

/// A sample value as Prometheus reads it (Go's float syntax; integers without a fraction).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// `--listen`: `HOST:PORT`, or `:PORT` for every address.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = if s.starts_with(':') { format!("0.0.0.0{s}") } else { s.to_string() };
    s.parse().map_err(|e| format!("{e} (expected HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT} or :{DEFAULT_PORT})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kybernate_checkpoint::journal::{Attempt, Clock, Kind};

    fn totals() -> Totals {
        let mut t = Totals::default();
        for (kind, ok, ms, frozen) in [
            (Kind::Checkpoint, true, 300, Some(120)),
            (Kind::Checkpoint, true, 7000, Some(40)),
            (Kind::Checkpoint, false, 10, None),
            (Kind::Restore, true, 400, None),
        ] {
            let mut a = Attempt::new(kind, &Clock::start());
            a.duration_ms = ms;
            a.frozen_ms = frozen;
            a.bytes = 1 << 20;
            a.phases_ms.insert("dump".into(), ms / 2);
            if !ok {
                a.failed("preflight \"space\"\n", "no space");
            }
            t.add(&a);
        }
        t
    }

    /// Every sample line is `name{labels} value` with a family declared before it by HELP and
    /// TYPE, names and label names as Prometheus allows them, histograms complete.
    #[test]
    fn the_exposition_is_well_formed() {
        let text = exposition(&totals());
        let mut declared = std::collections::HashMap::new();
        let valid_name = |n: &str| {
            n.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(valid_name(name), "{line}");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "counter without _total: {line}");
                }
                declared.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok() || value == "+Inf", "{line}");
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| declared.get(*f).is_some_and(|k| k == "histogram")))
                .unwrap_or(name);
            assert!(declared.contains_key(family), "sample before its TYPE: {line}");
        }
        for name in [
            "kybernate_checkpoints_total",
            "kybernate_restores_total",
            "kybernate_checkpoint_duration_seconds",
            "kybernate_restore_duration_seconds",
            "kybernate_checkpoint_bytes_total",
            "kybernate_checkpoint_frozen_seconds",
        ] {
            assert!(declared.contains_key(name), "{name} missing:\n{text}");
        }
        assert!(text.contains("kybernate_checkpoints_total{result=\"ok\"} 2\n"), "{text}");
        assert!(text.contains("kybernate_checkpoints_total{result=\"error\"} 1\n"), "{text}");
        assert!(text.contains("kybernate_restores_total{result=\"error\"} 0\n"), "{text}");
        assert!(text.contains("kybernate_checkpoint_errors_total{class=\"preflight \\\"space\\\"\\n\"} 1\n"), "{text}");
        assert!(text.contains("kybernate_checkpoint_duration_seconds_bucket{le=\"0.5\"} 1\n"), "{text}");
        assert!(text.contains("kybernate_checkpoint_duration_seconds_bucket{le=\"10\"} 2\n"), "{text}");
        assert!(text.contains("kybernate_checkpoint_duration_seconds_bucket{le=\"+Inf\"} 2\n"), "{text}");
        assert!(text.contains("kybernate_checkpoint_duration_seconds_sum 7.3\n"), "{text}");
        assert!(text.contains("kybernate_checkpoint_frozen_seconds_bucket{le=\"0.05\"} 1\n"), "{text}");
        assert!(text.contains("kybernate_checkpoint_frozen_seconds_count 2\n"), "{text}");
        assert!(text.contains("kybernate_checkpoint_bytes_total 2097152\n"), "{text}");
        assert!(text.contains("kybernate_checkpoint_phase_seconds_total{phase=\"dump\"} 3.655\n"), "{text}");
        assert!(text.ends_with("kybernate_journal_skipped_lines_total 0\n"));
    }

    #[test]
    fn an_empty_journal_still_declares_every_counter() {
        let text = exposition(&Totals::default());
        assert!(text.contains("kybernate_checkpoints_total{result=\"ok\"} 0\n"));
        assert!(text.contains("kybernate_checkpoint_frozen_seconds_count 0\n"));
        assert!(!text.contains("last_success"), "no timestamp before a success");
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen(":9474").unwrap(), "0.0.0.0:9474".parse().unwrap());
        assert_eq!(parse_listen("[::1]:80").unwrap(), "[::1]:80".parse().unwrap());
        assert!(parse_listen("localhost").unwrap_err().contains("HOST:PORT"));
    }
}
