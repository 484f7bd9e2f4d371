//! Checks of the deployment files against the binaries they run, since no container runtime or
//! cluster runs here: `deploy/Dockerfile` (hadolint, and the image's user, ports and binaries),
//! `deploy/compose.yaml`, `deploy/kubernetes/*.yaml` (Kubernetes' JSON schemas through
//! kubernetes-validate, then ports, probes, flags, security settings and the disruption budgets),
//! and the IAM policy and table commands of `docs/deploy.md` against the storage engine's code.
//!
//! Layout: `main.rs` reads the files and the binaries' `--help` (this file); `docker.rs`,
//! `compose.rs`, `kubernetes.rs` and `docs.rs` hold the checks of each.
//!
//! The binaries are the ones cargo built beside this test (`scripts/test.sh` builds them first),
//! and hadolint and kubernetes-validate come from the venv that `scripts/python-tools.sh` makes.

mod compose;
mod docker;
mod docs;
mod kubernetes;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

/// The repository root (this package's manifest dir).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

/// Every document of a YAML file, as JSON values (merge keys `<<` applied, as compose does).
pub fn yaml_documents(relative: &str) -> Vec<Value> {
    let documents =
        YamlLoader::load_from_str(&read(relative)).unwrap_or_else(|error| panic!("{relative} is not YAML: {error}"));
    documents.iter().filter(|yaml| !yaml.is_null()).map(to_json).collect()
}

fn to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Real(text) => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Value::String(text.clone()), Value::Number),
        Yaml::Integer(number) => Value::from(*number),
        Yaml::String(text) => Value::String(text.clone()),
        Yaml::Boolean(flag) => Value::Bool(*flag),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::Hash(hash) => {
            let mut map = serde_json::Map::new();
            let mut merged = Vec::new();
            for (key, value) in hash {
                let key = match key {
                    Yaml::String(text) | Yaml::Real(text) => text.clone(),
                    Yaml::Integer(number) => number.to_string(),
                    Yaml::Boolean(flag) => flag.to_string(),
                    other => panic!("unsupported YAML key {other:?}"),
                };
                if key == "<<" {
                    merged.push(to_json(value));
                } else {
                    map.insert(key, to_json(value));
                }
            }
            // Keys written beside a merge key win over the merged ones.
            for source in merged {
                let sources = match source {
                    Value::Array(sources) => sources,
                    single => vec![single],
                };
                for source in sources {
                    let Value::Object(source) = source else {
                        panic!("merge key `<<` of a non-mapping")
                    };
                    for (key, value) in source {
                        map.entry(key).or_insert(value);
                    }
                }
            }
            Value::Object(map)
        }
        Yaml::Null => Value::Null,
        Yaml::Alias(_) | Yaml::BadValue => panic!("unresolved YAML node {yaml:?}"),
    }
}

/// A binary cargo built beside this test binary (target/<profile>/NAME).
pub fn workspace_binary(name: &str) -> PathBuf {
    let test_binary = std::env::current_exe().expect("test binary path");
    let profile_dir = test_binary.parent().and_then(Path::parent).expect("target/<profile>");
    let binary = profile_dir.join(name);
    assert!(
        binary.exists(),
        "{} not built: run scripts/test.sh, or `cargo build --workspace --bins` before the tests",
        binary.display()
    );
    binary
}

/// A test tool from the environment variable `variable`, else from the venv that
/// scripts/python-tools.sh makes; fails loudly when it is missing.
pub fn venv_tool(variable: &str, venv_path: &str) -> PathBuf {
    let path = std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv").join(venv_path));
    assert!(
        path.exists(),
        "{venv_path} not found at {}: run scripts/test.sh (or scripts/python-tools.sh), which installs the pinned test tools into .venv, or set {variable}",
        path.display()
    );
    path
}

/// One option of a binary's `--help`: its environment variable and default, when it has them.
#[derive(Debug, Clone, Default)]
pub struct HelpOption {
    pub env: Option<String>,
    pub default: Option<String>,
}

/// What a binary's `--help` offers: its options by long flag, and its subcommands.
#[derive(Debug)]
pub struct Help {
    pub binary: String,
    pub options: BTreeMap<String, HelpOption>,
    pub commands: Vec<String>,
}

impl Help {
    /// Runs `NAME --help` (the long help, which lists environment variables and defaults).
    pub fn of(name: &str) -> Help {
        // No inherited LOCKSTEP_* variable may change the defaults shown.
        let output = Command::new(workspace_binary(name))
            .arg("--help")
            .env_clear()
            .output()
            .unwrap_or_else(|error| panic!("cannot run {name} --help: {error}"));
        assert!(output.status.success(), "{name} --help failed: {output:?}");
        Help::parse(name, &String::from_utf8(output.stdout).expect("help is UTF-8"))
    }

