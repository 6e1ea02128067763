//! `dcs`: the agent's etcd session: one lease, the leader election, the
//! cluster snapshot, and a watch that wakes the agent loop at once.
//!
//! Every call is bounded by a timeout (the caller passes `retry_timeout`), so
//! a frozen etcd turns into an error the HA decision can act on (fencing)
//! instead of a hung loop. Keys come only from [`pgha_cluster::Keys`], values
//! only from its record types. May call etcd and nothing else.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use pgha_cluster::{
    decode, encode, ClusterConfig, HistoryEntry, Key, Keys, Member, Status, Switchover, SyncState,
};
use tokio::sync::Notify;

use crate::ha::DcsView;

/// An etcd operation failed or timed out.
#[derive(Debug, thiserror::Error)]
pub enum DcsError {
    #[error("etcd {op}: {source}")]
    Etcd {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd {op}: no answer within {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("etcd lease {0:x} expired")]
    LeaseExpired(i64),
    #[error("{0}")]
    Record(#[from] pgha_cluster::RecordError),
    #[error("{0}")]
    Invalid(String),
}

impl DcsError {
    /// Short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            DcsError::Etcd { .. } => "etcd",
            DcsError::Timeout { .. } => "timeout",
            DcsError::LeaseExpired(_) => "lease_expired",
            DcsError::Record(_) => "record",
            DcsError::Invalid(_) => "invalid",
        }
    }
}

/// Runs `fut` with a deadline, naming the operation in errors.
async fn bounded<T>(
    op: &'static str,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, DcsError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(DcsError::Etcd { op, source }),
        Err(_) => Err(DcsError::Timeout { op, timeout }),
    }
}

/// Whether an error means "this endpoint is unreachable": another etcd
/// member may answer, so the request is worth repeating.
fn transient(e: &DcsError) -> bool {
    match e {
        DcsError::Etcd { source, .. } => {
            let t = source.to_string();
            t.contains("Unavailable") || t.contains("unavailable") || t.contains("connect")
        }
        _ => false,
    }
}

/// Repeats `attempt` while it fails on an unreachable endpoint, within `timeout`
/// in all: with several endpoints, a dead member costs a retry, not an error.
async fn retrying<T, Fut>(
    op: &'static str,
    timeout: Duration,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, DcsError>
where
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match bounded(op, left, attempt()).await {
            Err(e) if transient(&e) && left > Duration::from_millis(100) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return r,
        }
    }
}

/// A snapshot plus the revision it was read at.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub view: DcsView,
    pub revision: i64,
}

/// One agent's etcd session.
#[derive(Clone)]
pub struct Dcs {
    client: Client,
    keys: Keys,
    me: String,
    timeout: Duration,
}

