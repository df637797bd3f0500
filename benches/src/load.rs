//! A closed-loop HTTP load runner: `concurrency` clients, each sending its next request as soon
//! as the previous one is answered, with a latency histogram (hdrhistogram, microseconds) per
//! request kind.
//!
//! Latency is measured from sending the request until the whole response body has been read.
//! The client does as little as it can per response (a byte scan to count search entries; a
//! JSON parse only of batch responses, to count accepted entries), because on a small machine
//! it shares the cores with the server it measures, and the same client cost applies to the
//! baseline.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;

use crate::BenchError;

/// HTTP method of a benchmark request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// GET
    Get,
    /// POST
    Post,
    /// PUT
    Put,
}

impl Method {
    /// The method's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
        }
    }
}

/// What the response body is, so the runner knows what to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A batch/transaction-response Bundle: count its entries with a 2xx status.
    BatchResponse,
    /// One resource written: 1 on a 2xx.
    Single,
    /// A searchset Bundle: count its entries; follow `next` links.
    Searchset,
}

/// One request of a workload.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    /// The kind it is reported under.
    pub kind: Arc<str>,
    /// Method.
    pub method: Method,
    /// Path and query, from the server root (`/fhir/default/Observation?code=…`).
    pub path: String,
    /// Request body (cheap to clone).
    pub body: Option<Bytes>,
    /// `If-None-Exist` header (conditional create).
    pub if_none_exist: Option<String>,
    /// Resources in the body.
    pub sent_resources: u32,
    /// What the response is.
    pub expect: Expect,
    /// For searches: how many `next` pages to follow after the first (each is a request of its
    /// own in the figures).
    pub follow_next: u32,
}

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Every request of the plan once.
    Once,
    /// This many plan items, cycling through the plan.
    Count(u64),
    /// Cycle through the plan for this long.
    Duration(Duration),
}

/// How to run a plan.
#[derive(Clone)]
pub struct RunOptions {
    /// Concurrent clients.
    pub concurrency: usize,
    /// When to stop.
    pub stop: Stop,
    /// Send `Prefer: return=minimal` on writes.
    pub prefer_minimal: bool,
    /// Keep each distinct response (for the baseline).
    pub recorder: Option<Arc<Recorder>>,
    /// Advanced by the resources of each finished request.
    pub progress: Option<ProgressBar>,
}

/// The figures of one kind of request.
#[derive(Debug, Clone)]
pub struct KindStats {
    /// Requests answered or failed.
    pub requests: u64,
    /// Answers with a 2xx (and, for batches, no failed entry).
    pub ok: u64,
    /// Everything else, transport failures included.
    pub errors: u64,
    /// Count per HTTP status (0: no answer).
    pub statuses: BTreeMap<u16, u64>,
    /// Resources returned (searches) or accepted (writes).
    pub resources: u64,
    /// Batch entries answered with a non-2xx status.
    pub entry_errors: u64,
    /// Response bytes.
    pub bytes: u64,
    /// Latency in microseconds.
    pub latency_us: Histogram<u64>,
    /// The first error answer, to show what went wrong.
    pub first_error: Option<String>,
}

impl KindStats {
    fn new() -> KindStats {
        KindStats {
            requests: 0,
            ok: 0,
            errors: 0,
            statuses: BTreeMap::new(),
            resources: 0,
            entry_errors: 0,
            bytes: 0,
            // 1 µs to 10 min at 3 significant digits: ~100 KiB per histogram, fine per kind.
            latency_us: Histogram::new_with_bounds(1, 600_000_000, 3)
                .expect("constant histogram bounds are valid"),
            first_error: None,
        }
    }

    fn merge(&mut self, o: &KindStats) {
        self.requests += o.requests;
        self.ok += o.ok;
        self.errors += o.errors;
        for (s, n) in &o.statuses {
            *self.statuses.entry(*s).or_default() += n;
        }
        self.resources += o.resources;
        self.entry_errors += o.entry_errors;
        self.bytes += o.bytes;
        let _ = self.latency_us.add(&o.latency_us);
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.first_error);
        }
    }
}

/// The result of one run of a plan.
#[derive(Debug, Clone)]
pub struct RunStats {
    /// Concurrent clients.
    pub concurrency: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Per kind.
    pub kinds: BTreeMap<String, KindStats>,
}

impl RunStats {
    /// All kinds together.
    pub fn total(&self) -> KindStats {
        let mut t = KindStats::new();
        for k in self.kinds.values() {
            t.merge(k);
        }
        t
    }
}

/// The responses a server gave, one per [`record_key`], to be served by the baseline.
#[derive(Debug, Default)]
pub struct Recorder {
    map: Mutex<HashMap<String, Recorded>>,
}

