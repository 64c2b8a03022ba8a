//! The SODA (hotpot) API's shapes and the rules between them and
//! Kubernetes: which SODA block volume mirrors a PersistentVolume (name,
//! size, status, metadata), how a volume is brought up to date under SODA's
//! merge-only metadata, and which backup policy a SODA profile asks for.
//!
//! Who wins: Kubernetes for facts about the volume (the desired SODA volume
//! is computed from the PV alone and overwrites what SODA holds), SODA for
//! policy (a profile's repository, schedule and retention are taken as they
//! are).
//!
//! SODA merges `metadata` key by key on every update and never deletes a key
//! (api:`pkg/db/drivers/etcd/etcd.go` `UpdateVolume`). A key of ours that no
//! longer applies is therefore written as the empty string, and an empty
//! value reads as absent ([`metadata_value`]).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

use crate::field::FieldError;
use crate::policy::{RepositorySpec, ALLOWED_ENV_PREFIXES};
use crate::retention::Retention;
use crate::schedule::{Schedule, ScheduleSpec, MAX_INTERVAL_SECONDS, MIN_INTERVAL_SECONDS};
use crate::secret::{redact_url, Secret};

/// The tenant the API treats as admin in `noauth` mode (`constants.DefaultTenantId`).
pub const DEFAULT_TENANT_ID: &str = "e93b4c0934da416eb9c8d120c5d04d96";

/// Longest volume name SODA accepts (api:`pkg/api/util/db.go`).
pub const MAX_VOLUME_NAME_LEN: usize = 255;

/// Volume statuses (api:`pkg/model/status.go`).
pub mod status {
    pub const CREATING: &str = "creating";
    pub const AVAILABLE: &str = "available";
    pub const IN_USE: &str = "inUse";
    pub const DELETING: &str = "deleting";
    pub const ERROR: &str = "error";
    pub const ERROR_DELETING: &str = "errorDeleting";
    pub const ERROR_EXTENDING: &str = "errorExtending";
    pub const EXTENDING: &str = "extending";
}

/// The metadata keys the sync writes. Every key starts with [`K8S_PREFIX`]
/// or [`SYNC_PREFIX`]; keys with other prefixes belong to someone else
/// (SODA's drivers write e.g. `lvPath`) and are never touched.
pub mod meta {
    /// Facts about the PersistentVolume.
    pub const K8S_PREFIX: &str = "k8s.";
    /// The sync's own bookkeeping and backup results.
    pub const SYNC_PREFIX: &str = "soda-syncer.";

    /// `"true"` on every volume the sync created and owns (and may delete).
    pub const MANAGED: &str = "soda-syncer.managed";
    /// The PV's uid: how the sync finds its volume again after a restart.
    pub const PV_UID: &str = "soda-syncer.pvUid";
    pub const LAST_BACKUP_TIME: &str = "soda-syncer.lastBackupTime";
    pub const LAST_BACKUP_STATE: &str = "soda-syncer.lastBackupState";
    pub const LAST_SNAPSHOT_ID: &str = "soda-syncer.lastSnapshotId";

    pub const PV_NAME: &str = "k8s.pvName";
    pub const PHASE: &str = "k8s.phase";
    pub const CAPACITY_BYTES: &str = "k8s.capacityBytes";
    pub const CLAIM_NAMESPACE: &str = "k8s.claimNamespace";
    pub const CLAIM_NAME: &str = "k8s.claimName";
    pub const STORAGE_CLASS: &str = "k8s.storageClass";
    pub const CSI_DRIVER: &str = "k8s.csiDriver";
    pub const VOLUME_HANDLE: &str = "k8s.volumeHandle";
    pub const NODE: &str = "k8s.node";
    pub const VOLUME_MODE: &str = "k8s.volumeMode";

    /// True for a key the sync owns (and so may blank).
    pub fn is_ours(key: &str) -> bool {
        key.starts_with(K8S_PREFIX) || key.starts_with(SYNC_PREFIX)
    }
}

// ---------------------------------------------------------------------------
// Wire shapes

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A block volume as the API returns it (`VolumeSpec` with its embedded
/// `BaseModel`). Absent or null fields read as empty.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SodaVolume {
    #[serde(default, deserialize_with = "null_as_default")]
    pub id: String,
    /// `2006-01-02T15:04:05`, the server's local time.
    #[serde(default, deserialize_with = "null_as_default")]
    pub created_at: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub updated_at: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tenant_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub user_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub description: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub group_id: String,
    /// GB (GiB in practice: the drivers allocate `size` GiB).
    #[serde(default, deserialize_with = "null_as_default")]
    pub size: i64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub availability_zone: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub status: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub pool_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub profile_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub snapshot_id: String,
    /// Go's field has no JSON tag, so the key is `AttachStatus`.
    #[serde(rename = "AttachStatus", default, deserialize_with = "null_as_default")]
    pub attach_status: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub multi_attach: bool,
}

/// `POST /block/volumes`. Empty fields are left out, as Go's `omitempty`
/// would; the server fills `availabilityZone` ("default") and, without a
/// `profileId`, the profile named `default_block`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewVolume {
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub size: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_id: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// `PUT /block/volumes/{id}`: only what changes. SODA overwrites a field
/// only when the new value is non-empty and merges `metadata` key by key.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeUpdate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_id: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

impl VolumeUpdate {
    pub fn is_empty(&self) -> bool {
        *self == VolumeUpdate::default()
    }
}

/// What SODA does with a [`VolumeUpdate`] (etcd `UpdateVolume`), without
/// `updatedAt`: non-empty fields overwrite, metadata is merged.
pub fn apply_update(current: &SodaVolume, update: &VolumeUpdate) -> SodaVolume {
    let mut v = current.clone();
    let set = |field: &mut String, new: &Option<String>| {
        if let Some(n) = new.as_ref().filter(|n| !n.is_empty()) {
            *field = n.clone();
        }
    };
    set(&mut v.name, &update.name);
    set(&mut v.description, &update.description);
    set(&mut v.availability_zone, &update.availability_zone);
    set(&mut v.status, &update.status);
    set(&mut v.profile_id, &update.profile_id);
    if let Some(size) = update.size.filter(|s| *s != 0) {
        v.size = size;
    }
    for (k, val) in &update.metadata {
        v.metadata.insert(k.clone(), val.clone());
    }
    v
}

