//! What a run produced: a [`Report`] written as `report.md` (tables), `report.json` and
//! `throughput.svg` (requests/s against concurrency, the server beside its baseline).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use crate::BenchError;
use crate::generate::DatasetSummary;
use crate::load::{KindStats, RunStats};

/// One benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `fhir-bench`
    pub tool: String,
    /// When the run started (UTC, RFC 3339).
    pub started: String,
    /// The command line that produced it.
    pub command: String,
    /// The machine it ran on.
    pub machine: Machine,
    /// What was measured: an in-process server over a data folder, or a URL.
    pub target: String,
    /// The dataset loaded (or assumed loaded) for the run.
    pub dataset: Option<DatasetSummary>,
    /// Every measurement.
    pub phases: Vec<Phase>,
    /// Seconds from the last acknowledged ingest request until a search saw every loaded
    /// Observation (the index is derived from the store and catches up asynchronously).
    pub index_catch_up_s: Option<f64>,
    /// Things a reader must know (fallbacks, unsupported searches, errors).
    pub notes: Vec<String>,
}

/// The machine.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs available to this process.
    pub cpus: usize,
    /// CPU model, from `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
    /// Memory in GiB, from `/proc/meminfo`.
    pub memory_gib: Option<f64>,
    /// Operating system.
    pub os: String,
    /// Kernel release.
    pub kernel: Option<String>,
    /// `release` or `debug`: the build of this benchmark and the in-process server.
    pub build: String,
}

impl Machine {
    /// Facts about this machine.
    pub fn detect() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        let cpu_model = read("/proc/cpuinfo").and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        });
        let memory_gib = read("/proc/meminfo").and_then(|s| {
            let kb: f64 = s
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((kb / 1024.0 / 1024.0 * 10.0).round() / 10.0)
        });
        let os = read("/etc/os-release")
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("PRETTY_NAME="))
                    .map(|l| l["PRETTY_NAME=".len()..].trim_matches('"').to_string())
            })
            .unwrap_or_else(|| std::env::consts::OS.to_string());
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            memory_gib,
            os,
            kernel: read("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()),
            build: if cfg!(debug_assertions) {
                "debug".into()
            } else {
                "release".into()
            },
        }
    }
}

/// One measurement of the server, with the baseline's at the same concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// `ingest`, `ingest-single`, `search`.
    pub name: String,
    /// How the requests were made (e.g. `batch Bundles of 100`).
    pub detail: String,
    /// Concurrent clients.
    pub concurrency: usize,
    /// The server's figures.
    pub server: Measurement,
    /// The baseline's figures for the same requests.
    pub baseline: Option<Measurement>,
    /// Server requests/s divided by the baseline's.
    pub ratio: Option<f64>,
}

impl Phase {
    /// A phase from the server's run and, if measured, the baseline's.
    pub fn new(name: &str, detail: &str, server: &RunStats, baseline: Option<&RunStats>) -> Phase {
        let server = Measurement::from_run(server);
        let baseline = baseline.map(Measurement::from_run);
        let ratio = baseline
            .as_ref()
            .filter(|b| b.requests_per_s > 0.0)
            .map(|b| server.requests_per_s / b.requests_per_s);
        Phase {
            name: name.into(),
            detail: detail.into(),
            concurrency: server.concurrency,
            server,
            baseline,
            ratio,
        }
    }
}

/// The figures of one run against one server.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// Concurrent clients.
    pub concurrency: usize,
    /// Wall time in seconds.
    pub elapsed_s: f64,
    /// All request kinds together.
    pub total: KindSummary,
    /// Requests per second.
    pub requests_per_s: f64,
    /// Resources (returned or accepted) per second.
    pub resources_per_s: f64,
    /// Per request kind.
    pub kinds: Vec<KindSummary>,
}

impl Measurement {
    /// Summarises a run.
    pub fn from_run(r: &RunStats) -> Measurement {
        let secs = r.elapsed.as_secs_f64().max(1e-9);
        let total = KindSummary::new("all", &r.total(), secs);
        Measurement {
            concurrency: r.concurrency,
            elapsed_s: round(secs, 3),
            requests_per_s: total.requests_per_s,
            resources_per_s: total.resources_per_s,
            kinds: r
                .kinds
                .iter()
                .map(|(k, s)| KindSummary::new(k, s, secs))
                .collect(),
            total,
        }
    }
}

