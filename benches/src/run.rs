//! A whole benchmark run: start (or reach) the server, ingest, search, measure the baseline with
//! the same requests at the same concurrency, write the report.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::BenchError;
use crate::baseline;
use crate::generate::{BundleType, Dataset, DatasetConfig};
use crate::load::{self, HttpRequest, Recorder, RunOptions, RunStats, Stop};
use crate::report::{Machine, Phase, Report, ReportFiles};
use crate::server::{RunningServer, check_loopback};
use crate::workload::{self, IngestMode};

/// Which server to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A server that is already running, at this URL (loopback only).
    Url(String),
    /// The real server, started in this process over a data folder (`None`: a temporary one).
    Spawn {
        /// The data folder; keep it to search later without loading again.
        data: Option<PathBuf>,
        /// Auth on: every request carries a token that is checked, and is audited (see
        /// [`crate::auth`]).
        auth: bool,
    },
}

/// The ingest benchmark.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Bundles or single requests.
    pub mode: IngestMode,
    /// Entries per Bundle.
    pub batch_size: usize,
    /// `batch` or `transaction`.
    pub bundle_type: BundleType,
    /// Concurrent clients.
    pub concurrency: usize,
    /// In batch mode, also this many fresh patients' data as single requests (0: none).
    pub single_patients: usize,
    /// Send `Prefer: return=minimal`.
    pub prefer_minimal: bool,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            mode: IngestMode::Batch,
            batch_size: 100,
            bundle_type: BundleType::Batch,
            concurrency: 4,
            single_patients: 2,
            prefer_minimal: true,
        }
    }
}

/// The search benchmark.
#[derive(Debug, Clone)]
pub struct SearchConfig {
    /// Concurrency levels, each measured on the server and on the baseline.
    pub concurrency: Vec<usize>,
    /// How long (or how many requests) per level.
    pub stop: Stop,
    /// Distinct search requests in the plan.
    pub plan_size: usize,
    /// Pages followed by a paging request (first page included).
    pub max_pages: u32,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            concurrency: vec![1, 2, 4, 8],
            stop: Stop::Duration(Duration::from_secs(10)),
            plan_size: 300,
            max_pages: 5,
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The server.
    pub target: Target,
    /// Its tenant.
    pub tenant: String,
    /// The data to load (ingest) and to ask about (search).
    pub dataset: DatasetConfig,
    /// The ingest benchmark, if any (without it, the data is taken as loaded).
    pub ingest: Option<IngestConfig>,
    /// The search benchmark, if any.
    pub search: Option<SearchConfig>,
    /// Measure the in-memory baseline beside the server.
    pub baseline: bool,
    /// Where the report goes.
    pub out: PathBuf,
    /// Show a progress bar while loading (only drawn on a terminal).
    pub progress: bool,
    /// The command line, for the report.
    pub command: String,
    /// Extra notes for the report (e.g. "shared, noisy VM").
    pub notes: Vec<String>,
    /// A bearer token for every request (a server reached by URL with auth on); a spawned
    /// server with `auth` makes its own.
    pub bearer: Option<String>,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// The report.
    pub report: Report,
    /// Its files.
    pub files: ReportFiles,
}

