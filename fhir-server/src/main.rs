//! The `fhir-server` binary: `serve`, and `reindex` and `tenant create|list|remove` on a
//! stopped server's data folder.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use fhir_core::TenantId;
use fhir_server::auth::{AuthConfig, AuthMode, Authenticator};
use fhir_server::discovery::SmartDiscovery;
use fhir_server::{AppState, ServerConfig};
use fhir_store::{Backend, Store, StoreOptions};

#[derive(Parser)]
#[command(name = "fhir-server", version, about = "A multitenant FHIR R4 server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    /// redb: the default, ACID, crash-tested.
    Redb,
    /// sled 0.34 (needs the `sled` cargo feature).
    Sled,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server.
    Serve {
        /// Data folder (created if missing): `store/` holds the resources.
        #[arg(long, env = "FHIR_DATA", default_value = "./data")]
        data: PathBuf,
        /// Address to listen on.
        #[arg(long, env = "FHIR_LISTEN", default_value = "127.0.0.1:8080")]
        listen: String,
        /// Run without authentication: every client has full access to every tenant. For local
        /// use only; without it, `--auth-config` is required.
        #[arg(long, conflicts_with = "auth_config")]
        no_auth: bool,
        /// The auth configuration (TOML with an `[auth]` table; see README "Security").
        /// `FHIR_AUTH_*` environment variables override it.
        #[arg(long, env = "FHIR_AUTH_CONFIG")]
        auth_config: Option<PathBuf>,
        /// Storage backend; a data folder keeps the backend it was created with.
        #[arg(long, value_enum, default_value = "redb")]
        backend: BackendArg,
        /// Largest accepted request body in bytes.
        #[arg(long, default_value_t = 8 * 1024 * 1024)]
        max_body_bytes: usize,
        /// Most entries accepted in one batch or transaction Bundle.
        #[arg(long, default_value_t = 10_000)]
        max_bundle_entries: usize,
        /// Largest accepted batch or transaction Bundle in bytes.
        #[arg(long, default_value_t = 32 * 1024 * 1024)]
        max_bundle_bytes: usize,
        /// Public base URL (e.g. https://fhir.example.no) for Location headers and links.
        #[arg(long, env = "FHIR_PUBLIC_BASE")]
        public_base: Option<String>,
    },
    /// Rebuild a tenant's search index from its store, with a progress bar (the server must not
    /// be running on the data folder). The index is derived data: this is always safe.
    Reindex {
        /// The tenant whose index is rebuilt.
        #[arg(long)]
        tenant: String,
        #[arg(long, env = "FHIR_DATA", default_value = "./data")]
        data: PathBuf,
        #[arg(long, value_enum, default_value = "redb")]
        backend: BackendArg,
    },
    /// Manage tenants in a data folder (the server must not be running on it).
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant.
    Create {
        /// Tenant id, used in URLs: /fhir/{id}.
        id: String,
        /// Display name.
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, env = "FHIR_DATA", default_value = "./data")]
        data: PathBuf,
        #[arg(long, value_enum, default_value = "redb")]
        backend: BackendArg,
    },
    /// List tenants.
    List {
        #[arg(long, env = "FHIR_DATA", default_value = "./data")]
        data: PathBuf,
        #[arg(long, value_enum, default_value = "redb")]
        backend: BackendArg,
    },
    /// Remove a tenant and all of its data.
    Remove {
        /// Tenant id.
        id: String,
        #[arg(long, env = "FHIR_DATA", default_value = "./data")]
        data: PathBuf,
        #[arg(long, value_enum, default_value = "redb")]
        backend: BackendArg,
    },
}

fn backend(b: BackendArg) -> Result<Backend, String> {
    match b {
        BackendArg::Redb => Ok(Backend::Redb),
        #[cfg(feature = "sled")]
        BackendArg::Sled => Ok(Backend::Sled),
        #[cfg(not(feature = "sled"))]
        BackendArg::Sled => {
            Err("this build has no sled support; rebuild with --features sled".into())
        }
    }
}

fn open_store(data: &Path, b: BackendArg) -> Result<(Store, bool), String> {
    let dir = data.join("store");
    let fresh = !dir.exists();
    open_store_dir(dir, fresh, b)
}

/// Opens an existing data folder only: listing or removing must not create one by accident.
fn open_existing_store(data: &Path, b: BackendArg) -> Result<Store, String> {
    let dir = data.join("store");
    if !dir.exists() {
        return Err(format!("no data folder with a store at {}", data.display()));
    }
    open_store_dir(dir, false, b).map(|(s, _)| s)
}

