//! `portcullis-relay audit`: every admin action and every policy reload of a running relay
//! is in the audit log, and the command lists it, filtered by identity, action and time,
//! as a table or JSON; a time it cannot read is refused with the forms it takes.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use portcullis_e2e::{POLICY, Stack, World, eventually, metric, relay_cli};

const ANY: &str = "127.0.0.1:0";

/// `audit --json` with `args`: (action, subject) of each event.
fn events(w: &World, args: &[&str]) -> Vec<(String, String)> {
    let mut all = vec!["audit", "--json"];
    all.extend(args);
    let out = w.admin(&all);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
            (
                e["action"].as_str().unwrap().to_owned(),
                e["subject"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn has(events: &[(String, String)], action: &str, subject: &str) -> bool {
    events
        .iter()
        .any(|(a, s)| a == action && (s == subject || subject.is_empty()))
}

#[tokio::test]
async fn admin_actions_and_policy_reloads_are_audited_and_listed_with_filters() {
    let w = World::new();
    w.issue_device("alice", "alice", &["eng"], None);
    w.issue_connector("c1", &["app.internal"]);
    let token = w.admin(&[
        "token",
        "create",
        "device",
        "--user",
        "bob",
        "--relay",
        "127.0.0.1:4433",
    ]);
    assert!(token.lines().last().unwrap().starts_with("pct1_"));
    w.admin(&["revoke", "device", "alice"]);
    let path = w.write_relay_config(ANY, ANY, ANY, POLICY);
    let (relay, _addrs) = w.start_relay().await;
    // A policy change, then a broken file, while the relay runs.
    let text = std::fs::read_to_string(&path).unwrap();
    let changed = text.replace("groups = [\"eng\"]", "groups = [\"eng\", \"ops\"]");
    assert_ne!(changed, text);
    std::fs::write(&path, &changed).unwrap();
    relay.signal("HUP");
    relay
        .wait_for_log("policy reloaded", Duration::from_secs(20))
        .await;
    std::fs::write(&path, format!("{changed}\n[[policy]]\nhostnames = 3\n")).unwrap();
    relay.signal("HUP");
    let refused = eventually(Duration::from_secs(20), || async {
        has(&events(&w, &[]), "policy.reload.refused", "").then_some(())
    })
    .await;
    assert!(refused.is_some(), "{}", relay.log_text());

    let all = events(&w, &[]);
    for (action, subject) in [
        ("ca.init", "ca"),
        ("issue", "device:alice"),
        ("issue", "connector:c1"),
        ("revoke", "device:alice"),
        ("policy.reload", ""),
    ] {
        assert!(
            has(&all, action, subject),
            "no {action} {subject} in {all:?}"
        );
    }
    assert!(
        all.iter()
            .any(|(a, s)| a == "token.create" && s.starts_with("token:")),
        "{all:?}"
    );
    // By identity (the id alone, or role:id), by action, by time.
    let alice = events(&w, &["--identity", "alice"]);
    assert_eq!(
        alice,
        vec![
            ("issue".to_owned(), "device:alice".to_owned()),
            ("revoke".to_owned(), "device:alice".to_owned()),
        ]
    );
    assert_eq!(events(&w, &["--identity", "device:alice"]), alice);
    let revokes = events(&w, &["--action", "revoke"]);
    assert_eq!(revokes, vec![("revoke".into(), "device:alice".into())]);
    assert_eq!(events(&w, &["--since", "1h"]).len(), all.len());
    assert!(events(&w, &["--until", "2001-01-01T00:00:00Z"]).is_empty());
    assert!(events(&w, &["--since", "2999-01-01T00:00:00Z"]).is_empty());
    // The table names every event too.
    let table = w.admin(&["audit", "--identity", "c1"]);
    assert!(
        table.lines().next().unwrap().starts_with("TIME (UTC)"),
        "{table}"
    );
    assert!(table.contains("connector:c1"), "{table}");
    // A time it cannot read.
    let out = relay_cli(&["audit", "--since", "yesterday-ish", "--state", w.state()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("neither a time"), "{err}");
}

#[tokio::test]
async fn audit_output_names_each_actor_escapes_control_characters_and_ends_quietly_at_a_closed_pipe()
 {
    use portcullis_shared::store::{AuditEvent, SqliteStore, Store, TokenGrant, TokenRecord};
    let w = World::new();
    w.issue_device("alice", "alice", &["eng"], None);
    // Text with a line break, a forged audit line and a terminal escape in it, as an older
    // release, a careless script or a hostile identity provider might have stored: the
    // commands refuse such names, so it goes into the store directly.
    let store = SqliteStore::open(&w.path("state/portcullis.db")).unwrap();
    let evil = "eve\n2026-12-07T00:00:00Z  revoke  device:ceo  \u{1b}[2J";
    let row = |at: i64, subject: &str| AuditEvent {
        at,
        action: "revoke".into(),
        subject: subject.into(),
        detail: "a row of some length to fill the pipe quickly".into(),
        actor: "local:test".into(),
    };
    store.audit(&row(1_700_000_000, evil)).unwrap();
    store
        .create_token(&TokenRecord {
            id: "AAAAAAAA".into(),
            secret_sha256: "0".repeat(64),
            grant: TokenGrant {
                role: portcullis_shared::identity::Role::Device,
                user: Some(evil.into()),
                groups: vec![],
                name: None,
                hostnames: vec![],
                cert_ttl_secs: 3600,
            },
            created_at: 1_700_000_000,
            expires_at: 1_700_000_000,
            used_at: None,
            revoked_at: None,
        })
        .unwrap();

    // Every row the admin commands wrote names who ran them, in JSON and in the table.
    let json: serde_json::Value = serde_json::from_str(&w.admin(&["audit", "--json"])).unwrap();
    let rows = json.as_array().unwrap();
    assert!(rows.len() >= 3, "{json}");
    for e in rows.iter().filter(|e| e["actor"] != "local:test") {
        assert!(e["actor"].as_str().unwrap().starts_with("local:"), "{e}");
        assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
    }
    let table = w.admin(&["audit"]);
    assert!(table.lines().next().unwrap().contains("ACTOR"), "{table}");
    assert!(
        table.lines().skip(1).all(|l| l.contains(" local:")),
        "{table}"
    );

    // Control characters are escaped: each row stays one line, and no line is forged.
    for args in [&["token", "list"][..], &["audit"]] {
        let out = w.admin(args);
        assert!(
            !out.lines().any(|l| l.starts_with("2026-12-07T00:00:00Z")),
            "{args:?}: {out}"
        );
        assert!(!out.contains('\u{1b}'), "{args:?}: {out}");
        assert!(
            out.contains(r"eve\n2026-12-07T00:00:00Z"),
            "{args:?}: {out}"
        );
        assert!(out.contains(r"\u{1b}[2J"), "{args:?}: {out}");
    }
    // Times are RFC 3339, in every table.
    let rfc3339 = |s: &str| s.len() == 20 && s.ends_with('Z') && s.as_bytes()[10] == b'T';
    for args in [&["token", "list"][..], &["list"], &["audit"]] {
        let out = w.admin(args);
        let row = out.lines().nth(1).unwrap();
        assert!(row.split_whitespace().any(rfc3339), "{args:?}: {out}");
    }

    // `audit | head -1`: the first line, then a quiet exit, though most rows were still
    // to be written when head went (more than a pipe holds).
    for n in 0..2000 {
        store
            .audit(&row(1_800_000_000 + n, "device:alice"))
            .unwrap();
    }
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg("set -o pipefail; \"$0\" audit --state \"$1\" | head -1")
        .arg(portcullis_e2e::bin("portcullis-relay"))
        .arg(w.state())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert!(stderr.is_empty(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("TIME (UTC)"));
}

/// Size of the relay's SQLite store on disk, write-ahead log included.
fn store_bytes(w: &World) -> u64 {
    ["portcullis.db", "portcullis.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(w.path(&format!("state/{f}"))).ok())
        .map(|m| m.len())
        .sum()
}

#[tokio::test]
async fn an_enrolment_flood_grows_the_store_by_a_bounded_amount_and_forges_no_audit_line() {
    use portcullis_shared::enroll_client::exchange;
    use portcullis_shared::proto::{EnrollRequest, EnrollResponse};
    use portcullis_shared::token::EnrollToken;

    let s = Stack::up().await;
    let quic = s.addrs.quic.to_string();
    let out = s.w.admin(&[
        "token", "create", "device", "--user", "kim", "--relay", &quic,
    ]);
    let token = EnrollToken::decode(out.lines().last().unwrap()).unwrap();
    let rows_before = events(&s.w, &[]).len();
    let bytes_before = store_bytes(&s.w);

    // What a stranger would like the audit log to show.
    let forged_line = "\n2026-12-07T00:00:00Z  revoke  device:ceo  forged by mallory\n";
    let long_id = forged_line.repeat(60 * 1024 / forged_line.len());
    let requests = [
        // A token id of ~60 KiB full of newlines and a forged audit line.
        (long_id.clone(), "A".repeat(43)),
        // A 64 KiB token id: the request itself is too large.
        ("x".repeat(64 * 1024), "A".repeat(43)),
        // A token's shape with a wrong secret: looked up, refused, then rate-limited.
        (token.id.clone(), "B".repeat(43)),
    ];
    const ROUNDS: usize = 40;
    for round in 0..ROUNDS {
        for (token_id, secret) in &requests {
            let request = EnrollRequest::Enroll {
                token_id: token_id.clone(),
                secret: secret.clone(),
                csr: "not a CSR".into(),
                name: Some(format!("flood-{round}\nforged")),
            };
            let answer = exchange(
                &token.relay,
                None,
                &token.server_name,
                &token.ca_sha256,
                None,
                &request,
            )
            .await;
            assert!(
                matches!(answer, Ok(EnrollResponse::Refused { .. }) | Err(_)),
                "{answer:?}"
            );
        }
    }
    let rows = events(&s.w, &[]).len() - rows_before;
    let grown = store_bytes(&s.w).saturating_sub(bytes_before);
    eprintln!(
        "store growth under {} refused enrolments from one address: {rows} audit rows, {grown} bytes",
        ROUNDS * requests.len()
    );
    // One row for this address this minute (two if the minute turned during the flood).
    assert!((1..=2).contains(&rows), "{rows} audit rows");
    assert!(grown < 256 * 1024, "the store grew by {grown} bytes");
    // Nothing the stranger sent is in the audit log, as a table or as JSON.
    let table = s.w.admin(&["audit"]);
    let json = s.w.admin(&["audit", "--json"]);
    for out in [&table, &json] {
        assert!(
            !out.contains("device:ceo") && !out.contains("mallory"),
            "{out}"
        );
    }
    // Every refusal was counted, by reason.
    let counted = |reason: &str| {
        let series = format!("portcullis_relay_enrolment_refusals_total{{reason=\"{reason}\"}}");
        let admin = s.addrs.admin;
        async move { metric(admin, &series).await.unwrap_or(0) }
    };
    assert_eq!(counted("malformed").await, 2 * ROUNDS as i64);
    // The well-shaped ones: refused for their CSR until the address is rate-limited.
    assert_eq!(counted("request").await, 10);
    assert_eq!(counted("rate_limited").await, ROUNDS as i64 - 10);
    // The flood spent no token.
    let tokens = s.w.admin(&["token", "list", "--json"]);
    assert!(!tokens.contains("\"used\""), "{tokens}");
}