/// A host (`HostSpec`). The API never returns `password`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SodaHost {
    #[serde(default, deserialize_with = "null_as_default")]
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub created_at: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub updated_at: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tenant_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub host_name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub os_type: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub access_mode: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub ip: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub port: i64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub availability_zones: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub initiators: Vec<Initiator>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Initiator {
    #[serde(default, deserialize_with = "null_as_default")]
    pub port_name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub protocol: String,
}

/// `POST /host/hosts` and `PUT /host/hosts/{id}`. Creating needs
/// `hostName` (DNS labels, at most 64), `osType` (linux | windows | esxi),
/// `accessMode` (agent | agentless) and an IPv4 `ip` (the swagger's
/// `HostCreateSpec`). An update overwrites only non-empty fields. No
/// username or password: the sync registers hosts `agentless`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRequest {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub host_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub os_type: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub access_mode: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ip: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub availability_zones: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub initiators: Vec<Initiator>,
}

/// A profile as the API returns it, kept as JSON: `customProperties` is a
/// free map. `Debug` shows only the id and name, because customProperties
/// carry repository passwords and cloud keys.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SodaProfile(pub Value);

impl SodaProfile {
    fn str_field(&self, k: &str) -> &str {
        self.0.get(k).and_then(Value::as_str).unwrap_or("")
    }
    pub fn id(&self) -> &str {
        self.str_field("id")
    }
    pub fn name(&self) -> &str {
        self.str_field("name")
    }
    pub fn storage_type(&self) -> &str {
        self.str_field("storageType")
    }
    pub fn updated_at(&self) -> &str {
        self.str_field("updatedAt")
    }
    pub fn custom_properties(&self) -> Option<&serde_json::Map<String, Value>> {
        self.0.get("customProperties").and_then(Value::as_object)
    }
    pub fn json(&self) -> &Value {
        &self.0
    }
}

impl fmt::Debug for SodaProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SodaProfile").field("id", &self.id()).field("name", &self.name()).finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------
// Kubernetes → SODA

/// A PersistentVolume's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PvPhase {
    Pending,
    Available,
    Bound,
    Released,
    Failed,
}

impl PvPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            PvPhase::Pending => "Pending",
            PvPhase::Available => "Available",
            PvPhase::Bound => "Bound",
            PvPhase::Released => "Released",
            PvPhase::Failed => "Failed",
        }
    }
    /// Kubernetes' spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<PvPhase> {
        [PvPhase::Pending, PvPhase::Available, PvPhase::Bound, PvPhase::Released, PvPhase::Failed]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// The last backup of the volume, as the agent recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupFacts {
    pub time: DateTime<Utc>,
    /// The run state (`succeeded`, `partial`, `failed`, ...).
    pub state: String,
    /// restic's snapshot id; `None` when the run wrote none.
    pub snapshot_id: Option<String>,
}

/// What Kubernetes knows about one PersistentVolume: the input of the sync.
/// `None` and empty strings both mean "no such fact".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvFacts {
    pub pv_name: String,
    pub pv_uid: String,
    pub capacity_bytes: u64,
    pub phase: PvPhase,
    /// A VolumeAttachment says attached, or a running pod uses the claim.
    pub attached: bool,
    pub storage_class: Option<String>,
    /// The SODA profile the StorageClass names (its `profile` parameter or
    /// the `soda-syncer.io/profile` annotation).
    pub soda_profile_id: Option<String>,
    pub csi_driver: Option<String>,
    pub volume_handle: Option<String>,
    pub claim_namespace: Option<String>,
    pub claim_name: Option<String>,
    /// The node of a local volume (from node affinity), or where it is attached.
    pub node: Option<String>,
    /// `Filesystem` or `Block`.
    pub volume_mode: Option<String>,
    /// From the PV's topology (`topology.kubernetes.io/zone`).
    pub availability_zone: Option<String>,
    pub last_backup: Option<BackupFacts>,
}

/// The SODA volume a PV should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredVolume {
    pub name: String,
    pub description: String,
    pub size: i64,
    pub status: &'static str,
    pub profile_id: Option<String>,
    pub availability_zone: Option<String>,
    /// Only keys of ours with non-empty values.
    pub metadata: BTreeMap<String, String>,
}

impl DesiredVolume {
    /// The create request. SODA starts every volume as `creating` whatever
    /// is asked, so the status is set by a later [`volume_update`].
    pub fn create_request(&self) -> NewVolume {
        NewVolume {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.size,
            availability_zone: self.availability_zone.clone(),
            profile_id: self.profile_id.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

/// True when `name` passes SODA's volume name rule: 1 to 255 bytes of
/// `^[a-zA-Z0-9 _-]+$`.
pub fn is_valid_volume_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_VOLUME_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b' ' || b == b'_' || b == b'-')
}

fn fnv64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The SODA volume name for a PV name. A Kubernetes object name uses only
/// `a-z 0-9 - .`, so `.` becomes `_` (a character PV names never contain:
/// distinct PVs keep distinct names, and the name still reads as the PV's).
/// Anything else that SODA refuses, or a name beyond 255 bytes, is replaced
/// or cut and an 8-hex hash of the whole PV name is appended, so the result
/// stays deterministic and distinct.
pub fn volume_name(pv_name: &str) -> String {
    let mut lossy = false;
    let mapped: String = pv_name
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | ' ' => c,
            '.' => '_',
            _ => {
                lossy = true;
                '_'
            }
        })
        .collect();
    if !lossy && !mapped.is_empty() && mapped.len() <= MAX_VOLUME_NAME_LEN {
        return mapped;
    }
    let suffix = format!("-{:08x}", fnv64(pv_name) as u32);
    let keep = MAX_VOLUME_NAME_LEN - suffix.len();
    let base = if mapped.is_empty() { "pv".to_string() } else { mapped.chars().take(keep).collect() };
    format!("{base}{suffix}")
}

/// Bytes to SODA's size unit (GiB), rounded up, at least 1 (SODA refuses 0).
pub fn size_gib(bytes: u64) -> i64 {
    const GIB: u64 = 1 << 30;
    bytes.div_ceil(GIB).max(1) as i64
}