/// Runs the benchmark and writes its report to `cfg.out`.
pub fn run(cfg: &BenchConfig) -> Result<RunOutput, BenchError> {
    let started = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let mut bearer = cfg.bearer.clone();
    let (server, origin, target_desc) = match &cfg.target {
        Target::Url(u) => (None, check_loopback(u)?, format!("running server at {u}")),
        Target::Spawn { data, auth } => {
            let s = if *auth {
                let (s, token) = RunningServer::fhir_with_auth(data.as_deref(), &cfg.tenant)?;
                bearer = Some(token);
                s
            } else {
                RunningServer::fhir(data.as_deref(), &cfg.tenant)?
            };
            let o = s.origin().to_string();
            let where_ = data
                .as_ref()
                .map_or("a temporary data folder".to_string(), |d| {
                    format!("data folder {}", d.display())
                });
            (
                Some(s),
                o,
                format!(
                    "fhir-server in-process (redb, auth {}) over {where_}",
                    if *auth { "on" } else { "off" }
                ),
            )
        }
    };
    // The client gets a runtime of its own; each server has its own thread and runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-client")
        .build()?;
    let mut report = Report {
        tool: "fhir-bench".into(),
        started,
        command: cfg.command.clone(),
        machine: Machine::detect(),
        target: target_desc,
        dataset: None,
        phases: Vec::new(),
        index_catch_up_s: None,
        notes: cfg.notes.clone(),
    };
    let cfg = BenchConfig {
        bearer,
        ..cfg.clone()
    };
    let result = rt.block_on(measure(&cfg, &origin, &mut report));
    drop(rt);
    drop(server);
    result?;
    let files = report.write(&cfg.out)?;
    Ok(RunOutput { report, files })
}

async fn measure(cfg: &BenchConfig, origin: &str, report: &mut Report) -> Result<(), BenchError> {
    let tenant = &cfg.tenant;
    prepare_tenant(
        origin,
        tenant,
        matches!(cfg.target, Target::Url(_)),
        cfg.bearer.as_deref(),
    )
    .await?;
    let dataset = Dataset::new(cfg.dataset.clone());
    if let Some(ic) = &cfg.ingest {
        ingest(cfg, ic, &dataset, origin, report).await?;
    } else {
        report.dataset = Some(dataset.summary());
    }
    if let Some(sc) = &cfg.search {
        search(cfg, sc, origin, report).await?;
    }
    // One note per (phase, kind) that failed, however many concurrency levels it failed at.
    let mut failed: Vec<(String, String, u64, u64, String)> = Vec::new();
    for p in &report.phases {
        for k in &p.server.kinds {
            if k.errors == 0 {
                continue;
            }
            match failed.iter_mut().find(|f| f.0 == p.name && f.1 == k.kind) {
                Some(f) => {
                    f.2 += k.errors;
                    f.3 += k.requests;
                }
                None => failed.push((
                    p.name.clone(),
                    k.kind.clone(),
                    k.errors,
                    k.requests,
                    k.first_error.clone().unwrap_or_default(),
                )),
            }
        }
    }
    for (phase, kind, errors, requests, first) in failed {
        let first: String = first.chars().take(300).collect();
        report.notes.push(format!(
            "{phase} '{kind}': {errors} of {requests} requests failed; the first: {first}"
        ));
    }
    Ok(())
}

/// Checks that the tenant answers; on a server reached by URL, creates it if it is missing.
async fn prepare_tenant(
    origin: &str,
    tenant: &str,
    create: bool,
    bearer: Option<&str>,
) -> Result<(), BenchError> {
    let client = load::client(1, bearer)?;
    let metadata = format!("{origin}/fhir/{tenant}/metadata");
    let status = |r: Result<reqwest::Response, reqwest::Error>| match r {
        Ok(r) => Ok(r.status().as_u16()),
        Err(e) => Err(BenchError::new(format!("cannot reach {origin}: {e}"))),
    };
    let mut s = status(client.get(&metadata).send().await)?;
    if s == 404 && create {
        let body = serde_json::json!({"id": tenant, "name": "Benchmark tenant"});
        let _ = client
            .post(format!("{origin}/admin/tenants"))
            .json(&body)
            .send()
            .await;
        s = status(client.get(&metadata).send().await)?;
    }
    if s != 200 {
        return Err(BenchError::new(format!(
            "GET {metadata} answered {s}: is tenant '{tenant}' there?"
        )));
    }
    Ok(())
}

fn progress_bar(show: bool, len: u64, what: &str) -> Option<ProgressBar> {
    if !show {
        return None;
    }
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} resources {per_sec} eta {eta}")
    {
        pb.set_style(style);
    }
    pb.set_message(what.to_string());
    Some(pb)
}

