//! The index and the store agree after a crash: SIGKILL the real server binary while it
//! ingests and indexes; after a restart, search returns exactly the resources a full scan of the
//! store finds. And `fhir-server reindex` rebuilds a lost index from the store.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::binary::start;
use common::next_link;
use reqwest::{Client, StatusCode};
use serde_json::Value;

fn observation(n: usize) -> String {
    format!(
        r#"{{"resourceType":"Observation","identifier":[{{"system":"urn:test:crash","value":"m-{n}"}}],
        "status":"final","code":{{"coding":[{{"system":"http://loinc.org","code":"8867-4"}}]}},
        "subject":{{"reference":"Patient/p{}"}},"effectiveDateTime":"2024-03-01T10:00:00+01:00",
        "valueQuantity":{{"value":{n},"unit":"/min"}}}}"#,
        n % 5
    )
}

async fn get_json(client: &Client, url: &str) -> Value {
    let r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "GET {url}");
    r.json().await.unwrap()
}

/// The live Observations by a full scan of the store: the newest history entry of each id.
async fn store_scan(client: &Client, base: &str) -> BTreeSet<String> {
    let mut newest: BTreeMap<String, bool> = BTreeMap::new();
    let mut url = Some(format!(
        "{base}/fhir/default/Observation/_history?_count=1000"
    ));
    while let Some(u) = url {
        let page = get_json(client, &u).await;
        for e in page["entry"].as_array().into_iter().flatten() {
            let full = e["fullUrl"].as_str().unwrap();
            let id = full.rsplit('/').next().unwrap().to_string();
            let deleted = e["request"]["method"] == "DELETE";
            newest.entry(id).or_insert(!deleted);
        }
        url = next_link(&page);
    }
    newest
        .into_iter()
        .filter(|(_, live)| *live)
        .map(|(id, _)| id)
        .collect()
}

/// Every Observation a search returns, over all pages.
async fn search_all(client: &Client, base: &str, query: &str) -> (u64, BTreeSet<String>) {
    let first = get_json(
        client,
        &format!("{base}/fhir/default/Observation?{query}&_count=1000"),
    )
    .await;
    let total = first["total"].as_u64().unwrap();
    let mut ids = BTreeSet::new();
    let mut page = Some(first);
    while let Some(p) = page {
        for e in p["entry"].as_array().into_iter().flatten() {
            assert!(
                ids.insert(e["resource"]["id"].as_str().unwrap().to_string()),
                "repeated"
            );
        }
        page = match next_link(&p) {
            Some(u) => Some(get_json(client, &u).await),
            None => None,
        };
    }
    (total, ids)
}

async fn kill_mid_ingest_then_agree(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), backend);
    let client = Client::new();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let searches = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..6 {
        let (client, acked, stop, url) = (
            client.clone(),
            acked.clone(),
            stop.clone(),
            server.url.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = w * 1_000_000;
            let mut mine: Vec<String> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // Mostly creates; some deletes, so the index has stale entries to remove.
                let r = if n % 7 == 0 && !mine.is_empty() {
                    let id = mine.remove(0);
                    client
                        .delete(format!("{url}/fhir/default/Observation/{id}"))
                        .send()
                        .await
                } else {
                    client
                        .post(format!("{url}/fhir/default/Observation"))
                        .header("content-type", "application/fhir+json")
                        .body(observation(n))
                        .send()
                        .await
                };
                match r {
                    Ok(r) if r.status() == StatusCode::CREATED => {
                        if let Ok(v) = r.json::<Value>().await {
                            let id = v["id"].as_str().unwrap().to_string();
                            mine.push(id.clone());
                            acked.lock().unwrap().push(id);
                        }
                    }
                    Ok(r) if r.status() == StatusCode::NO_CONTENT => {}
                    _ => break,
                }
            }
        }));
    }
    for _ in 0..2 {
        // Searches make the index commit while writes go on.
        let (client, stop, url, searches) = (
            client.clone(),
            stop.clone(),
            server.url.clone(),
            searches.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client
                    .get(format!(
                        "{url}/fhir/default/Observation?code=8867-4&_summary=count"
                    ))
                    .send()
                    .await
                {
                    Ok(r) if r.status() == StatusCode::OK => {
                        searches.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => break,
                };
            }
        }));
    }
    let mut waited = 0;
    while (acked.lock().unwrap().len() < 300 || searches.load(Ordering::Relaxed) < 10)
        && waited < 400
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    let mut server = server;
    server.child.kill().expect("SIGKILL");
    server.child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    assert!(
        acked.lock().unwrap().len() >= 50,
        "the test needs writes in flight"
    );
    assert!(
        searches.load(Ordering::Relaxed) >= 1,
        "the test needs index commits in flight"
    );

    let server = start(dir.path(), backend);
    let live = store_scan(&client, &server.url).await;
    let (total, found) = search_all(&client, &server.url, "_sort=_id").await;
    assert_eq!(
        found, live,
        "{backend}: search and the store disagree after SIGKILL"
    );
    assert_eq!(total as usize, live.len());
    let (_, by_code) = search_all(&client, &server.url, "code=http://loinc.org|8867-4").await;
    assert_eq!(by_code, live);
    // Every acknowledged resource that is still live is found by its identifier.
    let acked = acked.lock().unwrap().clone();
    let acked_live: Vec<&String> = acked.iter().filter(|id| live.contains(*id)).collect();
    assert!(!acked_live.is_empty());
    for id in acked_live.iter().step_by(25) {
        let b = get_json(
            &client,
            &format!("{}/fhir/default/Observation?_id={id}", server.url),
        )
        .await;
        assert_eq!(b["total"], 1, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn index_and_store_agree_after_sigkill_redb() {
    kill_mid_ingest_then_agree("redb").await;
}

#[cfg(feature = "sled")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn index_and_store_agree_after_sigkill_sled() {
    kill_mid_ingest_then_agree("sled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reindex_rebuilds_a_lost_index() {
    let dir = tempfile::tempdir().unwrap();
    let client = Client::new();
    let mut ids = Vec::new();
    {
        let server = start(dir.path(), "redb");
        for n in 0..25 {
            let r = client
                .post(format!("{}/fhir/default/Observation", server.url))
                .header("content-type", "application/fhir+json")
                .body(observation(n))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
            ids.push(
                r.json::<Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        let r = client
            .delete(format!(
                "{}/fhir/default/Observation/{}",
                server.url, ids[0]
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
    // The index is derived data: throw it away and rebuild it from the store.
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fhir-server"))
        .args(["reindex", "--tenant", "default", "--data"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("reindexed tenant default up to change 26"),
        "{stdout}"
    );
    assert!(dir.path().join("index").join("default").is_dir());
    let out = Command::new(env!("CARGO_BIN_EXE_fhir-server"))
        .args(["reindex", "--tenant", "nobody", "--data"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tenant 'nobody'"));

    let server = start(dir.path(), "redb");
    let (total, found) = search_all(&client, &server.url, "code=8867-4").await;
    assert_eq!(total, 24);
    let want: BTreeSet<String> = ids[1..].iter().cloned().collect();
    assert_eq!(found, want);
    let b = get_json(
        &client,
        &format!(
            "{}/fhir/default/Observation?value-quantity=gt20",
            server.url
        ),
    )
    .await;
    assert_eq!(b["total"], 4);
}