/// The SODA status for a PV:
/// - `Bound` and attached (in use by a pod): `inUse`;
/// - `Bound` or `Available` otherwise: `available`;
/// - `Released` (its claim is gone, the data is kept by a Retain policy):
///   `available`, because the storage is intact and nothing failed;
/// - `Failed` (reclamation failed): `error`;
/// - `Pending` (not provisioned yet): `creating`.
pub fn volume_status(phase: PvPhase, attached: bool) -> &'static str {
    match phase {
        PvPhase::Bound if attached => status::IN_USE,
        PvPhase::Bound | PvPhase::Available | PvPhase::Released => status::AVAILABLE,
        PvPhase::Failed => status::ERROR,
        PvPhase::Pending => status::CREATING,
    }
}

/// SODA-side transient states: the server (its dock) is working on the
/// volume and will change the status itself; the sync does not fight it
/// and looks again later ([`needs_recheck`]).
pub fn is_transient(status: &str) -> bool {
    matches!(status, status::CREATING | status::DELETING | status::EXTENDING)
}

/// True when SODA accepts a DELETE of a volume in this status.
pub fn is_deletable(status: &str) -> bool {
    matches!(status, status::AVAILABLE | status::ERROR | status::ERROR_DELETING | status::ERROR_EXTENDING)
}

/// The desired SODA volume for a PV. Kubernetes wins: every fact here
/// overwrites what SODA holds.
pub fn desired_volume(facts: &PvFacts) -> DesiredVolume {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: Option<&str>| {
        if let Some(v) = v.map(str::trim).filter(|v| !v.is_empty()) {
            m.insert(k.to_string(), v.to_string());
        }
    };
    put(meta::MANAGED, Some("true"));
    put(meta::PV_UID, Some(&facts.pv_uid));
    put(meta::PV_NAME, Some(&facts.pv_name));
    put(meta::PHASE, Some(facts.phase.as_str()));
    put(meta::CAPACITY_BYTES, Some(&facts.capacity_bytes.to_string()));
    put(meta::CLAIM_NAMESPACE, facts.claim_namespace.as_deref());
    put(meta::CLAIM_NAME, facts.claim_name.as_deref());
    put(meta::STORAGE_CLASS, facts.storage_class.as_deref());
    put(meta::CSI_DRIVER, facts.csi_driver.as_deref());
    put(meta::VOLUME_HANDLE, facts.volume_handle.as_deref());
    put(meta::NODE, facts.node.as_deref());
    put(meta::VOLUME_MODE, facts.volume_mode.as_deref());
    if let Some(b) = &facts.last_backup {
        put(meta::LAST_BACKUP_TIME, Some(&b.time.to_rfc3339_opts(SecondsFormat::Secs, true)));
        put(meta::LAST_BACKUP_STATE, Some(&b.state));
        put(meta::LAST_SNAPSHOT_ID, b.snapshot_id.as_deref());
    }
    let nonempty = |o: &Option<String>| o.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_string);
    DesiredVolume {
        name: volume_name(&facts.pv_name),
        description: format!("Kubernetes PersistentVolume {} (mirrored by soda-syncer)", facts.pv_name),
        size: size_gib(facts.capacity_bytes),
        status: volume_status(facts.phase, facts.attached),
        profile_id: nonempty(&facts.soda_profile_id),
        availability_zone: nonempty(&facts.availability_zone),
        metadata: m,
    }
}

/// A metadata value, with the empty string (a blanked key) read as absent.
pub fn metadata_value<'a>(volume: &'a SodaVolume, key: &str) -> Option<&'a str> {
    volume.metadata.get(key).map(String::as_str).filter(|v| !v.is_empty())
}

/// True for a volume the sync created (and so owns).
pub fn is_managed(volume: &SodaVolume) -> bool {
    metadata_value(volume, meta::MANAGED) == Some("true")
}

/// The PV uid a managed volume mirrors.
pub fn managed_pv_uid(volume: &SodaVolume) -> Option<&str> {
    if is_managed(volume) {
        metadata_value(volume, meta::PV_UID)
    } else {
        None
    }
}

/// The managed volumes grouped by PV uid, oldest first in each group
/// (`createdAt`, then id): the first is the one to keep, any others are
/// duplicates (e.g. two agents raced before the lease) to delete.
pub fn managed_by_pv_uid(volumes: &[SodaVolume]) -> BTreeMap<String, Vec<&SodaVolume>> {
    let mut out: BTreeMap<String, Vec<&SodaVolume>> = BTreeMap::new();
    for v in volumes {
        if let Some(uid) = managed_pv_uid(v) {
            out.entry(uid.to_string()).or_default().push(v);
        }
    }
    for group in out.values_mut() {
        group.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    }
    out
}

/// The update that brings `current` to `desired`, or `None` when nothing
/// differs (applying the result and diffing again gives `None`).
/// - Fields: name, description, size, availability zone and profile are
///   overwritten when they differ; a desired `None` leaves SODA's value.
/// - Status: set unless SODA is mid-operation ([`is_transient`]).
/// - Metadata: keys of ours with a new or changed value are sent; keys of
///   ours that are set on the volume but no longer desired are sent as `""`
///   (SODA cannot delete a key); keys of others are left alone.
pub fn volume_update(current: &SodaVolume, desired: &DesiredVolume) -> Option<VolumeUpdate> {
    let differs = |cur: &str, want: &str| (cur != want).then(|| want.to_string());
    let mut u = VolumeUpdate {
        name: differs(&current.name, &desired.name),
        description: differs(&current.description, &desired.description),
        size: (current.size != desired.size).then_some(desired.size),
        availability_zone: desired.availability_zone.as_deref().and_then(|z| differs(&current.availability_zone, z)),
        status: None,
        profile_id: desired.profile_id.as_deref().and_then(|p| differs(&current.profile_id, p)),
        metadata: BTreeMap::new(),
    };
    if !is_transient(&current.status) {
        u.status = differs(&current.status, desired.status);
    }
    for (k, v) in &desired.metadata {
        if current.metadata.get(k) != Some(v) {
            u.metadata.insert(k.clone(), v.clone());
        }
    }
    for (k, v) in &current.metadata {
        if meta::is_ours(k) && !v.is_empty() && !desired.metadata.contains_key(k) {
            u.metadata.insert(k.clone(), String::new());
        }
    }
    (!u.is_empty()).then_some(u)
}

