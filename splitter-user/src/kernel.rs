//! The seam between the controller and the kernel: [`DataplaneOps`] is
//! what the controller asks of a data plane (publish a configuration, read
//! its counters and flows), implemented by the real [`Dataplane`] and, for
//! host tests without root, by [`FakeDataplane`], which records what was
//! published and answers with counters a test sets.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use splitter_common::{BackendStats, Conn};

use crate::{
    config::Config,
    dataplane::{Attachment, Dataplane, DataplaneError, LoadedProgram, TableWalker},
    signals::Counters,
    state::Layout,
};

/// Result of data-plane operations.
pub type Result<T> = std::result::Result<T, DataplaneError>;

/// What the controller asks of a data plane.
pub trait DataplaneOps: Send {
    /// Publishes `config` (see [`Dataplane::apply`]).
    ///
    /// # Errors
    /// The kernel refused an update; part of `config` may be live.
    fn apply(&mut self, config: &Config) -> Result<()>;
    /// The id the tables use for a configured backend.
    fn backend_id(&self, service: &str, version: &str, addr: SocketAddrV4) -> Option<u32>;
    /// Packet and flow counters of one backend.
    ///
    /// # Errors
    /// A map read failed.
    fn backend_stats(
        &self,
        service: &str,
        version: &str,
        addr: SocketAddrV4,
    ) -> Result<BackendStats>;
    /// Signal counters of one backend.
    ///
    /// # Errors
    /// A map read failed.
    fn backend_counters(
        &self,
        service: &str,
        version: &str,
        addr: SocketAddrV4,
    ) -> Result<Counters>;
    /// Drops of one service by reason.
    ///
    /// # Errors
    /// A map read failed.
    fn service_drops(&self, service: &str) -> Result<BTreeMap<&'static str, u64>>;
    /// Global counters by name.
    ///
    /// # Errors
    /// A map read failed.
    fn counters(&self) -> Result<BTreeMap<&'static str, u64>>;
    /// Live flows per backend id at `now` (a walk of the connection table).
    ///
    /// # Errors
    /// A map read failed.
    fn live_flows(&self, now: u64) -> Result<BTreeMap<u32, u64>>;
    /// The connection-table entry of a client's flow to a VIP.
    ///
    /// # Errors
    /// A map read failed.
    fn conn(&self, client: SocketAddrV4, vip: SocketAddrV4, proto: u8) -> Result<Option<Conn>>;
    /// What is live, for the state file.
    fn layout(&self) -> Layout;
    /// Where the program is attached.
    fn attachments(&self) -> &[Attachment];
    /// The running kernel program.
    fn program(&self) -> &LoadedProgram;
    /// The SNAT address in use.
    fn snat_address(&self) -> Option<Ipv4Addr>;
    /// Connection-table entries, as the kernel holds them.
    fn conn_capacity(&self) -> Option<u32>;
    /// A walker of the connection table with descriptors of its own, for
    /// a task outside the controller's lock; `None` when there is no table.
    ///
    /// # Errors
    /// A descriptor could not be duplicated.
    fn walker(&self) -> std::io::Result<Option<TableWalker>>;
    /// The maps of the TCP shadow tee, with descriptors of their own;
    /// `None` when there is no kernel.
    ///
    /// # Errors
    /// A descriptor could not be duplicated.
    fn tee_maps(&self) -> std::io::Result<Option<crate::tee::TeeMaps>>;
    /// The id a configured service has in the tables.
    fn service_id(&self, service: &str) -> Option<u32>;
}

impl DataplaneOps for Dataplane {
    fn apply(&mut self, config: &Config) -> Result<()> {
        Dataplane::apply(self, config)
    }
    fn backend_id(&self, service: &str, version: &str, addr: SocketAddrV4) -> Option<u32> {
        Dataplane::backend_id(self, service, version, addr)
    }
    fn backend_stats(
        &self,
        service: &str,
        version: &str,
        addr: SocketAddrV4,
    ) -> Result<BackendStats> {
        Dataplane::backend_stats(self, service, version, addr)
    }
    fn backend_counters(
        &self,
        service: &str,
        version: &str,
        addr: SocketAddrV4,
    ) -> Result<Counters> {
        Dataplane::backend_counters(self, service, version, addr)
    }
    fn service_drops(&self, service: &str) -> Result<BTreeMap<&'static str, u64>> {
        Dataplane::service_drops(self, service)
    }
    fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        Dataplane::counters(self)
    }
    fn live_flows(&self, now: u64) -> Result<BTreeMap<u32, u64>> {
        Dataplane::live_flows(self, now)
    }
    fn conn(&self, client: SocketAddrV4, vip: SocketAddrV4, proto: u8) -> Result<Option<Conn>> {
        Dataplane::conn(self, client, vip, proto)
    }
    fn layout(&self) -> Layout {
        Dataplane::layout(self)
    }
    fn attachments(&self) -> &[Attachment] {
        Dataplane::attachments(self)
    }
    fn program(&self) -> &LoadedProgram {
        Dataplane::program(self)
    }
    fn snat_address(&self) -> Option<Ipv4Addr> {
        Dataplane::snat_address(self)
    }
    fn conn_capacity(&self) -> Option<u32> {
        Dataplane::conn_capacity(self)
    }
    fn walker(&self) -> std::io::Result<Option<TableWalker>> {
        TableWalker::new(self).map(Some)
    }
    fn tee_maps(&self) -> std::io::Result<Option<crate::tee::TeeMaps>> {
        let (conns, alive) = self.tee_fds()?;
        crate::tee::TeeMaps::open(conns, alive).map(Some)
    }
    fn service_id(&self, service: &str) -> Option<u32> {
        Dataplane::service_id(self, service)
    }
}

