//! SSRF guard for webhook targets: a merchant-supplied URL must not reach into the network the
//! service runs in. Checked when the payment is created (the port against
//! `webhook.allowed_ports`, IP literals in any spelling the URL parser accepts, `localhost`
//! names, and what the host resolves to right now) and again at delivery against the port and
//! the addresses the HTTP client will actually connect to, since DNS can change between the two.
//! The refused addresses are one table, [`RANGES`].

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// How the guard treats the addresses of one range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Never a webhook target.
    Refuse,
    /// The address carries an IPv4 address starting at this bit (from the left): refused when
    /// that address is.
    EmbedsIpv4 { bit: u32 },
}

/// One block of addresses that is not globally reachable, with the RFC that reserves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub network: IpAddr,
    pub prefix: u8,
    pub what: &'static str,
    pub rfc: &'static str,
    pub rule: Rule,
}

impl Range {
    /// The width of the address family in bits.
    fn width(&self) -> u32 {
        if self.network.is_ipv4() { 32 } else { 128 }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() != self.network.is_ipv4() {
            return false;
        }
        let host_bits = self.width() - u32::from(self.prefix);
        let (a, n) = (bits(ip), bits(self.network));
        host_bits >= 128 || (a ^ n) >> host_bits == 0
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} ({}, {})",
            self.network, self.prefix, self.what, self.rfc
        )
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

const fn v4(o: [u8; 4], prefix: u8, what: &'static str, rfc: &'static str) -> Range {
    Range {
        network: IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3])),
        prefix,
        what,
        rfc,
        rule: Rule::Refuse,
    }
}

/// An IPv6 row from its leading groups (the rest are zero).
const fn v6(lead: &[u16], prefix: u8, what: &'static str, rfc: &'static str, rule: Rule) -> Range {
    let mut g = [0u16; 8];
    let mut i = 0;
    while i < lead.len() {
        g[i] = lead[i];
        i += 1;
    }
    Range {
        network: IpAddr::V6(Ipv6Addr::new(
            g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7],
        )),
        prefix,
        what,
        rfc,
        rule,
    }
}

const REFUSE: Rule = Rule::Refuse;
const EMBEDS_AT_96: Rule = Rule::EmbedsIpv4 { bit: 96 };
/// 6to4: 2002:AABB:CCDD::/48 is the IPv4 address AA.BB.CC.DD.
const EMBEDS_AT_16: Rule = Rule::EmbedsIpv4 { bit: 16 };

