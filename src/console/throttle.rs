//! Wrong tokens, throttled per client address and as a whole. After
//! `console.auth_failures_allowed` failed sign-ins or bearer checks, an address may try once a
//! second (more tries in that second are answered 429 with `Retry-After`, their token not looked
//! at): guessing costs a second a try, while an operator behind the same address (a NAT, an
//! office proxy) is never shut out by someone else's wrong tokens, only slowed to that pace.
//! Past `console.auth_failures_per_minute` wrong tokens from all addresses together, addresses
//! that have not signed in lately share one try a second: rotating addresses buys nothing, and
//! an operator who signed in within the day is not held back. A success clears its address.
//! Refusals are logged, counted in `/metrics`, and written to the audit log in aggregate: one
//! entry per address and kind per [`AUDIT_WINDOW`], with the count, at most [`AUDITED_ADDRESSES`]
//! addresses an entry window (the rest summed in one entry without an address).

use axum::extract::ConnectInfo;
use axum::http::request::Parts;
use prometheus::{IntCounterVec, Opts, Registry};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a blocked address, or during a flood an address not known good, may try.
const PACE: Duration = Duration::from_secs(1);
/// A failure this old no longer counts (and its address is forgotten).
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// How long an address that signed in is known good (spared the flood's shared pace).
const GOOD_FOR: Duration = Duration::from_secs(24 * 3600);
/// Addresses remembered at most, in each table (a flood from many addresses cannot grow them
/// further; the oldest are forgotten first).
const MOST_ADDRESSES: usize = 100_000;
/// The window the audit log sums refusals over.
pub const AUDIT_WINDOW: Duration = Duration::from_secs(10);
/// Most addresses with an audit entry of their own per window.
pub const AUDITED_ADDRESSES: usize = 100;

/// Which proxies' `X-Forwarded-For` is believed: networks such as `10.0.0.0/8` or `::1/128`.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// The networks of `console.trust_forwarded_for`; why not, naming the entry, if one is not
    /// a network.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut networks = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let bad = || {
                format!(
                    "has {entry:?} (entry {i}), not a network such as 10.0.0.0/8 or fd00::/8 (an \
                     address alone: 10.1.2.3/32)"
                )
            };
            let (address, bits) = entry.trim().split_once('/').ok_or_else(bad)?;
            let address: IpAddr = address.parse().map_err(|_| bad())?;
            let bits: u8 = bits.parse().map_err(|_| bad())?;
            let most = if address.is_ipv4() { 32 } else { 128 };
            if bits > most {
                return Err(bad());
            }
            networks.push((address, bits));
        }
        Ok(Self(networks))
    }

    /// Whether `address` is in one of the networks.
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
            v4 => v4,
        };
        self.0
            .iter()
            .any(|(network, bits)| match (network, address) {
                (IpAddr::V4(n), IpAddr::V4(a)) => {
                    let mask = u32::MAX.checked_shl(32 - u32::from(*bits)).unwrap_or(0);
                    u32::from(*n) & mask == u32::from(a) & mask
                }
                (IpAddr::V6(n), IpAddr::V6(a)) => {
                    let mask = u128::MAX.checked_shl(128 - u32::from(*bits)).unwrap_or(0);
                    u128::from(*n) & mask == u128::from(a) & mask
                }
                _ => false,
            })
    }
}

/// Where a request came from: the peer's address, or, when the peer is a trusted proxy, the last
/// address in `X-Forwarded-For` (the one that proxy added; earlier ones are the client's to
/// choose).
pub fn client_address(parts: &Parts, trusted: &TrustedProxies) -> Option<IpAddr> {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    if peer.is_some_and(|p| trusted.contains(p)) {
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
    peer
}

/// The client address of a request, as [`client_address`] finds it, and whether the request came
/// through a trusted proxy (whose `X-Forwarded-Host` is then believed too).
pub struct ClientAddress(pub Option<IpAddr>, pub bool);

impl axum::extract::FromRequestParts<super::Console> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &super::Console,
    ) -> Result<Self, Self::Rejection> {
        let via_proxy = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .is_some_and(|ConnectInfo(peer)| console.trusted_proxies.contains(peer.ip()));
        Ok(Self(
            client_address(parts, &console.trusted_proxies),
            via_proxy,
        ))
    }
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    /// While over the allowance: when its next try may be looked at.
    next_try: Option<Instant>,
}

