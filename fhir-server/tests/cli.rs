//! The `fhir-server` binary's tenant commands and `serve` on a fresh data folder.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fhir-server"));
    c.env("RUST_LOG", "error");
    c
}

fn run(args: &[&str], data: &std::path::Path) -> (bool, String, String) {
    let out = bin().args(args).arg("--data").arg(data).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn tenant_commands_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    let (ok, _, err) = run(&["tenant", "list"], &data);
    assert!(!ok, "listing a missing folder fails");
    assert!(err.contains("no data folder"), "{err}");
    assert!(!data.exists(), "and does not create it");

    let (ok, out, err) = run(
        &["tenant", "create", "hf-vest", "--name", "Helse Vest"],
        &data,
    );
    assert!(ok, "{err}");
    assert!(out.contains("hf-vest"));
    let (ok, _, err) = run(&["tenant", "create", "hf-vest"], &data);
    assert!(!ok);
    assert!(err.contains("exists"), "{err}");
    let (ok, _, err) = run(&["tenant", "create", "bad id"], &data);
    assert!(!ok);
    assert!(err.contains("invalid tenant id"), "{err}");
    run(&["tenant", "create", "hf-nord"], &data);
    let (ok, out, _) = run(&["tenant", "list"], &data);
    assert!(ok);
    let ids: Vec<&str> = out.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(ids, ["hf-nord", "hf-vest"]);
    assert!(out.contains("Helse Vest"));
    let (ok, _, _) = run(&["tenant", "remove", "hf-nord"], &data);
    assert!(ok);
    let (ok, _, err) = run(&["tenant", "remove", "hf-nord"], &data);
    assert!(!ok);
    assert!(err.contains("no tenant"), "{err}");

    // An existing folder keeps its tenants and gets no `default`.
    let mut child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--no-auth", "--data"])
        .arg(&data)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let client = reqwest::Client::new();
    let ok = client
        .get(format!("{url}/fhir/hf-vest/metadata"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let none = client
        .get(format!("{url}/fhir/default/metadata"))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 404);
    child.kill().unwrap();
    child.wait().unwrap();

    // A fresh folder gets the `default` tenant.
    let fresh = dir.path().join("fresh");
    let mut child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--no-auth", "--data"])
        .arg(&fresh)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let r = client
        .get(format!("{url}/fhir/default/metadata"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn serve_refuses_to_start_without_auth_config_or_no_auth() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = bin()
        .env_remove("FHIR_AUTH_CONFIG")
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--auth-config"), "{err}");
    assert!(err.contains("--no-auth"), "{err}");

    // A configuration with an issuer whose JWKS file is missing fails start-up too.
    let cfg = dir.path().join("auth.toml");
    std::fs::write(
        &cfg,
        "[auth]\nmode = \"on\"\n[[auth.issuer]]\nissuer = \"https://idp.test\"\n\
         jwks_file = \"/nonexistent/jwks.json\"\naudiences = [\"fhir\"]\n",
    )
    .unwrap();
    let out = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--auth-config"])
        .arg(&cfg)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("jwks_file"), "{err}");
}
