//! The benchmarks in a tiny configuration, so they build and run in CI and never rot: generate
//! → ingest into an in-process server → search → baseline → report. No timing assertions: only
//! that the run produced its reports.

use std::time::Duration;

use benches::generate::DatasetConfig;
use benches::load::Stop;
use benches::run::{BenchConfig, IngestConfig, SearchConfig, Target, run};

#[test]
fn smoke_run_writes_markdown_json_and_svg_reports() {
    let out = tempfile::tempdir().unwrap();
    let cfg = BenchConfig {
        target: Target::Spawn {
            data: None,
            auth: false,
        },
        tenant: "default".into(),
        dataset: DatasetConfig {
            patients: 3,
            days: 2,
            ..DatasetConfig::default()
        },
        ingest: Some(IngestConfig {
            batch_size: 10,
            concurrency: 2,
            single_patients: 1,
            ..IngestConfig::default()
        }),
        search: Some(SearchConfig {
            concurrency: vec![1, 2],
            stop: Stop::Count(12),
            plan_size: 12,
            max_pages: 2,
        }),
        baseline: true,
        out: out.path().join("report"),
        progress: false,
        command: "smoke test".into(),
        notes: vec!["smoke".into()],
        bearer: None,
    };
    let t0 = std::time::Instant::now();
    let result = run(&cfg).unwrap();

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&result.files.json).unwrap()).unwrap();
    let phases = json["phases"].as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"ingest"), "{names:?}");
    assert!(
        names.iter().filter(|n| **n == "search").count() == 2,
        "{names:?}"
    );
    for p in phases {
        assert!(
            p["server"]["total"]["requests"].as_u64().unwrap() > 0,
            "{p}"
        );
        assert!(
            p["baseline"]["total"]["requests"].as_u64().unwrap() > 0,
            "{p}"
        );
    }
    // Every resource of the dataset was accepted (by batch, or by single requests where the
    // server has no batch support yet).
    let total = json["dataset"]["total"].as_u64().unwrap();
    assert!(total > 3);
    let ingest = phases.iter().find(|p| p["name"] == "ingest").unwrap();
    assert_eq!(
        ingest["server"]["total"]["resources"].as_u64().unwrap(),
        total
    );
    assert_eq!(ingest["server"]["total"]["errors"].as_u64().unwrap(), 0);

    let md = std::fs::read_to_string(&result.files.markdown).unwrap();
    let rows = md
        .lines()
        .filter(|l| l.starts_with("| ingest") || l.starts_with("| search"))
        .count();
    assert!(rows >= 3, "{md}");

    let svg = std::fs::read_to_string(&result.files.chart).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "{svg}"
    );
    // Not a timing assertion: a guard that the smoke configuration stays small.
    assert!(t0.elapsed() < Duration::from_secs(120));
}

/// A server without batch support (404 on `POST /fhir/{tenant}`) is loaded with single requests,
/// and the report says so instead of failing.
#[test]
fn ingest_falls_back_to_single_requests_without_batch_support() {
    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::{get, post, put};

    let app = Router::new()
        .route("/fhir/default/metadata", get(|| async { "{}" }))
        .route(
            "/fhir/default/{type}",
            post(|| async { (StatusCode::CREATED, "{}") }),
        )
        .route(
            "/fhir/default/{type}/{id}",
            put(|| async { (StatusCode::CREATED, "{}") }),
        );
    let server = benches::server::RunningServer::router(app, "no-batch").unwrap();
    let out = tempfile::tempdir().unwrap();
    let cfg = BenchConfig {
        target: Target::Url(server.origin().to_string()),
        tenant: "default".into(),
        dataset: DatasetConfig {
            patients: 2,
            days: 1,
            ..DatasetConfig::default()
        },
        ingest: Some(IngestConfig {
            concurrency: 2,
            single_patients: 0,
            ..IngestConfig::default()
        }),
        search: None,
        baseline: false,
        out: out.path().to_path_buf(),
        progress: false,
        command: "fallback test".into(),
        notes: Vec::new(),
        bearer: None,
    };
    let result = run(&cfg).unwrap();
    let r = &result.report;
    assert!(
        r.notes.iter().any(|n| n.contains("not supported")
            && n.contains("404")
            && n.contains("single requests")),
        "{:?}",
        r.notes
    );
    let ingest = &r.phases[0];
    assert!(ingest.detail.starts_with("single"), "{}", ingest.detail);
    assert_eq!(
        ingest.server.total.resources,
        r.dataset.as_ref().unwrap().total
    );
    assert!(ingest.baseline.is_none());
}

/// `--auth`: the in-process server checks every request's token and scopes; the run's own
/// token must get every resource in and every search answered (a rejected token would show as
/// errors and no resources).
#[test]
fn auth_on_run_is_accepted_end_to_end() {
    let out = tempfile::tempdir().unwrap();
    let cfg = BenchConfig {
        target: Target::Spawn {
            data: None,
            auth: true,
        },
        tenant: "default".into(),
        dataset: DatasetConfig {
            patients: 2,
            days: 1,
            ..DatasetConfig::default()
        },
        ingest: Some(IngestConfig {
            batch_size: 10,
            concurrency: 2,
            single_patients: 1,
            ..IngestConfig::default()
        }),
        search: Some(SearchConfig {
            concurrency: vec![2],
            stop: Stop::Count(8),
            plan_size: 8,
            max_pages: 1,
        }),
        baseline: false,
        out: out.path().join("report"),
        progress: false,
        command: "auth smoke test".into(),
        notes: Vec::new(),
        bearer: None,
    };
    let result = run(&cfg).unwrap();
    let r = &result.report;
    assert!(r.target.contains("auth on"), "{}", r.target);
    let total = r.dataset.as_ref().unwrap().total;
    let ingest = r.phases.iter().find(|p| p.name == "ingest").unwrap();
    assert_eq!(ingest.server.total.resources, total);
    assert_eq!(ingest.server.total.errors, 0, "{:?}", r.notes);
    let search = r.phases.iter().find(|p| p.name == "search").unwrap();
    assert!(search.server.total.requests > 0);
    assert_eq!(search.server.total.errors, 0, "{:?}", r.notes);
}
