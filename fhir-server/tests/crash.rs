//! Durability: SIGKILL the real server binary during a stream of writes; after a restart every
//! acknowledged write is there and nothing half-written is.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::binary::start;
use reqwest::StatusCode;
use serde_json::Value;

fn observation(n: usize) -> String {
    format!(
        r#"{{"resourceType":"Observation","identifier":[{{"system":"urn:test:crash","value":"m-{n}"}}],
        "status":"final","code":{{"coding":[{{"system":"http://loinc.org","code":"8867-4"}}]}},
        "subject":{{"reference":"Patient/p1"}},"effectiveDateTime":"2024-03-01T10:00:00+01:00",
        "valueQuantity":{{"value":{n}.50,"unit":"/min"}}}}"#
    )
}

async fn crash_and_recover(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), backend);
    let client = reqwest::Client::new();
    let acked: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (client, acked, stop, url) = (
            client.clone(),
            acked.clone(),
            stop.clone(),
            server.url.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut n = w * 1_000_000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let r = client
                    .post(format!("{url}/fhir/default/Observation"))
                    .header("content-type", "application/fhir+json")
                    .body(observation(n))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == StatusCode::CREATED => {
                        if let Ok(v) = r.json::<Value>().await {
                            let id = v["id"].as_str().unwrap().to_string();
                            acked.lock().unwrap().push((id, n));
                        }
                    }
                    // The kill lands mid-request: no acknowledgement, no promise.
                    _ => break,
                }
            }
        }));
    }
    // Let writes flow, then kill without warning.
    let mut waited = 0;
    while acked.lock().unwrap().len() < 200 && waited < 600 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    server.child.kill().expect("SIGKILL");
    server.child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 50,
        "the test needs writes in flight ({} acked)",
        acked.len()
    );

    let server = start(dir.path(), backend);
    for (id, n) in &acked {
        let r = client
            .get(format!("{}/fhir/default/Observation/{id}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "acknowledged {id} lost on {backend}"
        );
        let text = r.text().await.unwrap();
        assert!(text.contains(&format!("\"value\":\"m-{n}\"")), "{text}");
        assert!(text.contains(&format!("\"value\":{n}.50")), "{text}");
    }
    // Every change the log holds is complete: its version reads back whole.
    let mut url = format!("{}/fhir/default/_history?_count=1000", server.url);
    let mut seen = 0;
    loop {
        let page: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
        for e in page["entry"].as_array().into_iter().flatten() {
            seen += 1;
            let id = e["resource"]["id"]
                .as_str()
                .expect("history entry has its resource");
            let r = client
                .get(format!(
                    "{}/fhir/default/Observation/{id}/_history/1",
                    server.url
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["status"], "final");
        }
        match common::next_link(&page) {
            Some(next) => url = next,
            None => break,
        }
    }
    assert!(
        seen >= acked.len(),
        "history has {seen} entries, {} were acked",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_no_acknowledged_write_redb() {
    crash_and_recover("redb").await;
}

#[cfg(feature = "sled")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_no_acknowledged_write_sled() {
    crash_and_recover("sled").await;
}
