//! The table of address ranges a webhook must not reach, each with the RFC that reserves it, and
//! the lookup of an address in it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
    pub(super) fn width(&self) -> u32 {
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

pub(super) fn bits(ip: IpAddr) -> u128 {
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
