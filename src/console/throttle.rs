//! Wrong tokens, throttled per client address: after `console.auth_failures_allowed` failed
//! sign-ins or bearer checks, an address is answered 429 with a `Retry-After` that doubles with
//! every further failure (1 s up to 15 min) without its token being looked at, so guessing costs
//! hours instead of a second per 5,000 tries. A success from the address clears it. Each failure
//! is logged (never the token), counted in `/metrics` and written to the audit log.

use axum::extract::ConnectInfo;
use axum::http::request::Parts;
use prometheus::{IntCounterVec, Opts, Registry};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest a blocked address waits.
const LONGEST_BLOCK: Duration = Duration::from_secs(15 * 60);
/// A failure this old no longer counts (and its address is forgotten).
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Addresses remembered at most (a flood from many addresses cannot grow the table further; the
/// oldest are forgotten first).
const MOST_ADDRESSES: usize = 100_000;

/// Where a request came from: the peer's address, or behind a trusted proxy the last address in
/// `X-Forwarded-For` (the one the proxy added; earlier ones are the client's to choose).
pub fn client_address(parts: &Parts, trust_forwarded_for: bool) -> Option<IpAddr> {
    if trust_forwarded_for {
        let added_by_proxy = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .next_back()
            .and_then(|a| a.trim().parse::<IpAddr>().ok());
        if added_by_proxy.is_some() {
            return added_by_proxy;
        }
    }
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
}

/// The client address of a request, as [`client_address`] finds it.
pub struct ClientAddress(pub Option<IpAddr>);

impl axum::extract::FromRequestParts<super::Console> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &super::Console,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(client_address(
            parts,
            console.settings.console.trust_forwarded_for,
        )))
    }
}

/// Whom failures count against: an IPv4 address, or an IPv6 address's /64 (one host can hold a
/// whole /64, and would otherwise get a fresh allowance at every address of it).
fn counted_as(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    blocked_until: Option<Instant>,
}

/// Failed authentications per client address.
#[derive(Clone)]
pub struct Throttle {
    allowed: u32,
    seen: Arc<Mutex<HashMap<IpAddr, Failures>>>,
    counted: IntCounterVec,
}

impl Throttle {
    /// A throttle that lets `allowed` failures through per address, counting in `registry`.
    pub fn new(allowed: u32, registry: &Registry) -> Self {
        let counted = IntCounterVec::new(
            Opts::new(
                "console_auth_failures_total",
                "Refused console authentications, by how (sign-in, bearer) and outcome \
                 (refused: a wrong token; throttled: answered 429 without looking)",
            ),
            &["how", "outcome"],
        )
        .expect("a valid metric");
        registry
            .register(Box::new(counted.clone()))
            .expect("registered once");
        Self {
            allowed,
            seen: Arc::default(),
            counted,
        }
    }

    /// How long `address` must still wait before its token is looked at; `None`: go ahead.
    pub fn blocked(&self, address: Option<IpAddr>, how: &str) -> Option<Duration> {
        let address = counted_as(address?);
        let seen = self.seen.lock().expect("throttle lock");
        let wait = seen
            .get(&address)?
            .blocked_until?
            .checked_duration_since(Instant::now())?;
        self.counted.with_label_values(&[how, "throttled"]).inc();
        Some(wait.max(Duration::from_secs(1)))
    }

    /// Notes a wrong token from `address`; returns how many failures it has now and, when it is
    /// over the allowance, how long it is blocked for.
    pub fn failed(&self, address: Option<IpAddr>, how: &str) -> (u32, Option<Duration>) {
        self.counted.with_label_values(&[how, "refused"]).inc();
        let Some(address) = address.map(counted_as) else {
            return (0, None);
        };
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("throttle lock");
        if seen.len() >= MOST_ADDRESSES && !seen.contains_key(&address) {
            seen.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
            if seen.len() >= MOST_ADDRESSES
                && let Some(oldest) = seen.iter().min_by_key(|(_, f)| f.last).map(|(a, _)| *a)
            {
                seen.remove(&oldest);
            }
        }
        let entry = seen.entry(address).or_insert(Failures {
            count: 0,
            last: now,
            blocked_until: None,
        });
        if now.duration_since(entry.last) >= FORGET_AFTER {
            entry.count = 0;
        }
        entry.count += 1;
        entry.last = now;
        let over = entry.count.saturating_sub(self.allowed);
        let block = (over > 0).then(|| {
            let secs = 1u64 << (over - 1).min(20);
            Duration::from_secs(secs).min(LONGEST_BLOCK)
        });
        entry.blocked_until = block.map(|b| now + b);
        (entry.count, block)
    }

    /// Clears `address` after a right token.
    pub fn succeeded(&self, address: Option<IpAddr>) {
        if let Some(address) = address.map(counted_as) {
            self.seen.lock().expect("throttle lock").remove(&address);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_past_the_allowance_block_for_longer_each_time() {
        let throttle = Throttle::new(3, &Registry::new());
        let a: Option<IpAddr> = Some("192.0.2.1".parse().unwrap());
        let b: Option<IpAddr> = Some("192.0.2.2".parse().unwrap());
        for n in 1..=3 {
            assert_eq!(throttle.failed(a, "bearer"), (n, None));
            assert_eq!(throttle.blocked(a, "bearer"), None);
        }
        assert_eq!(throttle.failed(a, "bearer").1, Some(Duration::from_secs(1)));
        assert!(throttle.blocked(a, "bearer").is_some());
        assert_eq!(throttle.failed(a, "bearer").1, Some(Duration::from_secs(2)));
        assert_eq!(throttle.failed(a, "bearer").1, Some(Duration::from_secs(4)));
        for _ in 0..30 {
            throttle.failed(a, "bearer");
        }
        assert_eq!(throttle.failed(a, "bearer").1, Some(LONGEST_BLOCK));
        // Another address is not affected; a success clears the first.
        assert_eq!(throttle.blocked(b, "bearer"), None);
        throttle.succeeded(a);
        assert_eq!(throttle.blocked(a, "bearer"), None);
        assert_eq!(throttle.failed(a, "bearer"), (1, None));

        // Every address of one IPv6 /64 counts as one.
        for i in 1..=4u16 {
            let v6: IpAddr = format!("2001:db8::{i:x}").parse().unwrap();
            throttle.failed(Some(v6), "sign-in");
        }
        let other_host: IpAddr = "2001:db8::ffff".parse().unwrap();
        assert!(throttle.blocked(Some(other_host), "sign-in").is_some());
        let other_net: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        assert_eq!(throttle.blocked(Some(other_net), "sign-in"), None);
    }
}