/// True when the volume is in a SODA-side transient state, so the sync
/// should look at it again shortly to finish what [`volume_update`] held back.
pub fn needs_recheck(current: &SodaVolume) -> bool {
    is_transient(&current.status)
}

/// Before deleting a volume whose PV is gone: SODA refuses to delete a
/// volume that is not `available`/`error*`, so an `inUse` one is first set
/// `available`. `None`: delete right away (or wait, if transient).
pub fn delete_preparation(current: &SodaVolume) -> Option<VolumeUpdate> {
    (!is_deletable(&current.status) && !is_transient(&current.status))
        .then(|| VolumeUpdate { status: Some(status::AVAILABLE.into()), ..Default::default() })
}

// ---------------------------------------------------------------------------
// SODA profile → policy

/// The backup settings a SODA profile asks for. SODA wins for policy: these
/// replace whatever the claim's annotations say for the same fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfilePolicy {
    pub profile_id: String,
    pub profile_name: String,
    /// `RESTIC_REPOSITORY`, `RESTIC_PASSWORD` and the storage keys
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and any other key with
    /// a prefix restic reads). No `RESTIC_REPOSITORY`: the agent's default
    /// repository (empty spec).
    pub repository: RepositorySpec,
    /// `None`: the profile sets no schedule; the caller keeps its default.
    pub schedule: Option<ScheduleSpec>,
    /// From `snapshotProperties.retention`; empty keeps everything.
    pub retention: Retention,
    /// `customProperties.driver` (soda-csi-provisioner compares it with
    /// the CSI driver's name).
    pub driver: Option<String>,
    /// `customProperties.appendOnly` ("true"/"false"): the profile's
    /// repository keys cannot delete (see "Immutable backups").
    pub append_only: bool,
}

fn perr(profile: &SodaProfile, field: &str, message: impl fmt::Display) -> FieldError {
    FieldError::new(field, format!("SODA profile {:?} ({}): {message}", profile.name(), profile.id()))
}

/// A customProperties value as a string: strings as they are, numbers and
/// booleans printed (the proxy used Go's `%v`); empty means absent.
fn custom_string(profile: &SodaProfile, key: &str) -> Result<Option<String>, FieldError> {
    let Some(v) = profile.custom_properties().and_then(|c| c.get(key)) else {
        return Ok(None);
    };
    let s = match v {
        Value::Null => return Ok(None),
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        // Never print the value: it may be a key.
        _ => {
            return Err(perr(profile, &format!("customProperties.{key}"), "must be a string, not an object or a list"))
        }
    };
    Ok((!s.is_empty()).then_some(s))
}

/// A whole number from JSON (an integer, an integral float, or a string of
/// digits).
fn whole_number(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => {
            n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64))
        }
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn time_interval(profile: &SodaProfile) -> Result<Option<u64>, FieldError> {
    let custom = profile.custom_properties();
    // The proxy reads `TimeInterval`; the syncer's own body calls it `timeInterval`.
    let Some((key, v)) = ["TimeInterval", "timeInterval"]
        .into_iter()
        .find_map(|k| custom.and_then(|c| c.get(k)).filter(|v| !v.is_null()).map(|v| (k, v)))
    else {
        return Ok(None);
    };
    let field = format!("customProperties.{key}");
    if v.as_str().is_some_and(|s| s.trim().is_empty()) {
        return Ok(None);
    }
    let secs =
        whole_number(v).ok_or_else(|| perr(profile, &field, format!("must be a whole number of seconds; got {v}")))?;
    if !(MIN_INTERVAL_SECONDS as i64..=MAX_INTERVAL_SECONDS as i64).contains(&secs) {
        return Err(perr(
            profile,
            &field,
            format!("must be between {MIN_INTERVAL_SECONDS} and {MAX_INTERVAL_SECONDS} seconds (31 days); got {secs}"),
        ));
    }
    Ok(Some(secs as u64))
}

/// `snapshotProperties.schedule` as a UTC cron schedule. `datetime` is the
/// first run (RFC 3339, or without a zone as the dashboard sends it, read
/// as UTC; seconds are dropped); `occurrence` repeats it:
/// - `Daily`: every day at that time;
/// - `Weekly`: every week on that weekday at that time;
/// - `Monthly`: every month on that day at that time; days 29 to 31 become
///   the month's last day, so short months are not skipped.
fn snapshot_schedule(profile: &SodaProfile) -> Result<Option<ScheduleSpec>, FieldError> {
    let sched = profile.0.pointer("/snapshotProperties/schedule");
    let text = |k: &str| sched.and_then(|s| s.get(k)).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty());
    let (datetime, occurrence) = (text("datetime"), text("occurrence"));
    let (datetime, occurrence) = match (datetime, occurrence) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(perr(
                profile,
                "snapshotProperties.schedule.occurrence",
                "is required with a datetime: Daily, Weekly or Monthly",
            ))
        }
        (None, Some(_)) => {
            return Err(perr(
                profile,
                "snapshotProperties.schedule.datetime",
                "is required with an occurrence: the time of the first run, e.g. \"2019-09-07T07:02:35\"",
            ))
        }
        (Some(d), Some(o)) => (d, o),
    };
    let at = parse_datetime(datetime).ok_or_else(|| {
        perr(
            profile,
            "snapshotProperties.schedule.datetime",
            format!("{datetime:?} is not a date and time such as \"2019-09-07T07:02:35\" or \"2008-09-15T15:53:00Z\""),
        )
    })?;
    use chrono::{Datelike, Timelike};
    let (minute, hour) = (at.minute(), at.hour());
    let cron = match occurrence.to_ascii_lowercase().as_str() {
        "daily" => format!("{minute} {hour} * * *"),
        "weekly" => format!("{minute} {hour} * * {}", at.weekday().num_days_from_sunday()),
        "monthly" => {
            let day = at.day();
            if day > 28 {
                format!("{minute} {hour} L * *")
            } else {
                format!("{minute} {hour} {day} * *")
            }
        }
        _ => {
            return Err(perr(
                profile,
                "snapshotProperties.schedule.occurrence",
                format!("{occurrence:?} is not one of Daily, Weekly, Monthly"),
            ))
        }
    };
    let spec = ScheduleSpec { cron: Some(cron), ..Default::default() };
    Schedule::parse(&spec).map_err(|e| perr(profile, "snapshotProperties.schedule", e.message))?;
    Ok(Some(spec))
}