/// A data plane in memory for host tests: it records every published
/// configuration, hands out backend ids, and answers reads with what the
/// test set. Nothing reaches a kernel. Clones share one state, so a test
/// keeps a clone to look at what the controller did with its own.
#[derive(Debug, Clone)]
pub struct FakeDataplane {
    state: std::sync::Arc<std::sync::Mutex<FakeState>>,
    program: LoadedProgram,
}

/// What a [`FakeDataplane`] holds.
#[derive(Debug, Default)]
pub struct FakeState {
    /// Every configuration published, oldest first.
    pub published: Vec<Config>,
    /// Signal counters by (service, version, backend); zero when absent.
    pub counters: BTreeMap<(String, String, SocketAddrV4), Counters>,
    /// Live flows by backend id.
    pub live: BTreeMap<u32, u64>,
    /// When set, the next `apply` fails with this message (and publishes
    /// nothing).
    pub fail_next_apply: Option<String>,
    ids: BTreeMap<(String, String, SocketAddrV4), u32>,
}

impl Default for FakeDataplane {
    fn default() -> Self {
        Self {
            state: Default::default(),
            program: LoadedProgram {
                id: 0,
                tag: "0000000000000000".into(),
                source: "fake".into(),
            },
        }
    }
}

impl FakeDataplane {
    /// Runs `f` on the shared state (a poisoned lock is taken over: a
    /// panicking test thread must not hide what was published).
    pub fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        let mut g = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g)
    }

    /// The last published configuration.
    pub fn last(&self) -> Option<Config> {
        self.with(|s| s.published.last().cloned())
    }
}

impl DataplaneOps for FakeDataplane {
    fn apply(&mut self, config: &Config) -> Result<()> {
        self.with(|st| {
            if let Some(m) = st.fail_next_apply.take() {
                return Err(DataplaneError::Capacity(m));
            }
            for s in &config.services {
                for v in &s.versions {
                    for b in &v.backends {
                        let next = st.ids.len() as u32;
                        st.ids
                            .entry((s.name.clone(), v.name.clone(), b.address))
                            .or_insert(next);
                    }
                }
            }
            st.published.push(config.clone());
            Ok(())
        })
    }
    fn backend_id(&self, service: &str, version: &str, addr: SocketAddrV4) -> Option<u32> {
        self.with(|st| {
            st.ids
                .get(&(service.to_string(), version.to_string(), addr))
                .copied()
        })
    }
    fn backend_stats(
        &self,
        service: &str,
        version: &str,
        addr: SocketAddrV4,
    ) -> Result<BackendStats> {
        let c = self.backend_counters(service, version, addr)?;
        Ok(BackendStats {
            packets: c.packets,
            bytes: 0,
            new_flows: c.attempts,
            reply_packets: c.reply_packets,
            reply_bytes: 0,
        })
    }
    fn backend_counters(
        &self,
        service: &str,
        version: &str,
        addr: SocketAddrV4,
    ) -> Result<Counters> {
        Ok(self.with(|st| {
            st.counters
                .get(&(service.to_string(), version.to_string(), addr))
                .copied()
                .unwrap_or_default()
        }))
    }
    fn service_drops(&self, _service: &str) -> Result<BTreeMap<&'static str, u64>> {
        Ok(BTreeMap::new())
    }
    fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        Ok(BTreeMap::new())
    }
    fn live_flows(&self, _now: u64) -> Result<BTreeMap<u32, u64>> {
        Ok(self.with(|st| st.live.clone()))
    }
    fn conn(&self, _client: SocketAddrV4, _vip: SocketAddrV4, _proto: u8) -> Result<Option<Conn>> {
        Ok(None)
    }
    fn layout(&self) -> Layout {
        Layout::default()
    }
    fn attachments(&self) -> &[Attachment] {
        &[]
    }
    fn program(&self) -> &LoadedProgram {
        &self.program
    }
    fn snat_address(&self) -> Option<Ipv4Addr> {
        None
    }
    fn conn_capacity(&self) -> Option<u32> {
        None
    }
    fn walker(&self) -> std::io::Result<Option<TableWalker>> {
        Ok(None)
    }
    fn tee_maps(&self) -> std::io::Result<Option<crate::tee::TeeMaps>> {
        Ok(None)
    }
    fn service_id(&self, _service: &str) -> Option<u32> {
        None
    }
}