    fn parse(binary: &str, text: &str) -> Help {
        let mut options = BTreeMap::new();
        let mut commands = Vec::new();
        let mut section = "";
        let mut current: Option<String> = None;
        for line in text.lines() {
            if !line.starts_with(' ') && line.ends_with(':') {
                section = line.trim_end_matches(':');
                current = None;
                continue;
            }
            let trimmed = line.trim_start();
            match section {
                "Commands" if line.starts_with("  ") && !line.starts_with("   ") => {
                    if let Some(command) = trimmed.split_whitespace().next() {
                        commands.push(command.to_owned());
                    }
                }
                "Options" => {
                    if trimmed.starts_with('-') && line.len() - trimmed.len() <= 6 {
                        let flag = trimmed
                            .split([' ', ','])
                            .find(|word| word.starts_with("--"))
                            .map(str::to_owned);
                        if let Some(flag) = &flag {
                            options.insert(flag.clone(), HelpOption::default());
                        }
                        current = flag;
                    }
                    if let Some(option) = current.as_ref().and_then(|flag| options.get_mut(flag)) {
                        if let Some(env) = bracketed(line, "[env: ") {
                            option.env = Some(env.trim_end_matches('=').split('=').next().unwrap_or("").to_owned());
                        }
                        if let Some(default) = bracketed(line, "[default: ") {
                            option.default = Some(default.to_owned());
                        }
                    }
                }
                _ => {}
            }
        }
        Help {
            binary: binary.to_owned(),
            options,
            commands,
        }
    }

    /// The option whose environment variable is `env`.
    pub fn option_by_env(&self, env: &str) -> Option<(&String, &HelpOption)> {
        self.options
            .iter()
            .find(|(_, option)| option.env.as_deref() == Some(env))
    }

    pub fn default_of(&self, flag: &str) -> &str {
        self.options
            .get(flag)
            .and_then(|option| option.default.as_deref())
            .unwrap_or_else(|| panic!("{} --help shows no default for {flag}", self.binary))
    }

    /// Whether the access-control work (TLS, bearer tokens, `--insecure`) is in this binary.
    pub fn has_access_control(&self) -> bool {
        self.options.contains_key("--insecure")
    }
}

fn bracketed<'a>(line: &'a str, opening: &str) -> Option<&'a str> {
    let start = line.find(opening)? + opening.len();
    let end = line[start..].find(']')? + start;
    Some(&line[start..end])
}

/// Flags of the access-control work (issue 10) that the deploy files use before they exist:
/// TLS, bearer tokens, the plaintext health listener and the services' credentials for the
/// coordinator. docs/deploy.md lists them. Accepted only while the binary has no `--insecure`:
/// once that work is in, every flag the deploy files name must be real.
pub const ACCESS_CONTROL_FLAGS: &[&str] = &[
    "--tls-cert",
    "--tls-key",
    "--tls-client-ca",
    "--auth-file",
    "--insecure",
    "--health-listen",
    "--coordinator-ca",
    "--coordinator-token-file",
];

/// The environment variable of `--insecure`, by the LOCKSTEP_<FLAG> convention of every flag.
pub const ACCESS_CONTROL_VARIABLES: &[&str] = &["LOCKSTEP_INSECURE"];

/// Checks that `binary` accepts every flag in `arguments` and every LOCKSTEP_* name in
/// `variables`; `context` names the file and container in the failure.
pub fn assert_known_to(help: &Help, context: &str, arguments: &[String], variables: &[String]) {
    let pending = !help.has_access_control();
    for argument in arguments {
        if let Some(flag) = argument.strip_prefix("--") {
            let flag = format!("--{}", flag.split('=').next().unwrap_or(flag));
            let known = help.options.contains_key(&flag) || (pending && ACCESS_CONTROL_FLAGS.contains(&flag.as_str()));
            assert!(known, "{context}: {} has no flag {flag}", help.binary);
        } else if !argument.starts_with('-') && !argument.contains('=') {
            assert!(
                help.commands.contains(argument),
                "{context}: {} has no command {argument} (commands: {:?})",
                help.binary,
                help.commands
            );
        }
    }
    for variable in variables.iter().filter(|variable| variable.starts_with("LOCKSTEP_")) {
        let known = help.option_by_env(variable).is_some()
            || (pending && ACCESS_CONTROL_VARIABLES.contains(&variable.as_str()));
        assert!(
            known,
            "{context}: {} reads no environment variable {variable}",
            help.binary
        );
    }
}

/// The port of a listen address such as `0.0.0.0:50051`.
pub fn port_of(address: &str) -> u16 {
    address
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {address}"))
}

/// Reads the help parser on a sample of clap's two layouts, so a failure elsewhere is not the
/// parser's.
#[test]
fn help_parser_reads_flags_environment_and_defaults() {
    let text = "Usage: x [OPTIONS] [COMMAND]\n\nCommands:\n  serve          Serve\n  create-tables  Create\n\nOptions:\n      --listen <LISTEN>\n          Address\n          \n          [env: LOCKSTEP_LISTEN=]\n          [default: 127.0.0.1:50051]\n\n      --port <PORT>\n          Port [env: LOCKSTEP_PORT=] [default: 8081]\n  -h, --help\n          Print help\n";
    let help = Help::parse("x", text);
    assert_eq!(help.commands, ["serve", "create-tables"]);
    assert_eq!(help.default_of("--listen"), "127.0.0.1:50051");
    assert_eq!(help.default_of("--port"), "8081");
    assert_eq!(
        help.option_by_env("LOCKSTEP_PORT").map(|(flag, _)| flag.as_str()),
        Some("--port")
    );
    assert!(help.options.contains_key("--help"));
}