fn parse_datetime(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc());
        }
    }
    None
}

fn retention(profile: &SodaProfile) -> Result<Retention, FieldError> {
    let mut r = Retention::default();
    let get = |k: &str| profile.0.pointer(&format!("/snapshotProperties/retention/{k}")).filter(|v| !v.is_null());
    if let Some(v) = get("number") {
        let field = "snapshotProperties.retention.number";
        let n = whole_number(v).ok_or_else(|| perr(profile, field, format!("must be a whole number; got {v}")))?;
        if !(0..=crate::retention::MAX_KEEP as i64).contains(&n) {
            return Err(perr(profile, field, format!("must be between 0 and {}; got {n}", crate::retention::MAX_KEEP)));
        }
        r.keep_last = (n > 0).then_some(n as u32);
    }
    if let Some(v) = get("duration") {
        let field = "snapshotProperties.retention.duration";
        let days =
            whole_number(v).ok_or_else(|| perr(profile, field, format!("must be a whole number of days; got {v}")))?;
        if !(0..=365_000).contains(&days) {
            return Err(perr(profile, field, format!("must be between 0 and 365000 days; got {days}")));
        }
        r.keep_within = (days > 0).then(|| format!("{days}d"));
    }
    r.validate().map_err(|e| perr(profile, "snapshotProperties.retention", e.message))?;
    Ok(r)
}

fn repository(profile: &SodaProfile) -> Result<RepositorySpec, FieldError> {
    let url = custom_string(profile, "RESTIC_REPOSITORY")?;
    let password = custom_string(profile, "RESTIC_PASSWORD")?.map(Secret::new);
    let Some(url) = url else {
        // The agent's default repository, with its own password and no keys.
        return Ok(RepositorySpec::default());
    };
    if url.starts_with('-') || url.contains(['\n', '\r']) {
        return Err(perr(
            profile,
            "customProperties.RESTIC_REPOSITORY",
            format!("{:?} is not a restic repository URL", redact_url(&url)),
        ));
    }
    let Some(password) = password else {
        return Err(perr(profile, "customProperties.RESTIC_PASSWORD", "is required with RESTIC_REPOSITORY"));
    };
    let mut env = BTreeMap::new();
    if let Some(custom) = profile.custom_properties() {
        for key in custom.keys() {
            let well_formed = key.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if well_formed && ALLOWED_ENV_PREFIXES.iter().any(|p| key.starts_with(p)) {
                if let Some(v) = custom_string(profile, key)? {
                    env.insert(key.clone(), Some(Secret::new(v)));
                }
            }
        }
    }
    Ok(RepositorySpec { url: Some(url), password: Some(password), env, ..Default::default() })
}