/// Whether the server takes batch Bundles on the tenant's base: one Bundle with one entry (a
/// patient PUT, harmless to repeat).
async fn batch_supported(
    client: &reqwest::Client,
    origin: &str,
    first: &HttpRequest,
) -> Result<Option<String>, BenchError> {
    let resp = client
        .post(format!("{origin}{}", first.path))
        .header("content-type", "application/fhir+json")
        .header("accept", "application/fhir+json")
        .body(first.body.clone().unwrap_or_default())
        .send()
        .await
        .map_err(|e| BenchError::new(format!("cannot reach {origin}: {e}")))?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if (200..300).contains(&status) && v["resourceType"] == "Bundle" {
        Ok(None)
    } else {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        Ok(Some(format!(
            "POST {} answered {status} ({text})",
            first.path
        )))
    }
}

async fn ingest(
    cfg: &BenchConfig,
    ic: &IngestConfig,
    dataset: &Dataset,
    origin: &str,
    report: &mut Report,
) -> Result<(), BenchError> {
    let tenant = &cfg.tenant;
    let client = load::client(ic.concurrency, cfg.bearer.as_deref())?;
    let summary = dataset.summary();
    let mut mode = ic.mode;
    if mode == IngestMode::Batch {
        let probe = workload::ingest_plan(
            &Dataset::new(DatasetConfig {
                patients: 1,
                days: 0,
                ..dataset.config().clone()
            }),
            tenant,
            IngestMode::Batch,
            1,
            ic.bundle_type,
        );
        if let Some(first) = probe.first()
            && let Some(why) = batch_supported(&client, origin, first).await?
        {
            report.notes.push(format!(
                "batch Bundles are not supported by this server yet ({why}); the data was loaded with single requests instead"
            ));
            mode = IngestMode::Single;
        }
    }
    let plan = Arc::new(workload::ingest_plan(
        dataset,
        tenant,
        mode,
        ic.batch_size,
        ic.bundle_type,
    ));
    let recorder = Arc::new(Recorder::new());
    let pb = progress_bar(cfg.progress, summary.total, "loading");
    let opts = RunOptions {
        concurrency: ic.concurrency,
        stop: Stop::Once,
        prefer_minimal: ic.prefer_minimal,
        recorder: Some(recorder.clone()),
        progress: pb.clone(),
    };
    let loaded = load::run(&client, origin, plan.clone(), &opts).await;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let mut observations = summary.counts.get("Observation").copied().unwrap_or(0);
    report.dataset = Some(summary);
    let detail = match mode {
        IngestMode::Batch => format!(
            "{} Bundles of {}",
            match ic.bundle_type {
                BundleType::Batch => "batch",
                BundleType::Transaction => "transaction",
            },
            ic.batch_size
        ),
        IngestMode::Single => "single PUT/POST with If-None-Exist".into(),
    };
    let mut runs: Vec<(&str, String, Arc<Vec<HttpRequest>>, RunStats)> =
        vec![("ingest", detail, plan, loaded)];

    if mode == IngestMode::Batch && ic.single_patients > 0 {
        // Fresh patients (after the dataset's), so that every request creates.
        let fresh = Dataset::new(DatasetConfig {
            first_patient: dataset.config().first_patient + dataset.config().patients,
            patients: ic.single_patients,
            ..dataset.config().clone()
        });
        observations += fresh
            .summary()
            .counts
            .get("Observation")
            .copied()
            .unwrap_or(0);
        let plan = Arc::new(workload::ingest_plan(
            &fresh,
            tenant,
            IngestMode::Single,
            1,
            ic.bundle_type,
        ));
        let stats = load::run(&client, origin, plan.clone(), &opts_no_progress(&opts)).await;
        runs.push((
            "ingest-single",
            format!(
                "single PUT/POST with If-None-Exist, {} fresh patients",
                ic.single_patients
            ),
            plan,
            stats,
        ));
    }
    // Searches must see what was loaded before they are measured, and the baseline must not
    // share the cores with an indexer that is still catching up.
    match wait_searchable(&client, origin, tenant, observations).await {
        Ok(secs) => {
            report.index_catch_up_s = Some(secs);
            report.notes.push(format!(
                "the search index caught up {secs:.1} s after the last acknowledged write ({observations} Observations searchable)"
            ));
        }
        Err(why) => report.notes.push(format!(
            "did not wait for the search index to catch up: {why}"
        )),
    }
    drop(client);
    let baseline = if cfg.baseline {
        Some(RunningServer::router(
            baseline::router(recorder.snapshot()),
            "baseline",
        )?)
    } else {
        None
    };
    for (name, detail, plan, stats) in runs {
        let b = match &baseline {
            Some(b) => {
                let client = load::client(ic.concurrency, cfg.bearer.as_deref())?;
                let o = RunOptions {
                    recorder: None,
                    ..opts_no_progress(&opts)
                };
                Some(load::run(&client, b.origin(), plan, &o).await)
            }
            None => None,
        };
        report
            .phases
            .push(Phase::new(name, &detail, &stats, b.as_ref()));
    }
    Ok(())
}