/// The figures of one request kind.
#[derive(Debug, Clone, Serialize)]
pub struct KindSummary {
    /// The kind.
    pub kind: String,
    /// Requests.
    pub requests: u64,
    /// Answered with a 2xx.
    pub ok: u64,
    /// Not.
    pub errors: u64,
    /// Batch entries that failed.
    pub entry_errors: u64,
    /// Count per HTTP status (0: no answer).
    pub statuses: BTreeMap<u16, u64>,
    /// Resources returned or accepted.
    pub resources: u64,
    /// Response bytes.
    pub bytes: u64,
    /// Requests per second (of the whole run's wall time).
    pub requests_per_s: f64,
    /// Resources per second.
    pub resources_per_s: f64,
    /// Latency percentiles and mean, in milliseconds.
    pub latency_ms: Latency,
    /// The first error answer, shortened.
    pub first_error: Option<String>,
}

impl KindSummary {
    fn new(kind: &str, s: &KindStats, secs: f64) -> KindSummary {
        let h = &s.latency_us;
        let ms = |us: u64| round(us as f64 / 1000.0, 3);
        let latency_ms = if h.is_empty() {
            Latency::default()
        } else {
            Latency {
                p50: ms(h.value_at_quantile(0.50)),
                p95: ms(h.value_at_quantile(0.95)),
                p99: ms(h.value_at_quantile(0.99)),
                max: ms(h.max()),
                mean: round(h.mean() / 1000.0, 3),
            }
        };
        KindSummary {
            kind: kind.into(),
            requests: s.requests,
            ok: s.ok,
            errors: s.errors,
            entry_errors: s.entry_errors,
            statuses: s.statuses.clone(),
            resources: s.resources,
            bytes: s.bytes,
            requests_per_s: round(s.requests as f64 / secs, 1),
            resources_per_s: round(s.resources as f64 / secs, 1),
            latency_ms,
            first_error: s.first_error.clone(),
        }
    }
}

/// Latency in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// The files of a written report.
#[derive(Debug, Clone)]
pub struct ReportFiles {
    /// `report.md`
    pub markdown: PathBuf,
    /// `report.json`
    pub json: PathBuf,
    /// `throughput.svg`
    pub chart: PathBuf,
}