impl Dcs {
    /// Connects to any of `endpoints` (etcd-client balances across them).
    pub async fn connect(
        endpoints: &[String],
        keys: Keys,
        me: &str,
        timeout: Duration,
    ) -> Result<Dcs, DcsError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(2), timeout)
            .with_keep_alive_while_idle(true);
        let client = bounded(
            "connect",
            timeout * 2,
            Client::connect(endpoints, Some(opts)),
        )
        .await?;
        Ok(Dcs {
            client,
            keys,
            me: me.to_owned(),
            timeout,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Grants a lease of `ttl`, rounded up to whole seconds (etcd's unit):
    /// never shorter than asked. Returns its id and the TTL etcd granted.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<(i64, Duration), DcsError> {
        let secs = ttl.as_secs_f64().ceil().max(2.0) as i64;
        let r = retrying("lease grant", self.timeout, || {
            let mut c = self.client.clone();
            async move { c.lease_grant(secs, None).await }
        })
        .await?;
        let granted = u64::try_from(r.ttl()).unwrap_or(0).max(2);
        Ok((r.id(), Duration::from_secs(granted)))
    }

    /// Renews `lease` once; fails if it already expired.
    pub async fn keep_alive(&self, lease: i64) -> Result<(), DcsError> {
        let attempt = || {
            let mut c = self.client.clone();
            async move {
                let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                stream.message().await
            }
        };
        match retrying("lease keepalive", self.timeout, attempt).await {
            Ok(Some(r)) if r.ttl() > 0 => Ok(()),
            Ok(_) => Err(DcsError::LeaseExpired(lease)),
            // etcd forgot the lease (it expired while we could not reach it).
            Err(DcsError::Etcd { source, .. })
                if source.to_string().contains("lease not found") =>
            {
                Err(DcsError::LeaseExpired(lease))
            }
            Err(e) => Err(e),
        }
    }

    /// Revokes `lease`: its member record (and leader key) go at once.
    pub async fn revoke(&self, lease: i64) -> Result<(), DcsError> {
        let mut c = self.client.clone();
        bounded("lease revoke", self.timeout, c.lease_revoke(lease)).await?;
        Ok(())
    }

    /// Reads everything under the cluster prefix in one request.
    pub async fn snapshot(&self) -> Result<Snapshot, DcsError> {
        let r = retrying("get", self.timeout, || {
            let mut c = self.client.clone();
            let prefix = self.keys.prefix().to_owned();
            async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })
        .await?;
        let revision = r.header().map(|h| h.revision()).unwrap_or_default();
        let mut view = DcsView::default();
        for kv in r.kvs() {
            let v = kv.value();
            match self.keys.parse(kv.key()) {
                Some(Key::Initialize) => view.initialize = Some(text(v)),
                Some(Key::Config) => view.config = decode("config", v)?,
                Some(Key::Leader) => {
                    view.leader = Some(text(v)).filter(|l| !l.is_empty());
                    view.leader_lease = Some(kv.lease());
                }
                Some(Key::Member(_)) => {
                    if let Ok(m) = decode::<Member>("member", v) {
                        view.members.push(m);
                    }
                }
                Some(Key::Sync) => view.sync = decode::<SyncState>("sync", v).ok(),
                Some(Key::Status) => view.status = decode::<Status>("status", v).ok(),
                Some(Key::Switchover) => {
                    view.switchover = decode::<Switchover>("switchover", v).ok()
                }
                Some(Key::Proxy(_)) => {
                    if let Ok(p) = decode("proxy", v) {
                        view.proxies.push(p);
                    }
                }
                Some(Key::History) => view.history = decode("history", v).unwrap_or_default(),
                None => {}
            }
        }
        Ok(Snapshot { view, revision })
    }

    /// Creates `key` = `value` if absent; true if we created it.
    async fn create(
        &self,
        key: String,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<bool, DcsError> {
        let c = self.client.clone();
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, opts)]);
        let r = retrying("txn create", self.timeout, || {
            let (mut c, txn) = (c.clone(), txn.clone());
            async move { c.txn(txn).await }
        })
        .await?;
        Ok(r.succeeded())
    }

    /// Races for `initialize`; true if we won. Seeds `config` if absent.
    pub async fn take_initialize(&self, seed: &ClusterConfig) -> Result<bool, DcsError> {
        let won = self
            .create(self.keys.initialize(), self.me.clone().into_bytes(), None)
            .await?;
        if won {
            self.create(self.keys.config(), encode(seed), None).await?;
        }
        Ok(won)
    }

    /// Gives up `initialize` after a failed bootstrap so another can try.
    pub async fn clear_initialize(&self) -> Result<(), DcsError> {
        self.delete_if_value(self.keys.initialize(), &self.me).await
    }

    /// Races for the leader key on `lease`; true if we hold it now.
    pub async fn take_leader(&self, lease: i64) -> Result<bool, DcsError> {
        self.create(
            self.keys.leader(),
            self.me.clone().into_bytes(),
            Some(lease),
        )
        .await
    }

    /// Deletes the leader key if it is ours.
    pub async fn release_leader(&self) -> Result<(), DcsError> {
        self.delete_if_value(self.keys.leader(), &self.me).await
    }

    async fn delete_if_value(&self, key: String, value: &str) -> Result<(), DcsError> {
        let c = self.client.clone();
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, value)])
            .and_then([TxnOp::delete(key, None)]);
        retrying("txn delete", self.timeout, || {
            let (mut c, txn) = (c.clone(), txn.clone());
            async move { c.txn(txn).await }
        })
        .await?;
        Ok(())
    }

    async fn put(
        &self,
        op: &'static str,
        key: String,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<(), DcsError> {
        let c = self.client.clone();
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        retrying(op, self.timeout, || {
            let (mut c, key, value, opts) = (c.clone(), key.clone(), value.clone(), opts.clone());
            async move { c.put(key, value, opts).await }
        })
        .await?;
        Ok(())
    }

    /// Writes our member record on our lease.
    pub async fn put_member(&self, m: &Member, lease: i64) -> Result<(), DcsError> {
        self.put(
            "put member",
            self.keys.member(&m.name),
            encode(m),
            Some(lease),
        )
        .await
    }

    pub async fn put_status(&self, s: &Status) -> Result<(), DcsError> {
        self.put("put status", self.keys.status(), encode(s), None)
            .await
    }

    pub async fn put_sync(&self, s: &SyncState) -> Result<(), DcsError> {
        self.put("put sync", self.keys.sync(), encode(s), None)
            .await
    }

    pub async fn put_config(&self, c: &ClusterConfig) -> Result<(), DcsError> {
        self.put("put config", self.keys.config(), encode(c), None)
            .await
    }

    /// Compare-and-set of `config`: true if it still was `old` (or absent).
    pub async fn replace_config(
        &self,
        old: &ClusterConfig,
        new: &ClusterConfig,
    ) -> Result<bool, DcsError> {
        let key = self.keys.config();
        let mut c = self.client.clone();
        let put = TxnOp::put(key.clone(), encode(new), None);
        let r = bounded(
            "txn config",
            self.timeout,
            c.txn(
                Txn::new()
                    .when([Compare::value(key.clone(), CompareOp::Equal, encode(old))])
                    .and_then([put.clone()]),
            ),
        )
        .await?;
        if r.succeeded() {
            return Ok(true);
        }
        self.create(key, encode(new), None).await
    }

    pub async fn put_history(&self, h: &[HistoryEntry]) -> Result<(), DcsError> {
        self.put("put history", self.keys.history(), encode(&h), None)
            .await
    }

    pub async fn put_switchover(&self, s: &Switchover) -> Result<(), DcsError> {
        self.put("put switchover", self.keys.switchover(), encode(s), None)
            .await
    }

    pub async fn clear_switchover(&self) -> Result<(), DcsError> {
        let mut c = self.client.clone();
        bounded(
            "delete switchover",
            self.timeout,
            c.delete(self.keys.switchover(), None),
        )
        .await?;
        Ok(())
    }

    /// Watches the cluster prefix from `revision` on, forever, and wakes
    /// `wake` on every change that can matter to a decision. Resumes from the
    /// last revision seen after an error, so no event is missed.
    pub async fn watch(self, mut revision: i64, wake: Arc<Notify>) {
        loop {
            let mut c = self.client.clone();
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            let mut stream = match c.watch(self.keys.prefix(), Some(opts)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "watch: connect failed, retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            while let Ok(Some(resp)) = stream.message().await {
                if resp.canceled() {
                    // Compacted past our revision: take a fresh start.
                    revision = resp.compact_revision().max(revision);
                    break;
                }
                if let Some(h) = resp.header() {
                    revision = revision.max(h.revision());
                }
                if resp.events().iter().any(|e| self.matters(e)) {
                    wake.notify_one();
                }
            }
            // The stream broke (etcd member lost): wake the loop, then resume.
            wake.notify_one();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Member records and `status` change on every loop of every agent; only
    /// their appearance or disappearance needs an immediate decision.
    fn matters(&self, e: &etcd_client::Event) -> bool {
        let Some(kv) = e.kv() else { return false };
        match self.keys.parse(kv.key()) {
            Some(Key::Member(n)) => {
                n != self.me && (e.event_type() == EventType::Delete || kv.version() == 1)
            }
            Some(Key::Status) | None => false,
            Some(_) => true,
        }
    }
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}