/// One recorded response.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// The body bytes.
    pub body: Bytes,
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// Keeps `r` under `key` unless a response is there already.
    pub fn record(&self, key: String, r: impl FnOnce() -> Recorded) {
        if let Ok(mut m) = self.map.lock() {
            m.entry(key).or_insert_with(r);
        }
    }

    /// Whether `key` has a response.
    pub fn contains(&self, key: &str) -> bool {
        self.map
            .lock()
            .map(|m| m.contains_key(key))
            .unwrap_or(false)
    }

    /// Everything recorded.
    pub fn snapshot(&self) -> HashMap<String, Recorded> {
        self.map.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// How many responses are recorded.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key under which a response is recorded and served: a GET by its path and query; a
/// write by its method and path, with a `PUT`'s id left out (every `PUT Patient/{id}` gets the
/// same answer from the baseline).
pub fn record_key(method: &str, path_and_query: &str) -> String {
    match method {
        "GET" | "HEAD" => format!("GET {path_and_query}"),
        "PUT" => {
            let path = path_and_query.split('?').next().unwrap_or_default();
            let base = path.rsplit_once('/').map_or(path, |(b, _)| b);
            format!("PUT {base}/*")
        }
        m => format!(
            "{m} {}",
            path_and_query.split('?').next().unwrap_or_default()
        ),
    }
}

/// A client for benchmark traffic: no proxy (all traffic stays on this machine), Nagle off, a
/// connection pool as large as the concurrency; `bearer` goes into every request's
/// `Authorization` header.
pub fn client(concurrency: usize, bearer: Option<&str>) -> Result<reqwest::Client, BenchError> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = bearer {
        let v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|e| BenchError::new(format!("the bearer token is not a header value: {e}")))?;
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(concurrency.max(1))
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| BenchError::new(format!("cannot build the HTTP client: {e}")))
}

/// Runs `plan` against the server at `origin` (`http://127.0.0.1:port`) and returns its
/// figures. Must be called inside a tokio runtime.
pub async fn run(
    client: &reqwest::Client,
    origin: &str,
    plan: Arc<Vec<HttpRequest>>,
    opts: &RunOptions,
) -> RunStats {
    let concurrency = opts.concurrency.max(1);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = match opts.stop {
        Stop::Duration(d) => Some(start + d),
        _ => None,
    };
    let limit = match opts.stop {
        Stop::Once => plan.len() as u64,
        Stop::Count(n) => n,
        Stop::Duration(_) => u64::MAX,
    };
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let client = client.clone();
        let origin = origin.to_string();
        let plan = plan.clone();
        let next = next.clone();
        let opts = opts.clone();
        tasks.push(tokio::spawn(async move {
            let mut kinds: HashMap<Arc<str>, KindStats> = HashMap::new();
            if plan.is_empty() {
                return kinds;
            }
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= limit {
                    break;
                }
                let req = &plan[(i % plan.len() as u64) as usize];
                let stats = kinds.entry(req.kind.clone()).or_insert_with(KindStats::new);
                let mut path = req.path.clone();
                let mut pages = 0;
                loop {
                    let next_page = one(&client, &origin, req, &path, &opts, stats).await;
                    pages += 1;
                    match next_page {
                        Some(p) if pages <= req.follow_next => path = p,
                        _ => break,
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                }
                if let Some(pb) = &opts.progress {
                    pb.inc(u64::from(req.sent_resources.max(1)));
                }
            }
            kinds
        }));
    }
    let mut kinds: BTreeMap<String, KindStats> = BTreeMap::new();
    for t in tasks {
        if let Ok(k) = t.await {
            for (name, s) in k {
                kinds
                    .entry(name.to_string())
                    .or_insert_with(KindStats::new)
                    .merge(&s);
            }
        }
    }
    RunStats {
        concurrency,
        elapsed: start.elapsed(),
        kinds,
    }
}

/// Sends one request and records it; returns the path of the `next` page, if any.
async fn one(
    client: &reqwest::Client,
    origin: &str,
    req: &HttpRequest,
    path: &str,
    opts: &RunOptions,
    stats: &mut KindStats,
) -> Option<String> {
    let url = format!("{origin}{path}");
    let mut b = match req.method {
        Method::Get => client.get(&url),
        Method::Post => client.post(&url),
        Method::Put => client.put(&url),
    }
    .header("accept", "application/fhir+json");
    if let Some(body) = &req.body {
        b = b
            .header("content-type", "application/fhir+json")
            .body(body.clone());
        if opts.prefer_minimal {
            b = b.header("prefer", "return=minimal");
        }
    }
    if let Some(c) = &req.if_none_exist {
        b = b.header("if-none-exist", c.as_str());
    }
    let t0 = Instant::now();
    let sent = b.send().await;
    let (status, content_type, body) = match sent {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let ct = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            match resp.bytes().await {
                Ok(body) => (status, ct, body),
                Err(e) => (0, None, Bytes::from(e.to_string())),
            }
        }
        Err(e) => (0, None, Bytes::from(e.to_string())),
    };
    let us = t0.elapsed().as_micros().max(1) as u64;
    let _ = stats.latency_us.record(us.min(600_000_000));
    stats.requests += 1;
    *stats.statuses.entry(status).or_default() += 1;
    stats.bytes += body.len() as u64;
    let success = (200..300).contains(&status);
    let mut next = None;
    let mut entries_failed = 0;
    if success {
        match req.expect {
            Expect::Single => stats.resources += 1,
            Expect::BatchResponse => {
                let (ok, failed) = batch_outcome(&body);
                stats.resources += ok.min(u64::from(req.sent_resources));
                entries_failed = failed;
            }
            Expect::Searchset => {
                stats.resources += count_entries(&body);
                next = next_link(&body);
            }
        }
    }
    stats.entry_errors += entries_failed;
    if success && entries_failed == 0 {
        stats.ok += 1;
    } else {
        stats.errors += 1;
        if stats.first_error.is_none() {
            let text = String::from_utf8_lossy(&body[..body.len().min(400)]).into_owned();
            stats.first_error = Some(format!("{} {path} → {status}: {text}", req.method.as_str()));
        }
    }
    if let Some(rec) = &opts.recorder
        && status != 0
    {
        rec.record(record_key(req.method.as_str(), path), || Recorded {
            status,
            content_type,
            body,
        });
    }
    next
}