/// Every address a webhook must not reach: the entries of the IANA IPv4 and IPv6
/// Special-Purpose Address Registries that are not globally reachable, multicast, and for IPv6
/// everything outside global unicast 2000::/3. The first row that contains an address decides,
/// so a block comes before the larger one it lies in. Rows that embed an IPv4 address (mapped,
/// NAT64, 6to4) are refused when the embedded address is. Globally reachable special-purpose
/// blocks (64:ff9b::/96 itself, AS112, AMT, the PCP/TURN anycast addresses) stay allowed, except
/// where they lie in a block refused as a whole (192.0.0.0/24, 2001::/23).
#[rustfmt::skip]
pub const RANGES: &[Range] = &[
    // IPv4: the IANA IPv4 Special-Purpose Address Registry, and multicast.
    v4([0, 0, 0, 0],         8,  "\"this network\"", "RFC 791"),
    v4([10, 0, 0, 0],        8,  "private use", "RFC 1918"),
    v4([100, 64, 0, 0],      10, "shared address space (carrier-grade NAT)", "RFC 6598"),
    v4([127, 0, 0, 0],       8,  "loopback", "RFC 1122"),
    v4([169, 254, 0, 0],     16, "link-local", "RFC 3927"),
    v4([172, 16, 0, 0],      12, "private use", "RFC 1918"),
    v4([192, 0, 0, 0],       24, "IETF protocol assignments", "RFC 6890"),
    v4([192, 0, 2, 0],       24, "documentation (TEST-NET-1)", "RFC 5737"),
    v4([192, 88, 99, 0],     24, "6to4 relay anycast (deprecated)", "RFC 7526"),
    v4([192, 168, 0, 0],     16, "private use", "RFC 1918"),
    v4([198, 18, 0, 0],      15, "benchmarking", "RFC 2544"),
    v4([198, 51, 100, 0],    24, "documentation (TEST-NET-2)", "RFC 5737"),
    v4([203, 0, 113, 0],     24, "documentation (TEST-NET-3)", "RFC 5737"),
    v4([224, 0, 0, 0],       4,  "multicast", "RFC 5771"),
    v4([255, 255, 255, 255], 32, "limited broadcast", "RFC 919"),
    v4([240, 0, 0, 0],       4,  "reserved", "RFC 1112"),
    // IPv6: the IANA IPv6 Special-Purpose Address Registry, and the IPv6 Address Space.
    v6(&[],                         128, "unspecified", "RFC 4291", REFUSE),
    v6(&[0, 0, 0, 0, 0, 0, 0, 1],   128, "loopback", "RFC 4291", REFUSE),
    v6(&[0, 0, 0, 0, 0, 0xffff],    96,  "IPv4-mapped", "RFC 4291", EMBEDS_AT_96),
    v6(&[0, 0, 0, 0, 0xffff],       96,  "IPv4-translated (SIIT)", "RFC 2765", REFUSE),
    v6(&[],                         96,  "IPv4-compatible (deprecated)", "RFC 4291", REFUSE),
    v6(&[0x64, 0xff9b],             96,  "NAT64 well-known prefix", "RFC 6052", EMBEDS_AT_96),
    v6(&[0x64, 0xff9b, 1],          48,  "local-use NAT64", "RFC 8215", REFUSE),
    v6(&[0x100],                    64,  "discard-only", "RFC 6666", REFUSE),
    v6(&[0x100, 0, 0, 1],           64,  "dummy prefix", "RFC 9780", REFUSE),
    // Teredo carries its server's IPv4 address and the client's (obfuscated): a tunnel into
    // somebody's network, never a webhook endpoint.
    v6(&[0x2001],                   32,  "Teredo", "RFC 4380", REFUSE),
    v6(&[0x2001],                   23,  "IETF protocol assignments", "RFC 2928", REFUSE),
    v6(&[0x2001, 0xdb8],            32,  "documentation", "RFC 3849", REFUSE),
    v6(&[0x2002],                   16,  "6to4", "RFC 3056", EMBEDS_AT_16),
    v6(&[0x3fff],                   20,  "documentation", "RFC 9637", REFUSE),
    v6(&[0x5f00],                   16,  "SRv6 segment identifiers", "RFC 9602", REFUSE),
    v6(&[0xfc00],                   7,   "unique local", "RFC 4193", REFUSE),
    v6(&[0xfe80],                   10,  "link-local", "RFC 4291", REFUSE),
    v6(&[0xfec0],                   10,  "site-local (deprecated)", "RFC 3879", REFUSE),
    v6(&[0xff00],                   8,   "multicast", "RFC 4291", REFUSE),
    // What is left outside global unicast 2000::/3 is reserved by the IETF.
    v6(&[],                         3,   "outside global unicast 2000::/3", "RFC 4291", REFUSE),
    v6(&[0x4000],                   2,   "outside global unicast 2000::/3", "RFC 4291", REFUSE),
    v6(&[0x8000],                   1,   "outside global unicast 2000::/3", "RFC 4291", REFUSE),
];

/// The range that makes `ip` a forbidden webhook target, if any (for an address that embeds
/// an IPv4 address, the range of the embedded one).
pub fn refusal(ip: IpAddr) -> Option<&'static Range> {
    let row = RANGES.iter().find(|r| r.contains(ip))?;
    match (row.rule, ip) {
        (Rule::EmbedsIpv4 { bit }, IpAddr::V6(v6)) => {
            let embedded = (u128::from(v6) >> (128 - bit - 32)) as u32;
            refusal(IpAddr::V4(Ipv4Addr::from(embedded)))
        }
        _ => Some(row),
    }
}

/// True for every address a webhook must not reach (see [`RANGES`]).
pub fn is_forbidden(ip: IpAddr) -> bool {
    refusal(ip).is_some()
}

/// Why a target was refused, without revealing anything about the network beyond the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The port a URL connects to (its scheme's default when none is written).
fn port_of(scheme: Option<&str>, port: Option<u16>) -> u16 {
    port.unwrap_or(match scheme {
        Some("http") => 80,
        _ => 443,
    })
}

fn port_refusal(port: u16, allowed_ports: &[u16]) -> Option<String> {
    if allowed_ports.contains(&port) {
        return None;
    }
    let list: Vec<String> = allowed_ports.iter().map(u16::to_string).collect();
    Some(format!(
        "must use one of the ports {} (not {port})",
        list.join(", ")
    ))
}

