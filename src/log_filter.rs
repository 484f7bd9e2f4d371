//! `RUST_LOG`, read with tracing-subscriber's `Targets` filter rather than its `EnvFilter`: the
//! latter compiles directives with a regex engine, a large dependency to build for a filter read
//! once at start (docs/deploy.md, Build time).
//!
//! Understood: a level (`RUST_LOG=debug`), `target=level` pairs (`lockstep_coordinator=debug`),
//! or both, comma-separated (`warn,lockstep_coordinator::server=info`); a target covers the
//! modules under it, and the longest matching target decides. `EnvFilter`'s span and field
//! directives (`[span{field=value}]`) are not: a value that does not parse logs at `info`, as
//! an unset or empty one does.

use tracing_subscriber::filter::{LevelFilter, Targets};

/// The filter `RUST_LOG` asks for, `info` when it is unset, empty or not understood.
pub(crate) fn from_env() -> Targets {
    parse(std::env::var("RUST_LOG").ok().as_deref())
}

fn parse(directives: Option<&str>) -> Targets {
    directives
        .filter(|directives| !directives.trim().is_empty())
        .and_then(|directives| directives.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO))
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::parse;

    const COORDINATOR: &str = "lockstep_coordinator::service::lease";
    const SERVER: &str = "lockstep_coordinator::server";
    const DEPENDENCY: &str = "h2::codec";

    #[test]
    fn unset_empty_and_unreadable_log_at_info() {
        for directives in [
            None,
            Some(""),
            Some("  "),
            Some("[span{user=alice}]=debug"),
            Some("lockstep=loud"),
        ] {
            let filter = parse(directives);
            assert!(filter.would_enable(COORDINATOR, &Level::INFO), "{directives:?}");
            assert!(!filter.would_enable(COORDINATOR, &Level::DEBUG), "{directives:?}");
            assert!(filter.would_enable(DEPENDENCY, &Level::WARN), "{directives:?}");
        }
    }

    #[test]
    fn a_level_applies_to_every_target() {
        let filter = parse(Some("debug"));
        assert!(filter.would_enable(COORDINATOR, &Level::DEBUG));
        assert!(filter.would_enable(DEPENDENCY, &Level::DEBUG));
        assert!(!filter.would_enable(COORDINATOR, &Level::TRACE));
        assert!(parse(Some("warn")).would_enable(SERVER, &Level::WARN));
        assert!(!parse(Some("warn")).would_enable(SERVER, &Level::INFO));
        assert!(!parse(Some("off")).would_enable(SERVER, &Level::ERROR));
    }

    #[test]
    fn a_target_covers_its_modules_and_only_them() {
        let filter = parse(Some("lockstep_coordinator=debug"));
        assert!(filter.would_enable(COORDINATOR, &Level::DEBUG));
        assert!(filter.would_enable("lockstep_coordinator", &Level::DEBUG));
        assert!(!filter.would_enable(DEPENDENCY, &Level::ERROR));
    }

    #[test]
    fn the_most_specific_target_decides() {
        // The form the bank test gives its coordinators (bank/src/cluster.rs).
        let filter = parse(Some("warn,lockstep_coordinator::server=info"));
        assert!(filter.would_enable(SERVER, &Level::INFO));
        assert!(!filter.would_enable(COORDINATOR, &Level::INFO));
        assert!(filter.would_enable(COORDINATOR, &Level::WARN));
        assert!(!filter.would_enable(DEPENDENCY, &Level::INFO));
        let filter = parse(Some("info,lockstep_coordinator=debug,h2=error"));
        assert!(filter.would_enable(COORDINATOR, &Level::DEBUG));
        assert!(!filter.would_enable(DEPENDENCY, &Level::WARN));
        assert!(filter.would_enable("tonic::transport", &Level::INFO));
    }
}