/// What the throttle remembers.
#[derive(Default)]
struct State {
    /// Failures per address (an IPv6 one by its /64).
    failures: HashMap<IpAddr, Failures>,
    /// Addresses that signed in lately, and when.
    good: HashMap<IpAddr, Instant>,
    /// Wrong tokens from every address in the current minute, and when it began.
    minute: Option<(Instant, u32)>,
    /// When the flood's shared try was last given.
    shared_try: Option<Instant>,
    /// Refusals not yet written to the audit log, by address and kind.
    unaudited: HashMap<(Option<IpAddr>, String), i32>,
}

/// Failed authentications per client address and as a whole.
#[derive(Clone)]
pub struct Throttle {
    allowed: u32,
    per_minute: u32,
    state: Arc<Mutex<State>>,
    counted: IntCounterVec,
}

impl Throttle {
    /// A throttle that lets `allowed` failures through per address and `per_minute` from all
    /// addresses together, counting in `registry`.
    pub fn new(allowed: u32, per_minute: u32, registry: &Registry) -> Self {
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
        // Every series from the start, at 0: a scraper sees the figure before the first refusal
        // (and an alert on its rate has something to compare with).
        for how in ["sign-in", "bearer"] {
            for outcome in ["refused", "throttled"] {
                counted.with_label_values(&[how, outcome]);
            }
        }
        Self {
            allowed,
            per_minute,
            state: Arc::default(),
            counted,
        }
    }

    /// How long `address` must still wait before a token of its is looked at; `None`: go ahead
    /// (taking the try, if the address or the flood is paced).
    pub fn blocked(&self, address: Option<IpAddr>, how: &str) -> Option<Duration> {
        let key = address.map(crate::http_server::address_key);
        let now = Instant::now();
        let mut state = self.state.lock().expect("throttle lock");
        let mut wait = None;
        if let Some(failures) = key.and_then(|k| state.failures.get_mut(&k))
            && let Some(next) = failures.next_try
        {
            match next.checked_duration_since(now) {
                Some(left) if !left.is_zero() => wait = Some(left),
                _ => failures.next_try = Some(now + PACE),
            }
        }
        let flooded = state.minute.is_some_and(|(start, n)| {
            now.duration_since(start) < Duration::from_secs(60) && n >= self.per_minute
        });
        let known_good = key.is_some_and(|k| {
            state
                .good
                .get(&k)
                .is_some_and(|at| now.duration_since(*at) < GOOD_FOR)
        });
        if wait.is_none() && flooded && !known_good {
            match state.shared_try.map(|at| at + PACE) {
                Some(next) if next > now => wait = Some(next - now),
                _ => state.shared_try = Some(now),
            }
        }
        let wait = wait?;
        self.counted.with_label_values(&[how, "throttled"]).inc();
        Some(wait.max(Duration::from_secs(1)))
    }

    /// Notes a wrong token from `address`; returns how many failures it has now and, when it is
    /// over the allowance, how long until its next try.
    pub fn failed(&self, address: Option<IpAddr>, how: &str) -> (u32, Option<Duration>) {
        self.counted.with_label_values(&[how, "refused"]).inc();
        let now = Instant::now();
        let mut state = self.state.lock().expect("throttle lock");
        let minute = match state.minute {
            Some((start, n)) if now.duration_since(start) < Duration::from_secs(60) => {
                (start, n + 1)
            }
            _ => (now, 1),
        };
        state.minute = Some(minute);
        *state
            .unaudited
            .entry((address, how.to_owned()))
            .or_default() += 1;
        let Some(key) = address.map(crate::http_server::address_key) else {
            return (0, None);
        };
        bound(&mut state.failures, key, now, |f| f.last);
        let entry = state.failures.entry(key).or_insert(Failures {
            count: 0,
            last: now,
            next_try: None,
        });
        if now.duration_since(entry.last) >= FORGET_AFTER {
            entry.count = 0;
        }
        entry.count += 1;
        entry.last = now;
        let over = entry.count > self.allowed;
        entry.next_try = over.then_some(now + PACE);
        (entry.count, over.then_some(PACE))
    }

    /// Clears `address` after a right token, and knows it good for a day.
    pub fn succeeded(&self, address: Option<IpAddr>) {
        if let Some(key) = address.map(crate::http_server::address_key) {
            let now = Instant::now();
            let mut state = self.state.lock().expect("throttle lock");
            state.failures.remove(&key);
            bound(&mut state.good, key, now, |at| *at);
            state.good.insert(key, now);
        }
    }

