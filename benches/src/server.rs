//! Servers under test, started in this process on `127.0.0.1:0`: the real FHIR server
//! ([`RunningServer::fhir`], `fhir_server::app` over a [`fhir_store::Store`]) and any other
//! router, such as the [baseline](crate::baseline) ([`RunningServer::router`]).
//!
//! Each server gets its own thread and its own multi-threaded tokio runtime, as it would as a
//! process of its own, so that the load client's runtime does not schedule the server's tasks.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use fhir_core::TenantId;
use fhir_server::{AppState, ServerConfig};
use fhir_store::Store;
use tokio::sync::oneshot;

use crate::BenchError;

/// A server running on a thread of its own; stopped when dropped.
pub struct RunningServer {
    origin: String,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    // Dropped after the server thread has ended (and with it the store).
    _temp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl RunningServer {
    /// Starts the real server over the data folder `data` (its `store/` is created if missing;
    /// `None`: a temporary folder removed on drop) with tenant `tenant`.
    pub fn fhir(data: Option<&Path>, tenant: &str) -> Result<RunningServer, BenchError> {
        Self::start_fhir(data, tenant, false).map(|(s, _)| s)
    }

    /// Like [`RunningServer::fhir`], with auth on (see [`crate::auth`]); also returns the
    /// bearer token for the benchmark's requests.
    pub fn fhir_with_auth(
        data: Option<&Path>,
        tenant: &str,
    ) -> Result<(RunningServer, String), BenchError> {
        let (s, token) = Self::start_fhir(data, tenant, true)?;
        let token = token.ok_or_else(|| BenchError::new("auth setup made no token"))?;
        Ok((s, token))
    }

    fn start_fhir(
        data: Option<&Path>,
        tenant: &str,
        auth: bool,
    ) -> Result<(RunningServer, Option<String>), BenchError> {
        let (temp, dir): (Option<tempfile::TempDir>, PathBuf) = match data {
            Some(d) => (None, d.to_path_buf()),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("fhir-bench-")
                    .tempdir()
                    .map_err(|e| BenchError::new(format!("cannot make a temporary folder: {e}")))?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| BenchError::new(format!("cannot create {}: {e}", dir.display())))?;
        let store = Store::open(dir.join("store")).map_err(|e| {
            BenchError::new(format!("cannot open the store in {}: {e}", dir.display()))
        })?;
        let id = TenantId::new(tenant)
            .map_err(|e| BenchError::new(format!("tenant '{tenant}': {e}")))?;
        let exists = store
            .tenant(&id)
            .map_err(|e| BenchError::new(format!("reading tenants: {e}")))?
            .is_some();
        if !exists {
            store
                .create_tenant(&id, "Benchmark tenant")
                .map_err(|e| BenchError::new(format!("creating tenant '{tenant}': {e}")))?;
        }
        let mut state = AppState::open(store, ServerConfig::default(), &dir.join("index"))
            .map_err(|e| BenchError::new(format!("cannot open the search index: {e}")))?;
        let mut token = None;
        if auth {
            let a = crate::auth::setup(&dir, tenant)?;
            state = state.with_auth(a.authenticator);
            token = Some(a.token);
        }
        let mut s = RunningServer::router(fhir_server::app(state), "fhir-server")?;
        s._temp = temp;
        Ok((s, token))
    }

    /// Serves `router` on `127.0.0.1:0`.
    pub fn router(router: Router, name: &str) -> Result<RunningServer, BenchError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .map_err(|e| BenchError::new(format!("cannot listen on 127.0.0.1: {e}")))?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .thread_name("bench-server")
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let (grace_tx, grace_rx) = oneshot::channel::<()>();
                    let server = axum::serve(listener, router)
                        .with_graceful_shutdown(async move {
                            let _ = grace_rx.await;
                        })
                        .into_future();
                    tokio::pin!(server);
                    tokio::select! {
                        _ = &mut server => {}
                        _ = rx => {
                            let _ = grace_tx.send(());
                            // Idle keep-alive connections of a client that is still alive must
                            // not keep the server up for ever.
                            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
                        }
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(5));
            })
            .map_err(|e| BenchError::new(format!("cannot start a server thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(BenchError::new(format!("{name} did not start: {e}"))),
            Err(_) => return Err(BenchError::new(format!("{name} did not start"))),
        }
        Ok(RunningServer {
            origin: format!("http://{addr}"),
            shutdown: Some(tx),
            thread: Some(thread),
            _temp: None,
        })
    }

    /// `http://127.0.0.1:{port}`
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Refuses any server that is not on this machine: benchmark traffic goes to loopback
/// addresses only.
pub fn check_loopback(url: &str) -> Result<String, BenchError> {
    let u = reqwest::Url::parse(url).map_err(|e| BenchError::new(format!("--url {url}: {e}")))?;
    if u.scheme() != "http" {
        return Err(BenchError::new(format!(
            "--url {url}: only http:// is supported (this build has no TLS)"
        )));
    }
    let loopback = match u.host_str() {
        Some("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    };
    if !loopback {
        return Err(BenchError::new(format!(
            "--url {url}: benchmarks only send traffic to this machine (127.0.0.0/8, ::1, localhost)"
        )));
    }
    let origin = u.origin().ascii_serialization();
    Ok(origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_urls_are_accepted() {
        assert_eq!(
            check_loopback("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(check_loopback("http://localhost:1").is_ok());
        assert!(check_loopback("http://[::1]:1").is_ok());
        assert!(check_loopback("http://10.0.0.1:8080").is_err());
        assert!(check_loopback("http://example.com").is_err());
        assert!(check_loopback("https://127.0.0.1").is_err());
    }
}
