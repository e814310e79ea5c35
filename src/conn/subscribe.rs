//! The checks of a new subscription, shared by every kind of subscriber (MQTT SUBSCRIBE,
//! the topics of an HTTP stream): which filters are refused and why, and whether retained
//! messages follow. No I/O.

use crate::broker::Broker;
use crate::metrics::{self, Counter};
use crate::protocol::ReasonCode;
use crate::router::valid_subscription;
use crate::security::acl::{Access, Authorizer};
use crate::session::{NotOwner, Session};

/// Why a subscription to `filter` by the session `conn_id` owns is refused (the 5.0
/// reason code), if it is: not a valid filter, not allowed by the ACL, a feature switched
/// off, or past `limits.max_subscriptions` (a subscription the session has is only
/// replaced).
pub fn refusal(
    broker: &Broker,
    authorizer: &Authorizer,
    session: &Session,
    conn_id: u64,
    filter: &str,
    shared: bool,
) -> Result<Option<ReasonCode>, NotOwner> {
    let cfg = &broker.config;
    let code = if !valid_subscription(filter) {
        ReasonCode::TopicFilterInvalid
    } else if !authorizer.check(filter, Access::Subscribe) {
        metrics::add(Counter::SubscribeDenied, 1);
        ReasonCode::NotAuthorized
    } else if shared && !cfg.mqtt.shared_subscription_available {
        ReasonCode::SharedSubscriptionsNotSupported
    } else if !cfg.mqtt.wildcard_subscription_available && filter.contains(['+', '#']) {
        ReasonCode::WildcardSubscriptionsNotSupported
    } else {
        let max = cfg.limits.max_subscriptions;
        let full = max > 0
            && session.with_state(conn_id, |s| {
                s.subscriptions().len() >= max && !s.subscriptions().contains_key(filter)
            })?;
        if !full {
            return Ok(None);
        }
        ReasonCode::QuotaExceeded
    };
    Ok(Some(code))
}

/// Whether a new subscription gets the retained messages of its filter: by its Retain
/// Handling (0 always, 1 only if it is new, 2 never), and never for a shared one (MQTT
/// 5.0, 4.8.2).
pub fn wants_retained(retain_handling: u8, existed: bool, shared: bool) -> bool {
    let wanted = match retain_handling {
        0 => true,
        1 => !existed,
        _ => false,
    };
    wanted && !shared
}