/// The check at creation. `url` is already parsed and is http(s) with a host.
pub async fn check_target(
    url: &url::Url,
    allowed_ports: &[u16],
    resolve_timeout: Duration,
) -> Result<(), Refused> {
    let port = port_of(Some(url.scheme()), url.port());
    if let Some(why) = port_refusal(port, allowed_ports) {
        return Err(Refused(why));
    }
    let literal = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        _ => None,
    };
    if let Some(range) = literal.and_then(refusal) {
        return Err(Refused(format!("must not point to {range}")));
    }
    if let Some(url::Host::Domain(name)) = url.host() {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name == "localhost" || name.ends_with(".localhost") {
            return Err(Refused(
                "must not point to localhost (loopback, RFC 6761)".into(),
            ));
        }
        // A name that does not resolve now is accepted: DNS can change, and the delivery-time
        // check is the one that counts.
        if let Ok(Ok(addrs)) = tokio::time::timeout(
            resolve_timeout,
            tokio::net::lookup_host((name.as_str(), port)),
        )
        .await
        {
            for a in addrs {
                if let Some(range) = refusal(a.ip()) {
                    return Err(Refused(format!(
                        "must not point to a host that resolves to {range}"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// A resolver for the webhook HTTP client that refuses ports outside `webhook.allowed_ports`
/// and drops forbidden addresses, so the client can only connect to public ones; if nothing is
/// left, the attempt fails with a clear error.
#[derive(Debug, Default)]
pub struct GuardedResolver {
    inner: DefaultResolver,
    allowed_ports: Vec<u16>,
}

impl GuardedResolver {
    pub fn new(allowed_ports: Vec<u16>) -> Self {
        GuardedResolver {
            inner: DefaultResolver::default(),
            allowed_ports,
        }
    }

    /// The delivery-time port check: `Err` with the reason when the URI's port is not allowed.
    pub fn check_port(&self, uri: &ureq::http::Uri) -> Result<(), String> {
        let port = port_of(uri.scheme_str(), uri.port_u16());
        match port_refusal(port, &self.allowed_ports) {
            Some(why) => Err(format!(
                "refused by the SSRF guard: the URL {why} (webhook.allowed_ports)"
            )),
            None => Ok(()),
        }
    }
}

impl Resolver for GuardedResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        self.check_port(uri)
            .map_err(|why| ureq::Error::Io(io::Error::new(io::ErrorKind::PermissionDenied, why)))?;
        let all = self.inner.resolve(uri, config, timeout)?;
        let mut allowed = self.empty();
        let mut refused: Option<(SocketAddr, &Range)> = None;
        for a in all.iter() {
            match refusal(a.ip()) {
                Some(range) => {
                    refused.get_or_insert((*a, range));
                }
                None => allowed.push(*a),
            }
        }
        match refused {
            Some((addr, range)) if allowed.is_empty() => Err(ureq::Error::Io(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "refused by the SSRF guard: {} resolves to {} in {range}",
                    uri.host().unwrap_or("?"),
                    addr.ip()
                ),
            ))),
            _ => Ok(allowed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(s: &str) -> bool {
        is_forbidden(s.parse().unwrap())
    }

    fn addr(bits: u128, v4: bool) -> IpAddr {
        if v4 {
            IpAddr::V4(Ipv4Addr::from(bits as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }

    /// Each row of the table, at both ends: refused, and by that row at one end at least (no
    /// row is hidden behind another); an embedding row refuses a private IPv4 inside and allows
    /// a public one.
    #[test]
    fn every_range_of_the_table_is_refused_at_both_ends() {
        for r in RANGES {
            let v4 = r.network.is_ipv4();
            let host_bits = r.width() - u32::from(r.prefix);
            let first = bits(r.network);
            let last = if host_bits >= 128 {
                u128::MAX
            } else {
                first | ((1u128 << host_bits) - 1)
            };
            match r.rule {
                Rule::Refuse => {
                    let (a, b) = (refusal(addr(first, v4)), refusal(addr(last, v4)));
                    assert!(a.is_some() && b.is_some(), "{r}: both ends refused");
                    assert!(
                        a == Some(r) || b == Some(r),
                        "{r} is hidden behind {a:?} / {b:?}"
                    );
                }
                Rule::EmbedsIpv4 { bit } => {
                    let at = 128 - bit - 32;
                    let with = |ip: Ipv4Addr| addr(first | (u128::from(u32::from(ip)) << at), v4);
                    let private = refusal(with(Ipv4Addr::new(10, 1, 2, 3)));
                    assert_eq!(private.map(|p| p.rfc), Some("RFC 1918"), "{r}");
                    assert!(refusal(with(Ipv4Addr::new(8, 8, 8, 8))).is_none(), "{r}");
                }
            }
        }
    }

    #[test]
    fn the_ranges_the_review_found_are_refused_with_their_rfc() {
        for (ip, rfc) in [
            ("198.18.0.1", "RFC 2544"),
            ("198.19.255.255", "RFC 2544"),
            ("64:ff9b:1::a00:1", "RFC 8215"),
            ("64:ff9b:1:ffff::8.8.8.8", "RFC 8215"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "RFC 4380"),
            ("2001::8.8.8.8", "RFC 4380"),
            ("::ffff:0:127.0.0.1", "RFC 2765"),
            ("::ffff:0:8.8.8.8", "RFC 2765"),
            ("::ffff:127.0.0.1", "RFC 1122"),
            ("::ffff:198.18.0.1", "RFC 2544"),
            ("64:ff9b::10.0.0.1", "RFC 1918"),
            ("2002:c612:1::", "RFC 2544"),
            ("0.1.2.3", "RFC 791"),
            ("100.64.0.1", "RFC 6598"),
            ("192.0.0.9", "RFC 6890"),
            ("192.0.2.1", "RFC 5737"),
            ("198.51.100.7", "RFC 5737"),
            ("203.0.113.200", "RFC 5737"),
            ("240.0.0.1", "RFC 1112"),
            ("255.255.255.255", "RFC 919"),
            ("224.0.0.1", "RFC 5771"),
            ("2001:db8::1", "RFC 3849"),
            ("3fff::1", "RFC 9637"),
            ("fc00::1", "RFC 4193"),
            ("fd12:3456::1", "RFC 4193"),
            ("fe80::1", "RFC 4291"),
            ("ff02::1", "RFC 4291"),
            ("100::1", "RFC 6666"),
            ("5f00::1", "RFC 9602"),
            ("::127.0.0.1", "RFC 4291"),
            ("4000::1", "RFC 4291"),
        ] {
            let r = refusal(ip.parse().unwrap());
            assert_eq!(r.map(|r| r.rfc), Some(rfc), "{ip}: {r:?}");
        }
    }

    #[test]
    fn private_and_special_addresses_are_forbidden() {
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:10.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
        ] {
            assert!(forbidden(ip), "{ip} must be forbidden");
        }
        // Public addresses, also right next to refused blocks.
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "192.0.1.255",
            "192.0.3.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:808:808::1",
            "2001:200::1",
            "2001:db9::1",
            "3fff:1000::1",
        ] {
            assert!(!forbidden(ip), "{ip} is public");
        }
    }

    #[test]
    fn ports_outside_the_allow_list_are_refused_at_delivery() {
        let guard = GuardedResolver::new(vec![80, 443, 8080, 8443]);
        let check = |u: &str| guard.check_port(&u.parse().unwrap());
        assert!(check("http://example.com/").is_ok());
        assert!(check("https://example.com/").is_ok());
        assert!(check("https://example.com:8443/").is_ok());
        let err = check("http://example.com:22/").unwrap_err();
        assert!(err.contains("SSRF") && err.contains("(not 22)"), "{err}");
        assert!(check("https://example.com:80/x").is_ok());
        assert!(check("http://93.184.216.34:6379/").is_err());
    }

    async fn check(u: &str) -> Result<(), Refused> {
        let url = url::Url::parse(u).unwrap();
        check_target(&url, &[80, 443, 8080, 8443], Duration::from_millis(200)).await
    }

    #[tokio::test]
    async fn every_spelling_of_a_private_host_is_refused() {
        for u in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://[::1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::ffff:127.0.0.1]:8080/x",
            "http://[0:0:0:0:0:ffff:127.0.0.1]/",
            "http://[::ffff:0:127.0.0.1]/",
            "http://[64:ff9b::127.0.0.1]/",
            "http://[64:ff9b:1::a00:1]/",
            "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
            "http://10.1.2.3/",
            "http://192.168.0.10/",
            "http://198.18.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://0.0.0.0/",
            "http://localhost:8080/",
            "http://LOCALHOST./",
            "http://api.localhost/",
        ] {
            assert!(check(u).await.is_err(), "{u} must be refused");
        }
        for u in [
            "https://93.184.216.34/hook",
            "https://[2606:4700::1111]/",
            "https://example.com/webhook",
            "http://93.184.216.34:8080/",
        ] {
            assert!(check(u).await.is_ok(), "{u} must be allowed");
        }
        assert_eq!(
            check("https://93.184.216.34:22/").await,
            Err(Refused(
                "must use one of the ports 80, 443, 8080, 8443 (not 22)".into()
            ))
        );
        assert_eq!(
            check("http://198.18.0.1/").await,
            Err(Refused(
                "must not point to 198.18.0.0/15 (benchmarking, RFC 2544)".into()
            ))
        );
    }
}