/// The policy settings a profile asks for. The schedule comes from
/// `customProperties.TimeInterval` (seconds, a number or a numeric string)
/// when set, else from `snapshotProperties.schedule`; retention from
/// `snapshotProperties.retention` (`number` → keepLast, `duration` days →
/// keepWithin). An error names the profile field at fault and never shows a
/// secret.
pub fn profile_policy(profile: &SodaProfile) -> Result<ProfilePolicy, FieldError> {
    if !profile.0.is_object() {
        return Err(FieldError::new("profile", "a SODA profile must be a JSON object"));
    }
    let schedule = match time_interval(profile)? {
        Some(secs) => Some(ScheduleSpec { interval_seconds: Some(secs), ..Default::default() }),
        None => snapshot_schedule(profile)?,
    };
    Ok(ProfilePolicy {
        profile_id: profile.id().to_string(),
        profile_name: profile.name().to_string(),
        repository: repository(profile)?,
        schedule,
        retention: retention(profile)?,
        driver: custom_string(profile, "driver")?,
        append_only: match custom_string(profile, "appendOnly")?.as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(_) => return Err(perr(profile, "customProperties.appendOnly", "must be true or false")),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn facts() -> PvFacts {
        PvFacts {
            pv_name: "pvc-0a1b2c3d-4e5f-6789-abcd-ef0123456789".into(),
            pv_uid: "6b0a2d3c-1111-2222-3333-444455556666".into(),
            capacity_bytes: 5 * (1 << 30) + 1,
            phase: PvPhase::Bound,
            attached: true,
            storage_class: Some("soda-local".into()),
            soda_profile_id: Some("prof-1".into()),
            csi_driver: Some("local.csi.openebs.io".into()),
            volume_handle: Some("vol-77".into()),
            claim_namespace: Some("shop".into()),
            claim_name: Some("orders-db".into()),
            node: Some("node-a".into()),
            volume_mode: Some("Filesystem".into()),
            availability_zone: Some("zone-1".into()),
            last_backup: Some(BackupFacts {
                time: DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z").unwrap().with_timezone(&Utc),
                state: "succeeded".into(),
                snapshot_id: Some("1a2b3c4d".into()),
            }),
        }
    }

    /// The volume SODA holds right after creating `desired` (status
    /// `creating`, default zone, dock not done yet).
    fn created(desired: &DesiredVolume) -> SodaVolume {
        let r = desired.create_request();
        SodaVolume {
            id: "v1".into(),
            name: r.name,
            description: r.description,
            size: r.size,
            availability_zone: r.availability_zone.unwrap_or_else(|| "default".into()),
            status: status::CREATING.into(),
            profile_id: r.profile_id.unwrap_or_else(|| "default-profile".into()),
            metadata: r.metadata,
            ..Default::default()
        }
    }

    #[test]
    fn pv_names_become_valid_soda_names_that_still_read_as_the_pv() {
        assert_eq!(volume_name("pvc-0a1b2c3d-4e5f"), "pvc-0a1b2c3d-4e5f");
        assert_eq!(volume_name("local-pv.node-a.disk1"), "local-pv_node-a_disk1");
        let weird = volume_name("pv/with:odd@chars");
        assert!(is_valid_volume_name(&weird), "{weird}");
        assert!(weird.starts_with("pv_with_odd_chars-"), "{weird}");
        assert_ne!(volume_name("a/b"), volume_name("a:b"), "lossy names are told apart by the hash");
        let long = "x".repeat(300);
        assert_eq!(volume_name(&long).len(), MAX_VOLUME_NAME_LEN);
        assert!(is_valid_volume_name(&volume_name("")));
        assert_eq!(volume_name(&long), volume_name(&long), "deterministic");
    }

    #[test]
    fn the_name_rule_matches_sodas_regex_and_length() {
        assert!(is_valid_volume_name("a b_c-D9"));
        assert!(!is_valid_volume_name(""));
        assert!(!is_valid_volume_name("a.b"));
        assert!(!is_valid_volume_name("é"));
        assert!(is_valid_volume_name(&"a".repeat(255)));
        assert!(!is_valid_volume_name(&"a".repeat(256)));
    }

    #[test]
    fn sizes_round_up_to_whole_gib_and_never_to_zero() {
        assert_eq!(size_gib(0), 1);
        assert_eq!(size_gib(1), 1);
        assert_eq!(size_gib(1 << 30), 1);
        assert_eq!(size_gib((1 << 30) + 1), 2);
        assert_eq!(size_gib(10 * 1_000_000_000), 10); // 10 GB is 9.31 GiB
        assert_eq!(size_gib(u64::MAX), (u64::MAX / (1 << 30) + 1) as i64);
    }

    #[test]
    fn statuses_follow_phase_and_attachment() {
        assert_eq!(volume_status(PvPhase::Bound, true), "inUse");
        assert_eq!(volume_status(PvPhase::Bound, false), "available");
        assert_eq!(volume_status(PvPhase::Available, false), "available");
        assert_eq!(volume_status(PvPhase::Released, false), "available");
        assert_eq!(volume_status(PvPhase::Failed, false), "error");
        assert_eq!(volume_status(PvPhase::Pending, false), "creating");
        assert_eq!(PvPhase::parse("Released"), Some(PvPhase::Released));
        assert_eq!(PvPhase::parse("bound"), None);
    }

    #[test]
    fn desired_volume_carries_the_kubernetes_facts_and_the_marker() {
        let d = desired_volume(&facts());
        assert_eq!(d.name, "pvc-0a1b2c3d-4e5f-6789-abcd-ef0123456789");
        assert_eq!(d.size, 6);
        assert_eq!(d.status, "inUse");
        assert_eq!(d.profile_id.as_deref(), Some("prof-1"));
        assert_eq!(d.availability_zone.as_deref(), Some("zone-1"));
        let m = &d.metadata;
        assert_eq!(m[meta::MANAGED], "true");
        assert_eq!(m[meta::PV_UID], "6b0a2d3c-1111-2222-3333-444455556666");
        assert_eq!(m[meta::CLAIM_NAMESPACE], "shop");
        assert_eq!(m[meta::CLAIM_NAME], "orders-db");
        assert_eq!(m[meta::STORAGE_CLASS], "soda-local");
        assert_eq!(m[meta::CSI_DRIVER], "local.csi.openebs.io");
        assert_eq!(m[meta::VOLUME_HANDLE], "vol-77");
        assert_eq!(m[meta::NODE], "node-a");
        assert_eq!(m[meta::VOLUME_MODE], "Filesystem");
        assert_eq!(m[meta::LAST_BACKUP_TIME], "2026-03-01T10:00:00Z");
        assert_eq!(m[meta::LAST_BACKUP_STATE], "succeeded");
        assert_eq!(m[meta::LAST_SNAPSHOT_ID], "1a2b3c4d");
        assert!(m.keys().all(|k| meta::is_ours(k)));
        assert!(m.values().all(|v| !v.is_empty()));
        let create = serde_json::to_value(d.create_request()).unwrap();
        assert_eq!(create["size"], 6);
        assert!(create.get("status").is_none(), "SODA ignores a status on create");
    }

    #[test]
    fn a_fresh_volume_is_not_pushed_while_soda_is_creating_it() {
        let d = desired_volume(&facts());
        let mut v = created(&d);
        assert_eq!(volume_update(&v, &d), None, "only the status differs, and SODA owns it while creating");
        assert!(needs_recheck(&v));
        v.status = status::AVAILABLE.into();
        v.pool_id = "pool-1".into();
        let u = volume_update(&v, &d).unwrap();
        assert_eq!(u, VolumeUpdate { status: Some("inUse".into()), ..Default::default() });
        assert_eq!(volume_update(&apply_update(&v, &u), &d), None);
    }

    #[test]
    fn a_removed_fact_is_blanked_and_reads_as_absent_and_others_keys_stay() {
        let d = desired_volume(&facts());
        let mut v = created(&d);
        v.status = "inUse".into();
        v.metadata.insert("lvPath".into(), "/dev/vg/lv".into());
        let mut f = facts();
        f.phase = PvPhase::Released;
        f.attached = false;
        f.claim_namespace = None;
        f.claim_name = None;
        let d2 = desired_volume(&f);
        let u = volume_update(&v, &d2).unwrap();
        assert_eq!(u.status.as_deref(), Some("available"));
        assert_eq!(u.metadata[meta::CLAIM_NAMESPACE], "");
        assert_eq!(u.metadata[meta::CLAIM_NAME], "");
        assert_eq!(u.metadata[meta::PHASE], "Released");
        assert!(!u.metadata.contains_key("lvPath"));
        let body = serde_json::to_value(&u).unwrap();
        assert!(body.get("name").is_none() && body.get("size").is_none(), "unchanged fields are not sent: {body}");
        let after = apply_update(&v, &u);
        assert_eq!(after.metadata["lvPath"], "/dev/vg/lv");
        assert_eq!(metadata_value(&after, meta::CLAIM_NAME), None);
        assert!(after.metadata.contains_key(meta::CLAIM_NAME), "SODA keeps the key");
        assert_eq!(volume_update(&after, &d2), None, "a blanked key is not blanked again");
        // The claim comes back: the key is set again.
        let u3 = volume_update(&after, &d).unwrap();
        assert_eq!(u3.metadata[meta::CLAIM_NAME], "orders-db");
    }

    #[test]
    fn a_backup_updates_only_the_backup_keys() {
        let d = desired_volume(&facts());
        let mut v = apply_update(&created(&d), &VolumeUpdate { status: Some("inUse".into()), ..Default::default() });
        v.status = "inUse".into();
        let mut f = facts();
        f.last_backup = Some(BackupFacts {
            time: DateTime::parse_from_rfc3339("2026-03-01T11:00:00+01:00").unwrap().with_timezone(&Utc),
            state: "failed".into(),
            snapshot_id: None,
        });
        let u = volume_update(&v, &desired_volume(&f)).unwrap();
        let keys: Vec<_> = u.metadata.keys().map(String::as_str).collect();
        assert_eq!(keys, [meta::LAST_BACKUP_STATE, meta::LAST_SNAPSHOT_ID]);
        assert_eq!(u.metadata[meta::LAST_SNAPSHOT_ID], "", "a failed run has no snapshot: the old id is blanked");
        assert_eq!(u.metadata[meta::LAST_BACKUP_STATE], "failed");
        assert_eq!(u.status, None);
    }

    #[test]
    fn profile_and_zone_are_never_cleared_from_soda() {
        let d = desired_volume(&facts());
        let v = apply_update(&created(&d), &VolumeUpdate { status: Some("inUse".into()), ..Default::default() });
        let mut f = facts();
        f.soda_profile_id = None;
        f.availability_zone = None;
        assert_eq!(volume_update(&v, &desired_volume(&f)), None);
    }

    #[test]
    fn deleting_an_in_use_volume_first_makes_it_available() {
        let mut v = SodaVolume { status: "inUse".into(), ..Default::default() };
        assert_eq!(delete_preparation(&v).unwrap().status.as_deref(), Some("available"));
        v.status = "available".into();
        assert_eq!(delete_preparation(&v), None);
        v.status = "creating".into();
        assert_eq!(delete_preparation(&v), None);
        assert!(!is_deletable("creating"));
    }

    #[test]
    fn managed_volumes_are_found_by_uid_and_duplicates_sorted_oldest_first() {
        let mk = |id: &str, at: &str, uid: Option<&str>, managed: &str| {
            let mut m = BTreeMap::new();
            m.insert(meta::MANAGED.to_string(), managed.to_string());
            if let Some(u) = uid {
                m.insert(meta::PV_UID.to_string(), u.to_string());
            }
            SodaVolume { id: id.into(), created_at: at.into(), metadata: m, ..Default::default() }
        };
        let vols = vec![
            mk("b", "2026-01-02T00:00:00", Some("u1"), "true"),
            mk("a", "2026-01-01T00:00:00", Some("u1"), "true"),
            mk("c", "2026-01-01T00:00:00", Some("u2"), "true"),
            mk("d", "2026-01-01T00:00:00", Some("u3"), ""),
            mk("e", "2026-01-01T00:00:00", None, "true"),
        ];
        let by = managed_by_pv_uid(&vols);
        assert_eq!(by.len(), 2);
        assert_eq!(by["u1"].iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(by["u2"][0].id, "c");
    }

    #[test]
    fn volumes_parse_from_sodas_json_including_attach_status_and_nulls() {
        let v: SodaVolume = serde_json::from_value(json!({
            "id": "x", "createdAt": "2026-01-01T00:00:00", "updatedAt": "", "name": "n", "size": 3,
            "status": "available", "metadata": null, "AttachStatus": "attached", "extra": 1
        }))
        .unwrap();
        assert_eq!(v.attach_status, "attached");
        assert!(v.metadata.is_empty());
        let back = serde_json::to_value(&v).unwrap();
        assert_eq!(back["AttachStatus"], "attached");
    }

    fn profile(custom: Value, snapshot: Value) -> SodaProfile {
        SodaProfile(json!({
            "id": "p-1", "name": "gold", "storageType": "block",
            "customProperties": custom, "snapshotProperties": snapshot,
        }))
    }

    #[test]
    fn a_profile_gives_repository_keys_interval_and_retention() {
        let p = profile(
            json!({
                "driver": "local.csi.openebs.io",
                "RESTIC_REPOSITORY": "s3:http://127.0.0.1:9000/bucket",
                "RESTIC_PASSWORD": "pw-secret",
                "AWS_ACCESS_KEY_ID": "AKIA1",
                "AWS_SECRET_ACCESS_KEY": "sk-secret",
                "TimeInterval": 600,
                "capabilities:compression": true,
            }),
            json!({"schedule": {}, "retention": {"number": 10, "duration": 60}, "topology": {}}),
        );
        let pp = profile_policy(&p).unwrap();
        assert_eq!(pp.profile_id, "p-1");
        assert_eq!(pp.repository.url.as_deref(), Some("s3:http://127.0.0.1:9000/bucket"));
        assert_eq!(pp.repository.password.as_ref().unwrap().expose(), "pw-secret");
        let env: Vec<_> = pp.repository.env.keys().map(String::as_str).collect();
        assert_eq!(env, ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]);
        assert_eq!(pp.schedule, Some(ScheduleSpec { interval_seconds: Some(600), ..Default::default() }));
        assert_eq!(pp.retention.keep_last, Some(10));
        assert_eq!(pp.retention.keep_within.as_deref(), Some("60d"));
        assert_eq!(pp.driver.as_deref(), Some("local.csi.openebs.io"));
        let shown = format!("{pp:?} {p:?}");
        assert!(!shown.contains("pw-secret") && !shown.contains("sk-secret"), "{shown}");
    }

    #[test]
    fn time_interval_may_be_a_numeric_string_and_is_range_checked() {
        let p = profile(json!({"TimeInterval": " 3600 "}), json!({}));
        assert_eq!(profile_policy(&p).unwrap().schedule.unwrap().interval_seconds, Some(3600));
        let p = profile(json!({"timeInterval": 90.0}), json!({}));
        assert_eq!(profile_policy(&p).unwrap().schedule.unwrap().interval_seconds, Some(90));
        for bad in [json!(0), json!(-5), json!(MAX_INTERVAL_SECONDS + 1), json!("soon"), json!(1.5), json!([1])] {
            let e = profile_policy(&profile(json!({"TimeInterval": bad}), json!({}))).unwrap_err();
            assert_eq!(e.field, "customProperties.TimeInterval", "{bad}");
            assert!(e.message.contains("\"gold\""), "{}", e.message);
        }
    }

    #[test]
    fn time_interval_wins_over_the_snapshot_schedule() {
        let p = profile(
            json!({"TimeInterval": 60}),
            json!({"schedule": {"datetime": "2019-09-07T07:02:35.389", "occurrence": "Daily"}}),
        );
        assert_eq!(profile_policy(&p).unwrap().schedule.unwrap().interval_seconds, Some(60));
    }

    #[test]
    fn snapshot_schedules_become_utc_cron_lines() {
        let cron = |dt: &str, occ: &str| {
            let p = profile(json!({}), json!({"schedule": {"datetime": dt, "occurrence": occ}}));
            let s = profile_policy(&p).unwrap().schedule.unwrap();
            assert_eq!(s.interval_seconds, None);
            assert_eq!(s.timezone, None);
            s.cron.unwrap()
        };
        assert_eq!(cron("2019-09-07T07:02:35.389", "Daily"), "2 7 * * *");
        // 2008-09-15 was a Monday.
        assert_eq!(cron("2008-09-15T15:53:00.000Z", "Weekly"), "53 15 * * 1");
        assert_eq!(cron("2026-01-31T02:00:00+02:00", "monthly"), "0 0 L * *");
        assert_eq!(cron("2026-01-15T02:30:00", "MONTHLY"), "30 2 15 * *");
        // The last-day rule really fires in February.
        let s = Schedule::parse(&ScheduleSpec { cron: Some("0 0 L * *".into()), ..Default::default() }).unwrap();
        let feb = DateTime::parse_from_rfc3339("2026-02-10T00:00:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(s.fire_after(feb).unwrap().to_rfc3339(), "2026-02-28T00:00:00+00:00");
    }

    #[test]
    fn broken_snapshot_schedules_name_the_field() {
        let field = |sched: Value| profile_policy(&profile(json!({}), json!({ "schedule": sched }))).unwrap_err().field;
        assert_eq!(field(json!({"datetime": "2019-09-07T07:02:35"})), "snapshotProperties.schedule.occurrence");
        assert_eq!(field(json!({"occurrence": "Daily"})), "snapshotProperties.schedule.datetime");
        assert_eq!(
            field(json!({"datetime": "yesterday", "occurrence": "Daily"})),
            "snapshotProperties.schedule.datetime"
        );
        assert_eq!(
            field(json!({"datetime": "2019-09-07T07:02:35", "occurrence": "Hourly"})),
            "snapshotProperties.schedule.occurrence"
        );
    }

    #[test]
    fn no_schedule_and_no_repository_mean_the_agents_defaults() {
        let pp = profile_policy(&SodaProfile(json!({"id": "p", "name": "plain"}))).unwrap();
        assert_eq!(pp.schedule, None);
        assert_eq!(pp.repository, RepositorySpec::default());
        assert!(pp.retention.keeps_everything());
    }

    #[test]
    fn repository_problems_name_the_field_without_showing_secrets() {
        let e = profile_policy(&profile(json!({"RESTIC_REPOSITORY": "s3:h/b"}), json!({}))).unwrap_err();
        assert_eq!(e.field, "customProperties.RESTIC_PASSWORD");
        let e = profile_policy(&profile(
            json!({"RESTIC_REPOSITORY": "s3:h/b", "RESTIC_PASSWORD": {"x": "hunter2"}}),
            json!({}),
        ))
        .unwrap_err();
        assert_eq!(e.field, "customProperties.RESTIC_PASSWORD");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = profile_policy(&profile(
            json!({"RESTIC_REPOSITORY": "-o rest:http://u:hunter2@h/", "RESTIC_PASSWORD": "x"}),
            json!({}),
        ))
        .unwrap_err();
        assert_eq!(e.field, "customProperties.RESTIC_REPOSITORY");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn retention_values_are_checked() {
        let field = |ret: Value| profile_policy(&profile(json!({}), json!({ "retention": ret }))).unwrap_err().field;
        assert_eq!(field(json!({"number": -1})), "snapshotProperties.retention.number");
        assert_eq!(field(json!({"number": "many"})), "snapshotProperties.retention.number");
        assert_eq!(field(json!({"duration": 1_000_000})), "snapshotProperties.retention.duration");
        let pp = profile_policy(&profile(json!({}), json!({"retention": {"number": 0, "duration": 0}}))).unwrap();
        assert!(pp.retention.keeps_everything(), "0 is Go's empty value: no rule");
    }

    fn arb_volume() -> impl Strategy<Value = SodaVolume> {
        let keys = prop::sample::select(vec![
            meta::CLAIM_NAME,
            meta::NODE,
            meta::LAST_SNAPSHOT_ID,
            meta::PHASE,
            "lvPath",
            "CSIVolumeMode",
        ]);
        (
            prop::collection::btree_map(keys.prop_map(String::from), "[a-z]{0,3}", 0..6),
            prop::sample::select(vec!["available", "inUse", "creating", "error"]),
            0i64..10,
        )
            .prop_map(|(metadata, status, size)| SodaVolume {
                id: "v".into(),
                name: "old".into(),
                status: status.into(),
                size,
                metadata,
                ..Default::default()
            })
    }

    proptest! {
        #[test]
        fn soda_names_are_always_valid(name in ".{0,300}") {
            let n = volume_name(&name);
            prop_assert!(is_valid_volume_name(&n), "{:?} -> {:?}", name, n);
            prop_assert_eq!(n, volume_name(&name));
        }

        #[test]
        fn distinct_kubernetes_names_give_distinct_soda_names(a in "[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?", b in "[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?") {
            prop_assume!(a != b);
            prop_assert_ne!(volume_name(&a), volume_name(&b));
        }

        #[test]
        fn one_update_reaches_the_desired_state_and_a_second_diff_is_empty(
            current in arb_volume(),
            claim in proptest::option::of("[a-z]{1,5}"),
            node in proptest::option::of("[a-z]{1,5}"),
            attached in any::<bool>(),
        ) {
            let mut f = facts();
            f.claim_name = claim;
            f.node = node;
            f.attached = attached;
            let d = desired_volume(&f);
            let after = match volume_update(&current, &d) {
                Some(u) => apply_update(&current, &u),
                None => current.clone(),
            };
            prop_assert_eq!(volume_update(&after, &d), None);
            for (k, v) in &d.metadata {
                prop_assert_eq!(metadata_value(&after, k), Some(v.as_str()));
            }
            for (k, v) in &after.metadata {
                if meta::is_ours(k) && !d.metadata.contains_key(k) {
                    prop_assert_eq!(v, "");
                }
                if !meta::is_ours(k) {
                    prop_assert_eq!(Some(v), current.metadata.get(k));
                }
            }
            if !is_transient(&current.status) {
                prop_assert_eq!(after.status.as_str(), d.status);
            }
        }
    }
}