    /// The refusals since the last call, summed by address and kind: at most
    /// [`AUDITED_ADDRESSES`] with an address of their own, the rest by kind without one.
    pub fn take_unaudited(&self) -> Vec<(Option<IpAddr>, String, i32)> {
        let unaudited = std::mem::take(&mut self.state.lock().expect("throttle lock").unaudited);
        let mut entries: Vec<_> = unaudited.into_iter().collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.1));
        let mut out: Vec<(Option<IpAddr>, String, i32)> = Vec::new();
        let mut rest: HashMap<String, i32> = HashMap::new();
        for (i, ((address, how), count)) in entries.into_iter().enumerate() {
            if i < AUDITED_ADDRESSES {
                out.push((address, how, count));
            } else {
                *rest.entry(how).or_default() += count;
            }
        }
        out.extend(rest.into_iter().map(|(how, count)| (None, how, count)));
        out
    }
}

/// Makes room for `key` in `table`: past [`MOST_ADDRESSES`], the stale entries and then the
/// oldest go.
fn bound<V>(table: &mut HashMap<IpAddr, V>, key: IpAddr, now: Instant, at: impl Fn(&V) -> Instant) {
    if table.len() < MOST_ADDRESSES || table.contains_key(&key) {
        return;
    }
    table.retain(|_, v| now.duration_since(at(v)) < FORGET_AFTER);
    if table.len() >= MOST_ADDRESSES
        && let Some(oldest) = table.iter().min_by_key(|(_, v)| at(v)).map(|(a, _)| *a)
    {
        table.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_allowance_an_address_tries_once_a_second() {
        let throttle = Throttle::new(3, 1000, &Registry::new());
        let a: Option<IpAddr> = Some("192.0.2.1".parse().unwrap());
        let b: Option<IpAddr> = Some("192.0.2.2".parse().unwrap());
        for n in 1..=3 {
            assert_eq!(throttle.failed(a, "bearer"), (n, None));
            assert_eq!(throttle.blocked(a, "bearer"), None);
        }
        assert_eq!(throttle.failed(a, "bearer").1, Some(PACE));
        assert!(throttle.blocked(a, "bearer").is_some());
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

    #[test]
    fn a_flood_from_many_addresses_shares_one_try_a_second_except_known_good_ones() {
        let throttle = Throttle::new(5, 10, &Registry::new());
        let good: Option<IpAddr> = Some("198.51.100.7".parse().unwrap());
        throttle.succeeded(good);
        for i in 0..10u8 {
            throttle.failed(Some(IpAddr::from([203, 0, 113, i])), "sign-in");
        }
        let fresh = |i: u8| Some(IpAddr::from([203, 0, 114, i]));
        assert_eq!(
            throttle.blocked(fresh(1), "sign-in"),
            None,
            "the shared try"
        );
        assert!(
            throttle.blocked(fresh(2), "sign-in").is_some(),
            "taken this second"
        );
        assert_eq!(throttle.blocked(good, "sign-in"), None, "known good");
        assert_eq!(throttle.blocked(good, "sign-in"), None);
    }

    #[test]
    fn refusals_are_audited_by_address_and_bounded() {
        let throttle = Throttle::new(5, 1_000_000, &Registry::new());
        for i in 0..(AUDITED_ADDRESSES + 50) {
            let address = IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]);
            throttle.failed(Some(address), "bearer");
            if i == 0 {
                throttle.failed(Some(address), "bearer");
            }
        }
        let entries = throttle.take_unaudited();
        assert_eq!(entries.len(), AUDITED_ADDRESSES + 1);
        assert_eq!(
            entries[0],
            (Some(IpAddr::from([10, 0, 0, 0])), "bearer".into(), 2)
        );
        assert_eq!(entries.last().unwrap(), &(None, "bearer".into(), 50));
        assert!(throttle.take_unaudited().is_empty());
    }

    #[test]
    fn only_the_named_networks_are_trusted_proxies() {
        let trusted = TrustedProxies::parse(&["10.0.0.0/8".into(), "fd00::/8".into()]).unwrap();
        assert!(trusted.contains("10.1.2.3".parse().unwrap()));
        assert!(trusted.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(trusted.contains("fd12::1".parse().unwrap()));
        assert!(!trusted.contains("11.0.0.1".parse().unwrap()));
        assert!(!trusted.contains("127.0.0.1".parse().unwrap()));
        assert!(!TrustedProxies::default().contains("10.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "true"] {
            assert!(TrustedProxies::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
