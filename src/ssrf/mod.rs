//! SSRF guard for webhook targets: a merchant-supplied URL must not reach into the network the
//! service runs in. Checked when the payment is created (the port against
//! `webhook.allowed_ports`, IP literals in any spelling the URL parser accepts, `localhost`
//! names, and what the host resolves to right now) and again at delivery against the port and
//! the addresses the HTTP client will actually connect to, since DNS can change between the two.
//! The refused addresses are one table, [`RANGES`].

mod ranges;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

pub use ranges::{RANGES, Range, Rule, is_forbidden, refusal};

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
#[derive(Debug)]
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
    use super::ranges::bits;
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

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