/// Polls `Observation?_summary=count` until it counts at least `expected`; returns the
/// seconds it took. Gives up after ten minutes, or at once if the server cannot count.
async fn wait_searchable(
    client: &reqwest::Client,
    origin: &str,
    tenant: &str,
    expected: u64,
) -> Result<f64, String> {
    let start = std::time::Instant::now();
    let url = format!("{origin}/fhir/{tenant}/Observation?_summary=count");
    loop {
        let resp = client
            .get(&url)
            .header("accept", "application/fhir+json")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| e.to_string())?;
        if !(200..300).contains(&status) {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(format!("GET {url} answered {status}: {text}"));
        }
        let total = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["total"].as_u64())
            .ok_or_else(|| format!("GET {url} gave no total"))?;
        if total >= expected {
            return Ok(start.elapsed().as_secs_f64());
        }
        if start.elapsed() > Duration::from_secs(600) {
            return Err(format!(
                "after 10 minutes the index counts {total} of {expected} Observations"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn opts_no_progress(o: &RunOptions) -> RunOptions {
    RunOptions {
        progress: None,
        ..o.clone()
    }
}

async fn search(
    cfg: &BenchConfig,
    sc: &SearchConfig,
    origin: &str,
    report: &mut Report,
) -> Result<(), BenchError> {
    let plan = Arc::new(workload::search_plan(
        &cfg.dataset,
        &cfg.tenant,
        sc.plan_size,
        sc.max_pages,
    ));
    let max_c = sc.concurrency.iter().copied().max().unwrap_or(1).max(1);
    // Warm-up: every request once, recording each answer (every page) for the baseline.
    let recorder = Arc::new(Recorder::new());
    let client = load::client(max_c, cfg.bearer.as_deref())?;
    let warm = load::run(
        &client,
        origin,
        plan.clone(),
        &RunOptions {
            concurrency: max_c.min(4),
            stop: Stop::Once,
            prefer_minimal: false,
            recorder: Some(recorder.clone()),
            progress: None,
        },
    )
    .await;
    let warm_total = warm.total();
    if warm_total.ok == 0 {
        report.notes.push(format!(
            "no search request succeeded in the warm-up ({} requests): the search figures measure error answers, not searches",
            warm_total.requests,
        ));
    }
    let baseline = if cfg.baseline {
        Some(RunningServer::router(
            baseline::router(recorder.snapshot()),
            "baseline",
        )?)
    } else {
        None
    };
    for &c in &sc.concurrency {
        let opts = RunOptions {
            concurrency: c,
            stop: sc.stop,
            prefer_minimal: false,
            recorder: None,
            progress: None,
        };
        let stats = load::run(&client, origin, plan.clone(), &opts).await;
        let b = match &baseline {
            Some(b) => Some(load::run(&client, b.origin(), plan.clone(), &opts).await),
            None => None,
        };
        report.phases.push(Phase::new(
            "search",
            &format!("mix of {} requests", plan.len()),
            &stats,
            b.as_ref(),
        ));
    }
    Ok(())
}
