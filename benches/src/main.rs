//! `fhir-bench`: generate test data, load it into a FHIR server, measure search, and measure the
//! in-memory baseline beside each figure. See `benches/README.md`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use benches::generate::{BundleType, Dataset, DatasetConfig, OutputFormat, write_files};
use benches::load::Stop;
use benches::run::{BenchConfig, IngestConfig, SearchConfig, Target, run};
use benches::workload::IngestMode;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fhir-bench",
    version,
    about = "Benchmarks for the FHIR server: data generator, ingest, search, in-memory baseline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a dataset as NDJSON files and/or Bundles.
    Generate {
        #[command(flatten)]
        data: DataArgs,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// What to write.
        #[arg(long, value_enum, default_value = "both")]
        format: OutputFormat,
        /// Entries per Bundle.
        #[arg(long, default_value_t = 100)]
        batch_size: usize,
        /// Bundle type.
        #[arg(long, value_enum, default_value = "batch")]
        bundle_type: BundleType,
    },
    /// Load the dataset over HTTP and measure it (and the baseline).
    Ingest {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        ingest: IngestArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Measure the search mix on a server that holds the dataset (and the baseline).
    Search {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        search: SearchArgs,
        #[command(flatten)]
        out: OutArgs,
    },
    /// Ingest, then search, in one run.
    All {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        ingest: IngestArgs,
        #[command(flatten)]
        search: SearchArgs,
        #[command(flatten)]
        out: OutArgs,
    },
}

#[derive(Args)]
struct ServerArgs {
    /// A running server (loopback addresses only), e.g. http://127.0.0.1:8080.
    #[arg(long, conflicts_with_all = ["spawn", "data_dir"])]
    url: Option<String>,
    /// Start the real server in this process on 127.0.0.1:0 (the default without --url).
    #[arg(long)]
    spawn: bool,
    /// With --spawn: the data folder (kept; default: a temporary one, removed at the end).
    #[arg(long = "data")]
    data_dir: Option<PathBuf>,
    /// Tenant to load into and search.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// With the in-process server: auth on (a key and a `system/*.cruds` token made for the
    /// run; every request is checked and written to the access log).
    #[arg(long, conflicts_with = "url")]
    auth: bool,
    /// With --url: a bearer token for every request (or the FHIR_BENCH_BEARER variable).
    #[arg(
        long,
        env = "FHIR_BENCH_BEARER",
        hide_env_values = true,
        requires = "url"
    )]
    bearer: Option<String>,
}

#[derive(Args)]
struct DataArgs {
    /// Patients.
    #[arg(long, default_value_t = 100)]
    patients: usize,
    /// Days of measurements per patient.
    #[arg(long, default_value_t = 30)]
    days: u32,
    /// Seed: the same seed gives the same data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Last day (exclusive) of the data window, YYYY-MM-DD.
    #[arg(long, default_value = "2026-11-01")]
    end: chrono::NaiveDate,
}

#[derive(Args)]
struct IngestArgs {
    /// Bundles to the tenant's base, or one request per resource.
    #[arg(long, value_enum, default_value = "batch")]
    mode: IngestMode,
    /// Entries per Bundle.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Bundle type.
    #[arg(long, value_enum, default_value = "batch")]
    bundle_type: BundleType,
    /// Concurrent clients while loading.
    #[arg(long, default_value_t = 4)]
    ingest_concurrency: usize,
    /// In batch mode, also load this many fresh patients with single requests.
    #[arg(long, default_value_t = 2)]
    single_patients: usize,
    /// Ask for full representations in write responses (default: Prefer: return=minimal).
    #[arg(long)]
    return_representation: bool,
}

#[derive(Args)]
struct SearchArgs {
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    concurrency: Vec<usize>,
    /// Seconds per level (each on the server and on the baseline).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Instead of --duration: this many requests per level.
    #[arg(long)]
    requests: Option<u64>,
    /// Distinct search requests in the mix.
    #[arg(long, default_value_t = 300)]
    plan_size: usize,
    /// Pages a paging request reads (`_count=1000`, following next links).
    #[arg(long, default_value_t = 5)]
    max_pages: u32,
}

#[derive(Args)]
struct OutArgs {
    /// Report folder (default: target/fhir-bench/run-YYYYMMDDTHHMMSSZ, UTC).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip the in-memory baseline.
    #[arg(long)]
    no_baseline: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// A note for the report (repeatable), e.g. "shared 2-core VM".
    #[arg(long)]
    note: Vec<String>,
}

