//! MAC addresses: parsing (strictly), formatting, and the default a VM's
//! NIC gets. A leaf: the NIC model and the host's TAP both use it.

/// The MAC a VM gets when its `--net` flag names none. Both sides of an FT
/// pair must use the same one: it is part of the VM's configuration.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Why a MAC address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("invalid MAC address {0:?}: expected six hex pairs like 52:54:00:12:34:56")]
    Syntax(String),
    #[error("invalid MAC address {0}: it is a multicast address (lowest bit of the first octet set)")]
    Multicast(String),
    #[error("invalid MAC address {0}: all zeroes")]
    Zero(String),
}

/// Parses a NIC's MAC, `52:54:00:12:34:56`: six pairs of hex digits, a
/// unicast address (the lowest bit of the first octet clear), not all
/// zeroes.
pub fn parse_mac(s: &str) -> Result<[u8; 6], MacError> {
    let bad = || MacError::Syntax(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for octet in mac.iter_mut() {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(MacError::Multicast(s.to_string()));
    }
    if mac == [0; 6] {
        return Err(MacError::Zero(s.to_string()));
    }
    Ok(mac)
}

/// `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = *mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(parse_mac("52:54:00:12:34:56"), Ok(DEFAULT_MAC));
        assert_eq!(parse_mac("02:AB:cd:EF:00:ff"), Ok([2, 0xab, 0xcd, 0xef, 0, 0xff]));
        for bad in
            ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "52:54:00:12:34:5", "52:54:00:12:34:567", "5254.0012.3456"]
        {
            assert!(parse_mac(bad).unwrap_err().to_string().contains("six hex pairs"), "{bad}");
        }
        for bad in ["52:54:00:12:34:gg", "52:54:00:12:34:+5", "52-54-00-12-34-56", "52:54:00:12:34:56:"] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert!(parse_mac("01:00:5e:00:00:01").unwrap_err().to_string().contains("multicast"));
        assert!(parse_mac("ff:ff:ff:ff:ff:ff").unwrap_err().to_string().contains("multicast"));
        assert!(parse_mac("00:00:00:00:00:00").unwrap_err().to_string().contains("zero"));
        assert_eq!(format_mac(&[0x52, 0x54, 0, 0xab, 0x3, 0xff]), "52:54:00:ab:03:ff");
    }
}
