//! Listen addresses as people write them: `IP:PORT`, `[IPv6]:PORT`, or `HOST:PORT`.

use std::net::{SocketAddr, ToSocketAddrs};

/// `IP:PORT`, `[IPv6]:PORT`, or `HOST:PORT` with HOST resolved now, to its first IPv4 address
/// if it has one (`localhost` is 127.0.0.1, which is what a person means by it; listening on
/// one address of several is all a socket can do), else its first.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    const EXAMPLES: &str = "for example 127.0.0.1:8080 (this machine only), 0.0.0.0:8080 (every \
                            interface), [::1]:8080 or localhost:8080";
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?} has no port: give HOST:PORT, {EXAMPLES}"));
    };
    if host.is_empty() {
        return Err(format!("{s:?} has no host: give HOST:PORT, {EXAMPLES}"));
    }
    if host.contains(':') && !host.starts_with('[') {
        return Err(format!(
            "{s:?}: an IPv6 address takes brackets before its port, as in [::1]:8080"
        ));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{s:?}: {port:?} is not a port (0 to 65535; 0 picks a free one)"))?;
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| {
            format!(
                "{s:?}: cannot resolve the host name {host:?} ({e}); give HOST:PORT with a host \
                 this machine can resolve, or an IP address, {EXAMPLES}"
            )
        })?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{s:?}: the host name {host:?} resolves to no address"))
}

/// `deserialize_with` for an optional listen address in the YAML file: the same forms as the flags.
pub fn deserialize_listen_addr<'de, D>(d: D) -> Result<Option<SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let s = <String as serde::Deserialize>::deserialize(d)?;
    parse_listen_addr(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_host_names_are_taken_and_mistakes_are_named() {
        assert_eq!(
            parse_listen_addr("127.0.0.1:80").unwrap(),
            "127.0.0.1:80".parse().unwrap()
        );
        assert_eq!(
            parse_listen_addr("[::1]:80").unwrap(),
            "[::1]:80".parse().unwrap()
        );
        assert_eq!(
            parse_listen_addr("localhost:9000").unwrap(),
            "127.0.0.1:9000".parse().unwrap()
        );
        for (bad, says) in [
            ("localhost", "has no port"),
            (":80", "has no host"),
            ("::1:80", "brackets"),
            ("localhost:http", "is not a port"),
            ("localhost:70000", "is not a port"),
        ] {
            let e = parse_listen_addr(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