/// (entries with a 2xx status, entries with another status) of a batch-response Bundle.
pub fn batch_outcome(body: &[u8]) -> (u64, u64) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (0, 0);
    };
    let mut ok = 0;
    let mut failed = 0;
    for e in v["entry"].as_array().map(Vec::as_slice).unwrap_or_default() {
        match e["response"]["status"].as_str() {
            Some(s) if s.starts_with('2') => ok += 1,
            _ => failed += 1,
        }
    }
    (ok, failed)
}

/// Entries of a searchset Bundle, counted by their `fullUrl` member without parsing it.
pub fn count_entries(body: &[u8]) -> u64 {
    const NEEDLE: &[u8] = b"\"fullUrl\"";
    let mut n = 0;
    let mut i = 0;
    while let Some(pos) = body[i..].iter().position(|&b| b == b'"') {
        let at = i + pos;
        if body[at..].starts_with(NEEDLE) {
            n += 1;
            i = at + NEEDLE.len();
        } else {
            i = at + 1;
        }
    }
    n
}

/// The path and query of a Bundle's `next` link. The link's origin is dropped so that the
/// runner asks the server it is measuring (the baseline serves links recorded from the real
/// server, which name the real server's address).
pub fn next_link(body: &[u8]) -> Option<String> {
    let url = fast_next_link(body).or_else(|| {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        v["link"]
            .as_array()?
            .iter()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(str::to_string)
    })?;
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let start = rest.find('/')?;
    Some(rest[start..].to_string())
}

/// `"relation":"next","url":"…"` in compact output, where links come before the entries.
fn fast_next_link(body: &[u8]) -> Option<String> {
    const REL: &[u8] = b"\"relation\":\"next\",\"url\":\"";
    let head = &body[..body.len().min(8192)];
    let at = head.windows(REL.len()).position(|w| w == REL)? + REL.len();
    let len = body[at..].iter().position(|&b| b == b'"' || b == b'\\')?;
    if body[at + len] == b'\\' {
        return None;
    }
    String::from_utf8(body[at..at + len].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_group_puts_and_keep_get_queries() {
        assert_eq!(
            record_key("GET", "/fhir/t/Observation?code=x"),
            "GET /fhir/t/Observation?code=x"
        );
        assert_eq!(record_key("POST", "/fhir/t?x=1"), "POST /fhir/t");
        assert_eq!(
            record_key("PUT", "/fhir/t/Patient/p1-3"),
            "PUT /fhir/t/Patient/*"
        );
    }

    #[test]
    fn entries_and_next_links_are_found() {
        let b = br#"{"resourceType":"Bundle","type":"searchset","link":[{"relation":"self","url":"http://127.0.0.1:9/fhir/t/Observation?a=1"},{"relation":"next","url":"http://127.0.0.1:9/fhir/t/Observation?a=1&_page=2"}],"entry":[{"fullUrl":"x","resource":{"note":"\"fullUrl\""}},{"fullUrl":"y"}]}"#;
        // The escaped quote inside a string is not a member name.
        assert_eq!(count_entries(b), 2);
        assert_eq!(
            next_link(b).as_deref(),
            Some("/fhir/t/Observation?a=1&_page=2")
        );
        let pretty = br#"{"link": [{"relation": "next", "url": "http://h/fhir/t/X?p=2"}]}"#;
        assert_eq!(next_link(pretty).as_deref(), Some("/fhir/t/X?p=2"));
        assert_eq!(next_link(br#"{"link":[]}"#), None);
    }

    #[test]
    fn batch_outcomes_count_entry_statuses() {
        let b = br#"{"resourceType":"Bundle","type":"batch-response","entry":[{"response":{"status":"201 Created"}},{"response":{"status":"200 OK"}},{"response":{"status":"400 Bad Request"}}]}"#;
        assert_eq!(batch_outcome(b), (2, 1));
        assert_eq!(batch_outcome(b"not json"), (0, 0));
    }
}