fn main() -> ExitCode {
    match go(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dataset(d: &DataArgs) -> DatasetConfig {
    DatasetConfig {
        patients: d.patients,
        first_patient: 0,
        days: d.days,
        end: d.end,
        seed: d.seed,
    }
}

fn target(s: &ServerArgs) -> Target {
    match &s.url {
        Some(u) => Target::Url(u.clone()),
        None => Target::Spawn {
            data: s.data_dir.clone(),
            auth: s.auth,
        },
    }
}

fn ingest_config(i: &IngestArgs) -> IngestConfig {
    IngestConfig {
        mode: i.mode,
        batch_size: i.batch_size.max(1),
        bundle_type: i.bundle_type,
        concurrency: i.ingest_concurrency.max(1),
        single_patients: i.single_patients,
        prefer_minimal: !i.return_representation,
    }
}

fn search_config(s: &SearchArgs) -> Result<SearchConfig, String> {
    let stop = match s.requests {
        Some(n) => Stop::Count(n),
        None if s.duration.is_finite() && s.duration > 0.0 => {
            Stop::Duration(Duration::from_secs_f64(s.duration))
        }
        None => return Err(format!("--duration must be positive, not {}", s.duration)),
    };
    if s.concurrency.is_empty() || s.concurrency.contains(&0) {
        return Err("--concurrency needs levels of at least 1".into());
    }
    Ok(SearchConfig {
        concurrency: s.concurrency.clone(),
        stop,
        plan_size: s.plan_size.max(1),
        max_pages: s.max_pages.max(1),
    })
}

fn bench_config(
    server: &ServerArgs,
    data: &DataArgs,
    out: &OutArgs,
    ingest: Option<IngestConfig>,
    search: Option<SearchConfig>,
) -> BenchConfig {
    let out_dir = out.out.clone().unwrap_or_else(|| {
        PathBuf::from("target/fhir-bench")
            .join(chrono::Utc::now().format("run-%Y%m%dT%H%M%SZ").to_string())
    });
    BenchConfig {
        target: target(server),
        tenant: server.tenant.clone(),
        dataset: dataset(data),
        ingest,
        search,
        baseline: !out.no_baseline,
        out: out_dir,
        progress: !out.quiet,
        command: command_line(),
        notes: out.note.clone(),
        bearer: server.bearer.clone(),
    }
}

/// The command line for the report, without the value of `--bearer` (a secret).
fn command_line() -> String {
    let mut out = Vec::new();
    let mut hide_next = false;
    for a in std::env::args() {
        if hide_next {
            out.push("…".to_string());
            hide_next = false;
        } else if a == "--bearer" {
            out.push(a);
            hide_next = true;
        } else if a.starts_with("--bearer=") {
            out.push("--bearer=…".to_string());
        } else {
            out.push(a);
        }
    }
    out.join(" ")
}

fn go(cli: Cli) -> Result<(), String> {
    let cfg = match cli.command {
        Command::Generate {
            data,
            out,
            format,
            batch_size,
            bundle_type,
        } => {
            let t0 = std::time::Instant::now();
            let ds = Dataset::new(dataset(&data));
            let s = write_files(&ds, &out, format, bundle_type, batch_size)
                .map_err(|e| e.to_string())?;
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "wrote {} resources ({:.1} MiB of JSON) to {} in {secs:.2} s ({:.0} resources/s)",
                s.total,
                s.json_bytes as f64 / 1024.0 / 1024.0,
                out.display(),
                s.total as f64 / secs.max(1e-9)
            );
            for (t, n) in &s.counts {
                println!("  {t}: {n}");
            }
            return Ok(());
        }
        Command::Ingest {
            server,
            data,
            ingest,
            out,
        } => bench_config(&server, &data, &out, Some(ingest_config(&ingest)), None),
        Command::Search {
            server,
            data,
            search,
            out,
        } => bench_config(&server, &data, &out, None, Some(search_config(&search)?)),
        Command::All {
            server,
            data,
            ingest,
            search,
            out,
        } => bench_config(
            &server,
            &data,
            &out,
            Some(ingest_config(&ingest)),
            Some(search_config(&search)?),
        ),
    };
    let out = run(&cfg).map_err(|e| e.to_string())?;
    println!("{}", out.report.markdown());
    println!(
        "report: {}\n        {}\n        {}",
        out.files.markdown.display(),
        out.files.json.display(),
        out.files.chart.display()
    );
    Ok(())
}
