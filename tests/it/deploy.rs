//! The deployment files name commands, flags, streams and endpoints that exist: each
//! Kubernetes container's args and each systemd ExecStart parse with idem's own command
//! line, run targets name configured streams, probes hit endpoints `idem serve` answers.

use std::path::{Path, PathBuf};

use clap::Parser;
use idem::cli::{Cli, Command};
use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn connectors() -> Vec<idem::connector::Connector> {
    let dir = root().join("connectors");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            idem::connector::load_file_with(f, &|name| {
                Some(if name.ends_with("_URL") {
                    "http://127.0.0.1:1".into()
                } else {
                    "placeholder".into()
                })
            })
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        })
        .collect()
}

/// Parses `args` as idem's command line and checks run/replay targets exist.
fn check_command(origin: &str, args: &[String], connectors: &[idem::connector::Connector]) {
    let cli = Cli::try_parse_from(std::iter::once("idem".to_string()).chain(args.iter().cloned()))
        .unwrap_or_else(|e| panic!("{origin}: `idem {}` does not parse: {e}", args.join(" ")));
    let targets = match &cli.command {
        Command::Run { targets, .. } => targets.clone(),
        Command::Replay { target, .. } => vec![target.clone()],
        _ => Vec::new(),
    };
    if !targets.is_empty() {
        idem::connector::select_streams(connectors, &targets)
            .unwrap_or_else(|e| panic!("{origin}: {e}"));
    }
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect()
}

use serde::Deserialize;

fn pod_spec(doc: &Value) -> Option<&Value> {
    match doc["kind"].as_str()? {
        "CronJob" => Some(&doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]),
        "Deployment" => Some(&doc["spec"]["template"]["spec"]),
        _ => None,
    }
}

#[test]
fn deploy_manifests_name_existing_commands_flags_streams_and_endpoints() {
    let connectors = connectors();
    let dir = root().join("deploy/kubernetes");
    let mut kinds = Vec::new();
    let mut config_toml = None;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        for doc in documents(&path) {
            let kind = doc["kind"]
                .as_str()
                .expect("every document has a kind")
                .to_string();
            if kind == "ConfigMap" {
                config_toml = doc["data"]["idem.toml"].as_str().map(str::to_string);
            }
            if kind == "CronJob" {
                assert_eq!(
                    doc["spec"]["concurrencyPolicy"],
                    "Forbid",
                    "{}",
                    path.display()
                );
            }
            if let Some(pod) = pod_spec(&doc) {
                assert_eq!(
                    pod["securityContext"]["runAsNonRoot"],
                    true,
                    "{}",
                    path.display()
                );
                for container in pod["containers"].as_sequence().unwrap() {
                    let args: Vec<String> = container["args"]
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .map(|a| a.as_str().unwrap().to_string())
                        .collect();
                    check_command(&path.display().to_string(), &args, &connectors);
                    assert!(
                        container["envFrom"][0]["secretRef"]["name"].is_string(),
                        "{}: secrets come from a Secret",
                        path.display()
                    );
                    if kind == "Deployment" {
                        assert_eq!(
                            args.iter().find(|a| *a == "serve").map(String::as_str),
                            Some("serve")
                        );
                        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
                        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
                    }
                }
            }
            kinds.push(kind);
        }
    }
    kinds.sort();
    assert!(
        kinds.iter().filter(|k| *k == "CronJob").count() >= 2,
        "{kinds:?}"
    );
    for kind in ["ConfigMap", "Deployment", "Secret", "Service"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
    // The ConfigMap's idem.toml is a valid config for those commands.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("idem.toml"),
        config_toml.expect("a ConfigMap with idem.toml"),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("connectors")).unwrap();
    std::fs::copy(
        root().join("connectors/stripe.toml"),
        dir.path().join("connectors/stripe.toml"),
    )
    .unwrap();
    let settings = idem::config::Settings::load(Some(&dir.path().join("idem.toml")))
        .expect("the ConfigMap's idem.toml loads");
    assert_eq!(
        settings.serve.admin_token.as_deref(),
        Some("${IDEM_ADMIN_TOKEN}")
    );
}

#[test]
fn deploy_systemd_units_run_existing_commands() {
    let connectors = connectors();
    for (unit, instance) in [
        ("idem-run@.service", "stripe.invoices"),
        ("idem-serve.service", ""),
    ] {
        let path = root().join("deploy/systemd").join(unit);
        let text = std::fs::read_to_string(&path).unwrap();
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{unit} has an ExecStart"));
        let words: Vec<String> = exec
            .split_whitespace()
            .skip(1)
            .map(|w| w.replace("%i", instance))
            .collect();
        check_command(unit, &words, &connectors);
    }
    let timer = std::fs::read_to_string(root().join("deploy/systemd/idem-run@.timer")).unwrap();
    assert!(timer.contains("OnCalendar="));
}
