//! What an agent says of itself when it connects: its configured labels
//! and the facts every agent reports (`os`, `arch`, `hostname`, `kernel`,
//! `contactd_version`), read once per session (a host renamed or a kernel
//! upgraded shows at the next connection).

use crate::{
    config::AgentConfig,
    labels::{Labels, fact_value},
};

/// `config`'s labels and this machine's facts.
pub(super) fn labels(config: &AgentConfig) -> Labels {
    let mut labels = config.labels.clone();
    for (key, value) in facts() {
        labels.insert(key.to_owned(), value);
    }
    labels
}

/// The facts, as valid label values (a fact that cannot be read is empty).
fn facts() -> [(&'static str, String); 5] {
    // The running kernel's release, as `uname -r` prints it.
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    [
        ("os", fact_value(std::env::consts::OS)),
        ("arch", fact_value(std::env::consts::ARCH)),
        (
            "hostname",
            fact_value(&crate::config::host_name().unwrap_or_default()),
        ),
        ("kernel", fact_value(kernel.trim())),
        ("contactd_version", fact_value(env!("CARGO_PKG_VERSION"))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::{FACTS, valid_value};

    #[test]
    fn every_fact_is_reported_beside_the_configured_labels() {
        let mut config = AgentConfig::default();
        config.labels.insert("role".into(), "web".into());
        let labels = labels(&config);
        assert_eq!(labels.get("role"), Some("web"));
        for fact in FACTS {
            let value = labels.get(fact).unwrap_or_else(|| panic!("{fact} missing"));
            assert!(valid_value(value), "{fact}={value:?}");
        }
        assert_eq!(labels.get("os"), Some(std::env::consts::OS));
        assert_eq!(
            labels.get("contactd_version"),
            Some(env!("CARGO_PKG_VERSION"))
        );
        assert!(!labels.get("kernel").unwrap_or_default().is_empty());
    }
}
