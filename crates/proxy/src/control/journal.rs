//! The admin journal: the ordered list of admin writes that at least one replica accepted, and
//! how far each replica has applied it. A replica that missed writes (down, timed out, added
//! later) is caught up from here before it takes new sessions.
//!
//! With a directory (`--admin-journal DIR`) the journal survives restarts: `journal.jsonl` holds
//! one write per line (method, path, the headers that matter and the body, base64),
//! `replicas.json` each replica's applied position. Both are created with mode 0600 in a 0700
//! directory: **they hold secrets** (resource contents; clients' admin tokens too, unless the
//! proxy replays with its own credential, `--admin-replay-token-file`, in which case
//! `Authorization` is never kept). Writes to the same resource path, the resource policy or the
//! same attestation policy id supersede older ones (compaction: the journal is the latest write
//! per key, in the order they were made), and the journal keeps at most `max_entries` writes;
//! beyond that the oldest are dropped with a warning.
//!
//! A replica that may have lost its state (it restarted empty) is [`Journal::resync`]ed: its
//! position goes back to zero, so it is behind by the whole journal and takes no new sessions
//! until it has applied it again, in order. Admin writes are idempotent (a set writes the same
//! value again; a delete of what is gone is answered "not found", which counts as applied), so
//! replaying the compacted journal onto any replica state ends in the state of the last writes.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::{Deserialize, Serialize};

use crate::upstream::backend::Backends;

/// Headers of an admin write that are kept and replayed; everything else is connection detail.
const KEPT_HEADERS: [HeaderName; 3] = [
    http::header::AUTHORIZATION,
    http::header::CONTENT_TYPE,
    http::header::ACCEPT,
];

/// One admin write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminWrite {
    /// Position in the journal; increasing, with gaps where writes were superseded.
    pub seq: u64,
    /// `POST` or `DELETE`.
    pub method: Method,
    /// Path and query.
    pub path: String,
    /// The kept headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body.
    pub body: Bytes,
    /// What it supersedes (see [`AdminWrite::supersede_key`]), worked out once: every append
    /// compares it with every entry.
    key: Option<String>,
}

impl AdminWrite {
    /// A write of `method path` with the headers worth replaying from `headers`.
    pub fn new(method: Method, path: String, headers: &HeaderMap, body: Bytes) -> Self {
        let headers = KEPT_HEADERS
            .iter()
            .flat_map(|n| headers.get_all(n).iter().map(move |v| (n.clone(), v.clone())))
            .collect();
        Self {
            seq: 0,
            method,
            path,
            headers,
            body,
            key: None,
        }
        .keyed()
    }

    /// Writes with the same key supersede each other: the last write to a resource path (set or
    /// delete), to the resource policy, or to one attestation policy id (Trustee's
    /// `SetPolicyInput.policy_id`, `default` when absent) is the state. Reference values are all
    /// kept: an RVPS message may carry several values and the proxy does not parse it.
    pub(crate) fn supersede_key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// Works out [`Self::supersede_key`] from the path and body.
    fn keyed(mut self) -> Self {
        let p = self.path.split('?').next().unwrap_or("");
        self.key = if p.starts_with("/kbs/v0/resource/") || p == "/kbs/v0/resource-policy" {
            Some(p.to_owned())
        } else if p == "/kbs/v0/attestation-policy" {
            let id = serde_json::from_slice::<serde_json::Value>(&self.body)
                .ok()
                .and_then(|v| v.get("policy_id").and_then(|i| i.as_str()).map(str::to_owned))
                .unwrap_or_else(|| "default".into());
            Some(format!("{p}#{id}"))
        } else {
            None
        };
        self
    }

    /// Whether this write is a delete (a replayed delete answered "not found" is applied).
    pub(crate) fn is_delete(&self) -> bool {
        self.method == Method::DELETE
    }
}

