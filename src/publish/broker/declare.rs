//! The exchanges the daemon declares: as data, which the tests and
//! `compose/rabbitmq/definitions.json` are checked against, and as the AMQP
//! calls that declare exactly these while connecting.

use std::collections::BTreeMap;

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::ExchangeKind;

use super::connect::ConnectAttempt;
use super::{block_on_until, Broker, BrokerError};

/// One exchange as the daemon declares it. As data, so that
/// `compose/rabbitmq/definitions.json` can be checked against it (a consumer
/// redeclaring an exchange with other flags gets `PRECONDITION_FAILED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeDeclaration {
    pub name: String,
    /// Exchange type, as RabbitMQ spells it.
    pub kind: &'static str,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    /// Always empty: the consumers declare the exchange without arguments, and
    /// arguments are part of the equivalence check.
    pub arguments: BTreeMap<String, serde_json::Value>,
}

/// The exchanges the daemon declares, in declaration order. The daemon never
/// declares a queue: queues, their dead-lettering and their TTL belong to the
/// consumers.
pub fn exchange_declarations(exchange: &str, dead_letter_exchange: &str) -> Vec<ExchangeDeclaration> {
    [exchange, dead_letter_exchange]
        .into_iter()
        .map(|name| ExchangeDeclaration {
            name: name.to_owned(),
            kind: "topic",
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: BTreeMap::new(),
        })
        .collect()
}

impl Broker {
    /// Declares the exchange and the dead-letter exchange, in that order, by
    /// the attempt's deadline.
    pub(super) fn declare_exchanges(&self, attempt: &ConnectAttempt<'_>) -> Result<(), BrokerError> {
        let settings = attempt.settings;
        for declaration in exchange_declarations(&settings.exchange, &settings.dead_letter_exchange) {
            debug_assert!(declaration.arguments.is_empty(), "declared without arguments");
            let options = ExchangeDeclareOptions {
                passive: false,
                durable: declaration.durable,
                auto_delete: declaration.auto_delete,
                internal: declaration.internal,
                nowait: false,
            };
            let declaring = self.channel.exchange_declare(
                declaration.name.as_str().into(),
                exchange_kind(declaration.kind),
                options,
                FieldTable::default(),
            );
            match block_on_until(attempt.deadline, declaring) {
                Some(Ok(())) => {}
                Some(Err(source)) => {
                    return Err(BrokerError::DeclareExchange {
                        exchange: declaration.name,
                        source: Box::new(source),
                    })
                }
                None => return Err(attempt.timed_out(format!("declare exchange {}", declaration.name))),
            }
        }
        Ok(())
    }
}

fn exchange_kind(kind: &str) -> ExchangeKind {
    match kind {
        "topic" => ExchangeKind::Topic,
        "direct" => ExchangeKind::Direct,
        "fanout" => ExchangeKind::Fanout,
        "headers" => ExchangeKind::Headers,
        other => ExchangeKind::Custom(other.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchanges_are_durable_topics_without_arguments() {
        let declarations = exchange_declarations("file_events", "file_events.dlx");
        let names: Vec<&str> = declarations
            .iter()
            .map(|declaration| declaration.name.as_str())
            .collect();
        assert_eq!(names, ["file_events", "file_events.dlx"]);
        for declaration in &declarations {
            assert_eq!(declaration.kind, "topic");
            assert!(declaration.durable && !declaration.auto_delete && !declaration.internal);
            assert!(declaration.arguments.is_empty());
        }
    }
}