impl Report {
    /// The report as markdown: the machine and dataset, one row per phase, then per request
    /// kind.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        s.push_str(&format!("# fhir-bench run {}\n\n", self.started));
        s.push_str(&format!("Command: `{}`\n\n", self.command));
        s.push_str(&format!(
            "Machine: {} CPUs ({}), {} GiB, {}, kernel {}, {} build. Target: {}.\n\n",
            m.cpus,
            m.cpu_model.as_deref().unwrap_or("unknown CPU"),
            m.memory_gib.map_or("?".to_string(), |g| g.to_string()),
            m.os,
            m.kernel.as_deref().unwrap_or("?"),
            m.build,
            self.target
        ));
        if let Some(d) = &self.dataset {
            let counts: Vec<String> = d.counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
            s.push_str(&format!(
                "Dataset: {} patients × {} days ({} to {}, seed {}): {} resources, {:.1} MiB of JSON ({}).\n\n",
                d.patients,
                d.days,
                d.start,
                d.end,
                d.seed,
                d.total,
                d.json_bytes as f64 / 1024.0 / 1024.0,
                counts.join(", ")
            ));
        }
        s.push_str("## Summary\n\n");
        s.push_str("Baseline: the same client against a minimal axum server answering each request with the recorded response bytes from memory. Ratio: server requests/s ÷ baseline requests/s.\n\n");
        s.push_str("| phase | how | clients | requests | errors | req/s | resources/s | p50 ms | p95 ms | p99 ms | baseline req/s | baseline p50 ms | ratio |\n");
        s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for p in &self.phases {
            let t = &p.server.total;
            let (brps, bp50) = match &p.baseline {
                Some(b) => (
                    format!("{:.1}", b.requests_per_s),
                    format!("{:.3}", b.total.latency_ms.p50),
                ),
                None => ("–".into(), "–".into()),
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.3} | {:.3} | {:.3} | {} | {} | {} |\n",
                p.name,
                p.detail,
                p.concurrency,
                t.requests,
                t.errors,
                p.server.requests_per_s,
                p.server.resources_per_s,
                t.latency_ms.p50,
                t.latency_ms.p95,
                t.latency_ms.p99,
                brps,
                bp50,
                p.ratio.map_or("–".into(), |r| format!("{r:.3}")),
            ));
        }
        s.push_str("\n## Per request kind\n\n");
        s.push_str("| phase | clients | kind | requests | errors | statuses | req/s | resources/s | p50 ms | p95 ms | p99 ms | max ms | baseline p50 ms |\n");
        s.push_str("|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
        for p in &self.phases {
            for k in &p.server.kinds {
                let statuses: Vec<String> =
                    k.statuses.iter().map(|(c, n)| format!("{c}×{n}")).collect();
                let bp50 = p
                    .baseline
                    .as_ref()
                    .and_then(|b| b.kinds.iter().find(|bk| bk.kind == k.kind))
                    .map_or("–".into(), |bk| format!("{:.3}", bk.latency_ms.p50));
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.3} | {:.3} | {:.3} | {:.3} | {} |\n",
                    p.name,
                    p.concurrency,
                    k.kind,
                    k.requests,
                    k.errors,
                    statuses.join(" "),
                    k.requests_per_s,
                    k.resources_per_s,
                    k.latency_ms.p50,
                    k.latency_ms.p95,
                    k.latency_ms.p99,
                    k.latency_ms.max,
                    bp50,
                ));
            }
        }
        if !self.notes.is_empty() {
            s.push_str("\n## Notes\n\n");
            for n in &self.notes {
                s.push_str(&format!("- {n}\n"));
            }
        }
        s
    }

    /// Writes `report.md`, `report.json` and `throughput.svg` to `dir`.
    pub fn write(&self, dir: &Path) -> Result<ReportFiles, BenchError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| BenchError::new(format!("cannot create {}: {e}", dir.display())))?;
        let files = ReportFiles {
            markdown: dir.join("report.md"),
            json: dir.join("report.json"),
            chart: dir.join("throughput.svg"),
        };
        let write = |p: &Path, bytes: &[u8]| {
            std::fs::write(p, bytes)
                .map_err(|e| BenchError::new(format!("cannot write {}: {e}", p.display())))
        };
        write(&files.markdown, self.markdown().as_bytes())?;
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| BenchError::new(format!("cannot serialise the report: {e}")))?;
        write(&files.json, &json)?;
        self.chart(&files.chart)?;
        Ok(files)
    }

    /// Requests/s against concurrency for each phase, the server and its baseline, on a
    /// logarithmic axis (the two are often orders of magnitude apart).
    pub fn chart(&self, path: &Path) -> Result<(), BenchError> {
        // Throughput against concurrency is the search sweep; ingest (one concurrency, and
        // requests of 100 resources) is charted only when there is no search.
        let searched = self.phases.iter().any(|p| p.name == "search");
        let mut series: BTreeMap<String, Vec<(u32, f64)>> = BTreeMap::new();
        for p in self
            .phases
            .iter()
            .filter(|p| !searched || p.name == "search")
        {
            series
                .entry(format!("{} ({})", p.name, "fhir-server"))
                .or_default()
                .push((p.concurrency as u32, p.server.requests_per_s));
            if let Some(b) = &p.baseline {
                series
                    .entry(format!("{} ({})", p.name, "baseline"))
                    .or_default()
                    .push((p.concurrency as u32, b.requests_per_s));
            }
        }
        for v in series.values_mut() {
            v.sort_by_key(|(c, _)| *c);
        }
        let points = series.values().flatten();
        let max_c = points.clone().map(|(c, _)| *c).max().unwrap_or(1).max(2);
        let max_y = points.clone().map(|(_, y)| *y).fold(1.0, f64::max) * 2.0;
        let min_y = points
            .map(|(_, y)| *y)
            .filter(|y| *y > 0.0)
            .fold(max_y, f64::min)
            .clamp(0.01, 1.0);
        let err = |e: String| BenchError::new(format!("drawing {}: {e}", path.display()));
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Throughput vs concurrency (fhir-server and in-memory baseline)",
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(1u32..max_c, (min_y..max_y).log_scale())
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("concurrent clients")
            .y_desc("requests/s (log)")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        let phases: Vec<String> = series
            .keys()
            .map(|k| k.split(" (").next().unwrap_or_default().to_string())
            .collect();
        for (name, pts) in series.iter() {
            let phase = name.split(" (").next().unwrap_or_default();
            let i = phases.iter().position(|p| p == phase).unwrap_or(0);
            let baseline = name.ends_with("(baseline)");
            // The baseline in a pale shade of its phase's colour, so the pairs read together.
            let color = if baseline {
                Palette99::pick(i).mix(0.4)
            } else {
                Palette99::pick(i).to_rgba()
            };
            let style = color.stroke_width(if baseline { 2 } else { 3 });
            chart
                .draw_series(LineSeries::new(pts.iter().map(|(c, y)| (*c, *y)), style))
                .map_err(|e| err(e.to_string()))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart
                .draw_series(
                    pts.iter()
                        .map(|(c, y)| Circle::new((*c, *y), 4, color.filled())),
                )
                .map_err(|e| err(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
        Ok(())
    }
}
