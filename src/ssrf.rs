//! SSRF guard for webhook targets: a merchant-supplied URL must not reach into the network the
//! service runs in. Checked when the payment is created (IP literals in any spelling the URL
//! parser accepts, `localhost` names, and what the host resolves to right now) and again at
//! delivery against the addresses the HTTP client will actually connect to, since DNS can change
//! between the two.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// True for every address a webhook must not reach: loopback, private, link-local,
/// unique-local, unspecified, shared (CGNAT), multicast, broadcast and reserved ranges, also when
/// written as IPv4-mapped, IPv4-compatible, 6to4 or NAT64 IPv6.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || a >= 240 // reserved
}

fn forbidden_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let seg = ip.segments();
    // IPv4-compatible ::a.b.c.d (deprecated, still routed by some stacks).
    if seg[..6].iter().all(|s| *s == 0) && !ip.is_loopback() && !ip.is_unspecified() {
        return forbidden_v4(Ipv4Addr::new(
            (seg[6] >> 8) as u8,
            seg[6] as u8,
            (seg[7] >> 8) as u8,
            seg[7] as u8,
        ));
    }
    // NAT64 64:ff9b::/96 and 6to4 2002::/16 carry an IPv4 address inside.
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6].iter().all(|s| *s == 0) {
        return forbidden_v4(Ipv4Addr::new(
            (seg[6] >> 8) as u8,
            seg[6] as u8,
            (seg[7] >> 8) as u8,
            seg[7] as u8,
        ));
    }
    if seg[0] == 0x2002 {
        return forbidden_v4(Ipv4Addr::new(
            (seg[1] >> 8) as u8,
            seg[1] as u8,
            (seg[2] >> 8) as u8,
            seg[2] as u8,
        ));
    }
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (seg[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (seg[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (seg[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
}

/// Why a target was refused, without revealing anything about the network beyond the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The check at creation. `url` is already parsed and is http(s) with a host.
pub async fn check_target(url: &url::Url, resolve_timeout: Duration) -> Result<(), Refused> {
    let refused = |what: &str| Err(Refused(format!("must not point to {what}")));
    match url.host() {
        Some(url::Host::Ipv4(ip)) if forbidden_v4(ip) => {
            refused("a private, loopback or reserved address")
        }
        Some(url::Host::Ipv6(ip)) if forbidden_v6(ip) => {
            refused("a private, loopback or reserved address")
        }
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name == "localhost" || name.ends_with(".localhost") {
                return refused("localhost");
            }
            let port = url.port_or_known_default().unwrap_or(443);
            // A name that does not resolve now is accepted: DNS can change, and the delivery-time
            // check is the one that counts.
            if let Ok(Ok(addrs)) = tokio::time::timeout(
                resolve_timeout,
                tokio::net::lookup_host((name.as_str(), port)),
            )
            .await
            {
                for a in addrs {
                    if is_forbidden(a.ip()) {
                        return refused(
                            "a host that resolves to a private, loopback or reserved address",
                        );
                    }
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A resolver for the webhook HTTP client that drops forbidden addresses, so the client can only
/// connect to public ones; if nothing is left, the attempt fails with a clear error.
#[derive(Debug, Default)]
pub struct GuardedResolver {
    inner: DefaultResolver,
}

impl Resolver for GuardedResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let all = self.inner.resolve(uri, config, timeout)?;
        let mut allowed = self.empty();
        let mut refused: Option<SocketAddr> = None;
        for a in all.iter() {
            if is_forbidden(a.ip()) {
                refused.get_or_insert(*a);
            } else {
                allowed.push(*a);
            }
        }
        match refused {
            Some(addr) if allowed.is_empty() => Err(ureq::Error::Io(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "refused by the SSRF guard: {} resolves to {}",
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
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "ff02::1",
        ] {
            assert!(forbidden(ip), "{ip} must be forbidden");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(!forbidden(ip), "{ip} is public");
        }
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
            "http://10.1.2.3/",
            "http://192.168.0.10/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://0.0.0.0/",
            "http://localhost:8000/",
            "http://LOCALHOST./",
            "http://api.localhost/",
        ] {
            let url = url::Url::parse(u).unwrap();
            assert!(
                check_target(&url, Duration::from_millis(200))
                    .await
                    .is_err(),
                "{u} must be refused"
            );
        }
        for u in [
            "https://93.184.216.34/hook",
            "https://[2606:4700::1111]/",
            "https://example.com/webhook",
        ] {
            let url = url::Url::parse(u).unwrap();
            assert!(
                check_target(&url, Duration::from_millis(200)).await.is_ok(),
                "{u} must be allowed"
            );
        }
    }
}
