//! Where a replay may publish. A stored dead letter names its target (exchange and routing key)
//! from the message's own headers, which whoever published the command could set: replaying it
//! there unchecked would let any publisher steer an operator's "replay all" into another
//! service's exchange, or through the default exchange into any queue. So a replay publishes
//! only to the targets this worker consumes (or an explicit `dead_letters.replay_targets` list);
//! anything else is kept, shown as not replayable with the reason, and never published.

use crate::config::Settings;
use crate::text::visible;

/// The targets a replay may publish to.
#[derive(Clone, Debug)]
pub struct ReplayTargets(Vec<(String, String)>);

impl ReplayTargets {
    /// `dead_letters.replay_targets`, or the command exchange and routing key when it is empty.
    pub fn new(settings: &Settings) -> Self {
        let configured = &settings.dead_letters.replay_targets;
        if configured.is_empty() {
            return Self(vec![(
                settings.broker.command_exchange.clone(),
                settings.broker.command_routing_key.clone(),
            )]);
        }
        Self(
            configured
                .iter()
                .map(|t| (t.exchange.clone(), t.routing_key.clone()))
                .collect(),
        )
    }

    /// Whether a dead letter naming this exchange and routing key may be replayed; if not, why.
    pub fn check(&self, exchange: &str, routing_key: &str) -> Result<(), String> {
        if self
            .0
            .iter()
            .any(|(e, k)| e == exchange && k == routing_key)
        {
            return Ok(());
        }
        Err(format!(
            "it names {} with routing key {}, not a target replay may publish to \
             (dead_letters.replay_targets: {}); its x-original-* headers may have been set by \
             whoever published the command",
            exchange_name(exchange),
            quoted(routing_key),
            self.0
                .iter()
                .map(|(e, k)| format!("{} {}", exchange_name(e), quoted(k)))
                .collect::<Vec<_>>()
                .join(", "),
        ))
    }
}

/// An exchange's name as people should read it: the default exchange (empty name) said in words.
pub fn exchange_name(exchange: &str) -> String {
    if exchange.is_empty() {
        "the default exchange (\"\", which routes to any queue by name)".into()
    } else {
        format!("exchange {}", quoted(exchange))
    }
}

fn quoted(text: &str) -> String {
    format!("\"{}\"", visible(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReplayTarget;

    fn settings() -> Settings {
        let mut settings = Settings::load(None).unwrap();
        settings.broker.command_exchange = "cmds".into();
        settings.broker.command_routing_key = "create".into();
        settings
    }

    #[test]
    fn only_the_commands_own_target_by_default() {
        let targets = ReplayTargets::new(&settings());
        assert_eq!(targets.check("cmds", "create"), Ok(()));
        for (exchange, key) in [
            ("other-service.commands", "create"),
            ("cmds", "other"),
            ("", "some-queue"),
            ("amq.topic", "create"),
            ("cmds ", "create"),
        ] {
            let why = targets.check(exchange, key).unwrap_err();
            assert!(why.contains("not a target replay may publish to"), "{why}");
        }
        let why = targets.check("", "q").unwrap_err();
        assert!(why.contains("the default exchange"), "{why}");
        let why = targets.check("x\u{202E}gpj", "k").unwrap_err();
        assert!(
            why.contains("⟨U+202E⟩") && !why.contains('\u{202E}'),
            "{why}"
        );
    }

    #[test]
    fn a_configured_list_replaces_the_default() {
        let mut settings = settings();
        settings.dead_letters.replay_targets = vec![ReplayTarget {
            exchange: "legacy".into(),
            routing_key: "create".into(),
        }];
        let targets = ReplayTargets::new(&settings);
        assert!(targets.check("legacy", "create").is_ok());
        assert!(targets.check("cmds", "create").is_err());
    }
}