fn open_store_dir(dir: PathBuf, fresh: bool, b: BackendArg) -> Result<(Store, bool), String> {
    let opts = StoreOptions {
        backend: backend(b)?,
        ..StoreOptions::default()
    };
    let store = Store::open_with(&dir, opts)
        .map_err(|e| format!("cannot open the store in {}: {e}", dir.display()))?;
    Ok((store, fresh))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve {
            data,
            listen,
            no_auth,
            auth_config,
            backend,
            max_body_bytes,
            max_bundle_entries,
            max_bundle_bytes,
            public_base,
        } => {
            let mut smart = None;
            let auth_config = match (no_auth, auth_config) {
                (true, _) => {
                    tracing::warn!(
                        "--no-auth: authentication is OFF; every client has full access to \
                         every tenant. Use this only on a trusted machine."
                    );
                    AuthConfig::off()
                }
                (false, Some(path)) => {
                    let c = AuthConfig::from_file(&path)
                        .and_then(AuthConfig::with_env_overrides)
                        .map_err(|e| e.to_string())?;
                    if c.mode == AuthMode::On {
                        smart = Some(SmartDiscovery::from_file(&path)?.with_defaults_from(&c));
                    }
                    c
                }
                (false, None) => {
                    return Err("authentication is on by default: give --auth-config FILE \
                         (or FHIR_AUTH_CONFIG), or --no-auth for local use without \
                         authentication"
                        .into());
                }
            };
            if !no_auth && auth_config.mode == AuthMode::Off {
                tracing::warn!("the auth configuration says mode = \"off\": authentication is OFF");
            }
            let authenticator = Authenticator::new(auth_config).map_err(|e| e.to_string())?;
            std::fs::create_dir_all(&data)
                .map_err(|e| format!("cannot create {}: {e}", data.display()))?;
            let (store, fresh) = open_store(&data, backend)?;
            if fresh {
                let id = TenantId::new("default").map_err(|e| e.to_string())?;
                store
                    .create_tenant(&id, "Default tenant")
                    .map_err(|e| e.to_string())?;
                tracing::info!("new data folder: created tenant 'default'");
            }
            let config = ServerConfig {
                max_body_bytes,
                max_bundle_entries,
                max_bundle_bytes,
                public_base,
                smart,
                ..ServerConfig::default()
            };
            // The index resumes from its last commit (in the background) or is rebuilt.
            let state = AppState::open(store, config, &data.join("index"))
                .map_err(|e| format!("cannot open the search index: {e}"))?
                .with_auth(authenticator);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
                if let Ok(addr) = listener.local_addr() {
                    // On stdout so scripts and tests can find a port chosen with :0.
                    println!("listening on http://{addr}");
                }
                fhir_server::serve(listener, state)
                    .await
                    .map_err(|e| e.to_string())
            })
        }
        Command::Reindex {
            tenant,
            data,
            backend,
        } => {
            let id = TenantId::new(&tenant).map_err(|e| e.to_string())?;
            let store = open_existing_store(&data, backend)?;
            if store.tenant(&id).map_err(|e| e.to_string())?.is_none() {
                return Err(format!("no tenant '{id}'"));
            }
            let opts = fhir_search::IndexOptions {
                background_interval: None,
                ..fhir_search::IndexOptions::default()
            };
            let index = fhir_search::SearchIndex::open_with(data.join("index"), store, opts)
                .map_err(|e| format!("cannot open the search index: {e}"))?;
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} changes ({eta} left)",
                )
                .map_err(|e| e.to_string())?
                .progress_chars("=> "),
            );
            bar.set_message(format!("reindexing {id}"));
            index
                .rebuild(&id, &mut |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                })
                .map_err(|e| format!("reindexing failed: {e}"))?;
            bar.finish();
            let seq = index.indexed_seq(&id).map_err(|e| e.to_string())?;
            println!("reindexed tenant {id} up to change {seq}");
            Ok(())
        }
        Command::Tenant { command } => match command {
            TenantCommand::Create {
                id,
                name,
                data,
                backend,
            } => {
                let id = TenantId::new(&id).map_err(|e| e.to_string())?;
                std::fs::create_dir_all(&data)
                    .map_err(|e| format!("cannot create {}: {e}", data.display()))?;
                let (store, _) = open_store(&data, backend)?;
                let t = store.create_tenant(&id, &name).map_err(|e| e.to_string())?;
                println!("created tenant {}", t.id);
                Ok(())
            }
            TenantCommand::List { data, backend } => {
                let store = open_existing_store(&data, backend)?;
                for t in store.tenants().map_err(|e| e.to_string())? {
                    println!("{}\t{}\t{}", t.id, t.created, t.name);
                }
                Ok(())
            }
            TenantCommand::Remove { id, data, backend } => {
                let id = TenantId::new(&id).map_err(|e| e.to_string())?;
                let store = open_existing_store(&data, backend)?;
                if store.remove_tenant(&id).map_err(|e| e.to_string())? {
                    // Its search index goes with it (a server would also find it orphaned).
                    let index = data.join("index").join(id.as_str());
                    if index.exists() {
                        std::fs::remove_dir_all(&index)
                            .map_err(|e| format!("cannot delete {}: {e}", index.display()))?;
                    }
                    println!("removed tenant {id}");
                    Ok(())
                } else {
                    Err(format!("no tenant '{id}'"))
                }
            }
        },
    }
}