#[derive(Serialize, Deserialize)]
struct Line {
    seq: u64,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Line {
    fn from_write(w: &AdminWrite) -> Self {
        Self {
            seq: w.seq,
            method: w.method.to_string(),
            path: w.path.clone(),
            headers: w
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), STANDARD.encode(v.as_bytes())))
                .collect(),
            body: STANDARD.encode(&w.body),
        }
    }

    fn into_write(self) -> Option<AdminWrite> {
        let headers = self
            .headers
            .into_iter()
            .map(|(n, v)| {
                let v = STANDARD.decode(v).ok()?;
                Some((
                    HeaderName::from_bytes(n.as_bytes()).ok()?,
                    HeaderValue::from_bytes(&v).ok()?,
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(
            AdminWrite {
                seq: self.seq,
                method: Method::from_bytes(self.method.as_bytes()).ok()?,
                path: self.path,
                headers,
                body: Bytes::from(STANDARD.decode(self.body).ok()?),
                key: None,
            }
            .keyed(),
        )
    }
}

#[derive(Debug, Default)]
struct State {
    entries: VecDeque<Arc<AdminWrite>>,
    /// The last sequence number handed out.
    last_seq: u64,
    /// Per replica name: the position up to which it has applied the journal.
    applied: HashMap<String, u64>,
}

impl State {
    /// Index of the first entry `replica` has not applied (entries are in sequence order, so a
    /// binary search: the lags are refreshed every second).
    fn first_pending(&self, replica: &str) -> usize {
        let applied = self.applied.get(replica).copied().unwrap_or(0);
        self.entries.partition_point(|w| w.seq <= applied)
    }
}

/// The journal. Its `order` lock serializes fan-outs and replays so every replica applies the
/// writes in one order; it is held across the fan-out's awaits on purpose (admin writes are
/// rare, and order is their point). The state lock is never held across an await.
#[derive(Debug)]
pub struct Journal {
    state: Mutex<State>,
    order: tokio::sync::Mutex<()>,
    dir: Option<PathBuf>,
    max_entries: usize,
    /// Clients' `Authorization` headers are not kept: the proxy replays with its own credential.
    strip_authorization: bool,
}

impl Journal {
    /// An in-memory journal, or one kept in `dir` (created 0700 if missing; loaded if present).
    pub fn open(dir: Option<&Path>, max_entries: usize) -> io::Result<Self> {
        Self::open_with(dir, max_entries, false)
    }

    /// The same; with `strip_authorization`, clients' `Authorization` headers are neither kept
    /// nor left in a journal loaded from `dir` (it is rewritten without them).
    pub(crate) fn open_with(dir: Option<&Path>, max_entries: usize, strip_authorization: bool) -> io::Result<Self> {
        let mut state = State::default();
        if let Some(dir) = dir {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            let path = dir.join("journal.jsonl");
            if path.exists() {
                for (i, line) in BufReader::new(File::open(&path)?).lines().enumerate() {
                    let line = line?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let write = serde_json::from_str::<Line>(&line)
                        .ok()
                        .and_then(Line::into_write)
                        .ok_or_else(|| {
                            io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("{}: line {} is damaged", path.display(), i + 1),
                            )
                        })?;
                    state.last_seq = state.last_seq.max(write.seq);
                    state.entries.push_back(Arc::new(write));
                }
            }
            let replicas = dir.join("replicas.json");
            if replicas.exists() {
                let text = fs::read_to_string(&replicas)?;
                let saved: HashMap<String, u64> = serde_json::from_str(&text)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", replicas.display())))?;
                state.last_seq = state.last_seq.max(saved.values().copied().max().unwrap_or(0));
                state.applied = saved;
            }
        }
        let mut had_tokens = false;
        if strip_authorization {
            for w in &mut state.entries {
                if w.headers.iter().any(|(n, _)| n == http::header::AUTHORIZATION) {
                    had_tokens = true;
                    Arc::make_mut(w)
                        .headers
                        .retain(|(n, _)| n != http::header::AUTHORIZATION);
                }
            }
        }
        let journal = Self {
            state: Mutex::new(state),
            order: tokio::sync::Mutex::new(()),
            dir: dir.map(Path::to_owned),
            max_entries,
            strip_authorization,
        };
        if had_tokens {
            journal.persist_entries(&journal.state(), true)?;
        }
        Ok(journal)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the ordering lock for a fan-out or a replay.
    pub async fn order(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.order.lock().await
    }

    /// Writes in the journal now.
    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many journaled writes `replica` has not applied.
    pub fn behind(&self, replica: &str) -> usize {
        let state = self.state();
        state.entries.len() - state.first_pending(replica)
    }

    /// The writes `replica` has not applied, in order.
    pub fn pending(&self, replica: &str) -> Vec<Arc<AdminWrite>> {
        let state = self.state();
        state.entries.range(state.first_pending(replica)..).cloned().collect()
    }

    /// Whether the journal is kept on disk (else it is lost with the process).
    pub(crate) fn is_durable(&self) -> bool {
        self.dir.is_some()
    }

    /// The whole compacted journal, in order: what a reconciliation re-applies.
    pub fn entries(&self) -> Vec<Arc<AdminWrite>> {
        self.state().entries.iter().cloned().collect()
    }

    /// Appends a write some replicas accepted; returns its sequence number. Older writes it
    /// supersedes are dropped, and the oldest beyond the bound.
    pub fn append(&self, mut write: AdminWrite) -> io::Result<u64> {
        if self.strip_authorization {
            write.headers.retain(|(n, _)| n != http::header::AUTHORIZATION);
        }
        let mut state = self.state();
        state.last_seq += 1;
        write.seq = state.last_seq;
        let mut rewrite = false;
        if let Some(key) = write.key.as_deref() {
            let before = state.entries.len();
            state.entries.retain(|w| w.supersede_key() != Some(key));
            rewrite |= state.entries.len() != before;
        }
        while state.entries.len() >= self.max_entries {
            let dropped = state.entries.pop_front();
            tracing::warn!(
                seq = dropped.map(|w| w.seq),
                max = self.max_entries,
                "admin journal full: dropped its oldest write; replicas added later will not get it"
            );
            rewrite = true;
        }
        let seq = write.seq;
        state.entries.push_back(Arc::new(write));
        self.persist_entries(&state, rewrite)?;
        Ok(seq)
    }

    /// Records that `replica` applied everything up to `seq`.
    pub(crate) fn mark_applied(&self, replica: &str, seq: u64) -> io::Result<()> {
        let mut state = self.state();
        let slot = state.applied.entry(replica.to_owned()).or_insert(0);
        *slot = (*slot).max(seq);
        self.persist_applied(&state)
    }

    /// Forgets what `replica` applied: it may have lost its state, so it is behind by the whole
    /// journal until it has applied it again. Returns how many writes it is now behind.
    pub fn resync(&self, replica: &str) -> io::Result<usize> {
        let mut state = self.state();
        state.applied.insert(replica.to_owned(), 0);
        self.persist_applied(&state)?;
        Ok(state.entries.len())
    }

    /// Sets each backend's lag from the journal (new backends start behind when it is not empty).
    pub(crate) fn refresh_lags(&self, backends: &Backends) {
        for b in &backends.list {
            b.set_journal_lag(self.behind(&b.name) as u64);
        }
    }

    fn persist_entries(&self, state: &State, rewrite: bool) -> io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let path = dir.join("journal.jsonl");
        if rewrite {
            let mut text = String::new();
            for w in &state.entries {
                text.push_str(&serde_json::to_string(&Line::from_write(w)).map_err(io::Error::other)?);
                text.push('\n');
            }
            write_private(&path, text.as_bytes())
        } else {
            let last = state.entries.back().expect("just appended");
            let mut line = serde_json::to_string(&Line::from_write(last)).map_err(io::Error::other)?;
            line.push('\n');
            let created = !path.exists();
            let mut f = OpenOptions::new().create(true).append(true).mode(0o600).open(&path)?;
            f.write_all(line.as_bytes())?;
            f.sync_data()?;
            if created {
                sync_dir(dir)?;
            }
            Ok(())
        }
    }

    fn persist_applied(&self, state: &State) -> io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let text = serde_json::to_string(&state.applied).map_err(io::Error::other)?;
        write_private(&dir.join("replicas.json"), text.as_bytes())
    }
}

/// Replaces `path` atomically with `data`, mode 0600.
fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_data()?;
    fs::rename(&tmp, path)?;
    // The rename is durable only once the directory is: a write acknowledged to a client must
    // survive a power loss right after.
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Flushes a directory's entries (a file created or renamed in it) to disk.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(method: Method, path: &str, body: &'static str) -> AdminWrite {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, HeaderValue::from_static("Bearer admin"));
        h.insert(http::header::USER_AGENT, HeaderValue::from_static("not kept"));
        AdminWrite::new(method, path.into(), &h, Bytes::from_static(body.as_bytes()))
    }

    #[test]
    fn tracks_what_each_replica_missed_and_supersedes() {
        let j = Journal::open(None, 100).unwrap();
        let s1 = j.append(write(Method::POST, "/kbs/v0/resource/a/b/c", "one")).unwrap();
        j.mark_applied("kbs-0", s1).unwrap();
        let s2 = j
            .append(write(Method::POST, "/kbs/v0/attestation-policy", "p"))
            .unwrap();
        j.mark_applied("kbs-0", s2).unwrap();
        assert_eq!((j.behind("kbs-0"), j.behind("kbs-1")), (0, 2));
        j.append(write(Method::POST, "/kbs/v0/resource/a/b/c", "two")).unwrap();
        assert_eq!(j.len(), 2, "the second set of a/b/c supersedes the first");
        let pending = j.pending("kbs-1");
        assert_eq!(
            pending.iter().map(|w| &w.body[..]).collect::<Vec<_>>(),
            [&b"p"[..], b"two"]
        );
        assert_eq!(pending[0].headers.len(), 1, "only the kept headers");
        assert_eq!(j.behind("kbs-0"), 1);
    }

    #[test]
    fn bounded() {
        let j = Journal::open(None, 3).unwrap();
        for _ in 0..10 {
            j.append(write(Method::POST, "/kbs/v0/reference-value", "rv")).unwrap();
        }
        assert_eq!(j.len(), 3);
    }

    #[test]
    fn survives_a_restart_with_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            let j = Journal::open(Some(&path), 100).unwrap();
            let s = j
                .append(write(Method::POST, "/kbs/v0/resource/x/y/z", "secret"))
                .unwrap();
            j.mark_applied("kbs-0", s).unwrap();
            j.append(write(Method::DELETE, "/kbs/v0/resource/q/r/s", "")).unwrap();
            j.append(write(Method::POST, "/kbs/v0/resource/x/y/z", "newer"))
                .unwrap(); // rewrite
        }
        let j = Journal::open(Some(&path), 100).unwrap();
        assert_eq!(j.len(), 2);
        assert_eq!(j.behind("kbs-0"), 2);
        assert_eq!(j.behind("kbs-new"), 2);
        assert_eq!(j.pending("kbs-0")[1].body, "newer");
        let s = j.append(write(Method::POST, "/kbs/v0/reference-value", "rv")).unwrap();
        assert!(s > 3, "sequence numbers continue after a restart");
        for f in ["journal.jsonl", "replicas.json"] {
            let mode = fs::metadata(path.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o700);
    }

    /// A replica's admin state, as Trustee keeps it: resources by path, the resource policy,
    /// attestation policies by id, reference values by name.
    #[derive(Debug, Clone, Default, PartialEq)]
    struct Model {
        resources: std::collections::BTreeMap<String, Bytes>,
        resource_policy: Option<Bytes>,
        attestation: std::collections::BTreeMap<String, Bytes>,
        reference: std::collections::BTreeMap<String, Bytes>,
    }

    impl Model {
        fn apply(&mut self, w: &AdminWrite) {
            let id = |key: &str| {
                serde_json::from_slice::<serde_json::Value>(&w.body)
                    .ok()
                    .and_then(|v| v.get(key).and_then(|i| i.as_str()).map(str::to_owned))
                    .unwrap_or_else(|| "default".into())
            };
            match (w.method.as_str(), w.path.as_str()) {
                ("DELETE", p) => {
                    self.resources.remove(p);
                }
                ("POST", "/kbs/v0/resource-policy") => self.resource_policy = Some(w.body.clone()),
                ("POST", "/kbs/v0/attestation-policy") => {
                    self.attestation.insert(id("policy_id"), w.body.clone());
                }
                ("POST", "/kbs/v0/reference-value") => {
                    self.reference.insert(id("name"), w.body.clone());
                }
                (_, p) => {
                    self.resources.insert(p.to_owned(), w.body.clone());
                }
            }
        }
    }

    fn arbitrary_write() -> impl proptest::strategy::Strategy<Value = AdminWrite> {
        use proptest::prelude::*;
        (0..6u8, 0..3u8, 0..1000u16).prop_map(|(kind, key, value)| {
            let (method, path, body) = match kind {
                0 | 1 => (Method::POST, format!("/kbs/v0/resource/r/k/{key}"), format!("v{value}")),
                2 => (Method::DELETE, format!("/kbs/v0/resource/r/k/{key}"), String::new()),
                3 => (Method::POST, "/kbs/v0/resource-policy".into(), format!("p{value}")),
                4 => (
                    Method::POST,
                    "/kbs/v0/attestation-policy".into(),
                    format!(r#"{{"policy_id":"id{key}","policy":"{value}"}}"#),
                ),
                _ => (
                    Method::POST,
                    "/kbs/v0/reference-value".into(),
                    format!(r#"{{"name":"rv{key}","value":"{value}"}}"#),
                ),
            };
            AdminWrite::new(method, path, &HeaderMap::new(), Bytes::from(body))
        })
    }

    proptest::proptest! {
        /// The ordering logic: whatever a replica held before (a boot state, or part of the
        /// history), replaying the compacted journal in order leaves it exactly as the whole
        /// history would, and replaying it again changes nothing (idempotent, deletes too).
        #[test]
        fn replaying_the_compacted_journal_equals_the_history(
            history in proptest::collection::vec(arbitrary_write(), 0..60),
            boot in proptest::collection::vec(arbitrary_write(), 0..8),
            applied_before in 0usize..60,
        ) {
            let j = Journal::open(None, 10_000).unwrap();
            let mut boot_state = Model::default();
            boot.iter().for_each(|w| boot_state.apply(w));
            let mut truth = boot_state.clone();
            for w in &history {
                truth.apply(w);
                j.append(w.clone()).unwrap();
            }
            let compacted = j.entries();
            // A replica that restarted empty (back to its boot state).
            let mut restarted = boot_state.clone();
            compacted.iter().for_each(|w| restarted.apply(w));
            proptest::prop_assert_eq!(&restarted, &truth);
            // One that kept part of the history, then gets the whole journal (reconciliation).
            let mut partial = boot_state.clone();
            history.iter().take(applied_before).for_each(|w| partial.apply(w));
            compacted.iter().for_each(|w| partial.apply(w));
            proptest::prop_assert_eq!(&partial, &truth);
            // Replayed twice.
            compacted.iter().for_each(|w| restarted.apply(w));
            proptest::prop_assert_eq!(&restarted, &truth);
            // And the journal is the latest write per key: no two entries share one.
            let mut keys: Vec<String> = compacted.iter().filter_map(|w| w.supersede_key().map(str::to_owned)).collect();
            let n = keys.len();
            keys.sort();
            keys.dedup();
            proptest::prop_assert_eq!(keys.len(), n);
        }
    }

    #[test]
    fn a_resync_puts_a_replica_behind_by_everything_and_tokens_can_be_kept_out() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(Some(dir.path()), 100).unwrap();
            let s = j.append(write(Method::POST, "/kbs/v0/resource/a/b/c", "x")).unwrap();
            j.mark_applied("kbs-0", s).unwrap();
            assert_eq!(j.behind("kbs-0"), 0);
            assert_eq!(j.resync("kbs-0").unwrap(), 1);
            assert_eq!(j.behind("kbs-0"), 1);
        }
        let text = fs::read_to_string(dir.path().join("journal.jsonl")).unwrap();
        assert!(text.contains("authorization"), "kept without a replay credential");
        let j = Journal::open_with(Some(dir.path()), 100, true).unwrap();
        assert_eq!(j.behind("kbs-0"), 1, "the resync survives a restart");
        assert!(j.entries()[0]
            .headers
            .iter()
            .all(|(n, _)| n != http::header::AUTHORIZATION));
        j.append(write(Method::POST, "/kbs/v0/resource/d/e/f", "y")).unwrap();
        let text = fs::read_to_string(dir.path().join("journal.jsonl")).unwrap();
        assert!(
            !text.contains("authorization"),
            "stripped from the old entries and never written again: {text}"
        );
    }
}
