//! Connections that have not finished their upgrade: how many, in total and per client
//! address.
//!
//! Each costs a file descriptor and a task before any check of who is asking has run, so a
//! flood of them (connect and send nothing, or send the headers slowly) could exhaust the
//! process's descriptors before `max_connections` ever applies. Capping them per address
//! keeps one client from taking every place; the total cap bounds what many can take. An IPv6
//! client is counted by its /64 network, since one host is usually given a whole /64.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use crate::stats::TransportStats;

/// Why a connection was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Total,
    PerAddress,
}

pub(crate) struct Handshakes {
    max_total: usize,
    max_per_address: usize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    /// `handshakes_in_progress` is the total.
    stats: Arc<TransportStats>,
}

/// One connection's place among the handshakes in progress; given back when dropped.
pub(crate) struct InProgress {
    handshakes: Arc<Handshakes>,
    address: IpAddr,
}

impl Handshakes {
    pub(crate) fn new(
        max_total: usize,
        max_per_address: usize,
        stats: Arc<TransportStats>,
    ) -> Handshakes {
        Handshakes {
            max_total,
            max_per_address,
            per_address: Mutex::new(HashMap::new()),
            stats,
        }
    }

    /// Takes a place for a connection from `address`, if there is one.
    pub(crate) fn enter(this: &Arc<Handshakes>, address: IpAddr) -> Result<InProgress, Refused> {
        let address = client_of(address);
        let mut per_address = this.per_address.lock().unwrap_or_else(|e| e.into_inner());
        let total = this.stats.handshakes_in_progress.load(Relaxed);
        if total >= this.max_total as u64 {
            return Err(Refused::Total);
        }
        let count = per_address.get(&address).copied().unwrap_or(0);
        if count >= this.max_per_address {
            return Err(Refused::PerAddress);
        }
        per_address.insert(address, count + 1);
        this.stats.handshakes_in_progress.fetch_add(1, Relaxed);
        Ok(InProgress {
            handshakes: this.clone(),
            address,
        })
    }
}

/// The client an address stands for: an IPv4 address (also when mapped into IPv6), or an
/// IPv6 /64.
fn client_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        let h = &self.handshakes;
        let mut per_address = h.per_address.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                per_address.remove(&self.address);
                if per_address.is_empty() {
                    per_address.shrink_to_fit();
                }
            }
        }
        h.stats.handshakes_in_progress.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_capped_per_address_and_in_total_and_given_back() {
        let h = Arc::new(Handshakes::new(3, 2, Arc::default()));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = Handshakes::enter(&h, a).unwrap();
        let _a2 = Handshakes::enter(&h, a).unwrap();
        assert_eq!(Handshakes::enter(&h, a).err(), Some(Refused::PerAddress));
        let _b1 = Handshakes::enter(&h, b).unwrap();
        assert_eq!(Handshakes::enter(&h, b).err(), Some(Refused::Total));
        drop(a1);
        assert!(Handshakes::enter(&h, b).is_ok());
        assert_eq!(h.stats.handshakes_in_progress.load(Relaxed), 2);
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_ipv4_is_itself() {
        let h = Arc::new(Handshakes::new(10, 1, Arc::default()));
        let _one = Handshakes::enter(&h, "2001:db8:1:2::1".parse().unwrap()).unwrap();
        let same_64 = "2001:db8:1:2:ffff:eeee:dddd:cccc".parse().unwrap();
        assert_eq!(
            Handshakes::enter(&h, same_64).err(),
            Some(Refused::PerAddress)
        );
        assert!(Handshakes::enter(&h, "2001:db8:1:3::1".parse().unwrap()).is_ok());
        let _v4 = Handshakes::enter(&h, "10.0.0.9".parse().unwrap()).unwrap();
        let mapped = "::ffff:10.0.0.9".parse().unwrap();
        assert_eq!(
            Handshakes::enter(&h, mapped).err(),
            Some(Refused::PerAddress)
        );
    }
}
