//! Key layout and record encodings.
//!
//! Everything lives in one ordered keyspace:
//!
//! ```text
//! M format                                   -> format version (u32 BE)
//! T <tenant>                                 -> tenant record
//! D <tenant> r <type> <id>                   -> current pointer
//! D <tenant> v <type> <id> <version u64 BE>  -> version record (JSON bytes)
//! D <tenant> c <seq u64 BE>                  -> change-log record
//! D <tenant> h <type> <seq u64 BE>           -> change-log record (type history index)
//! D <tenant> i <type> <value> <sys> <id>     -> id (identifier index; <sys> = 00 | 01 <system>)
//! D <tenant> a <micros u64 BE> <nonce u64 BE> -> audit record (JSON bytes; append-only)
//! D <tenant> p <patient> <micros u64 BE> <nonce u64 BE> -> empty (audit records by patient)
//! ```
//!
//! Every variable-length string (`<tenant>`, `<type>`, `<id>`, `<value>`, `<system>`) is
//! escaped: byte `00` becomes `00 FF` and the string ends with `00 01`. That keeps bytewise order,
//! works for any bytes (identifier systems and values may contain `\0` or `|`), and makes every
//! encoded string prefix-free — so `D <tenant>` of one tenant is never a prefix of another
//! tenant's, and a prefix scan for one identifier value never sees a longer value.
//! Integers are big-endian so that numeric order is key order.

use fhir_core::{ResourceId, ResourceType, TenantId, VersionId};

use crate::error::StoreError;
use crate::types::Method;

/// Current on-disk format version.
pub(crate) const FORMAT_VERSION: u32 = 1;

pub(crate) const FORMAT_KEY: &[u8] = b"Mformat";
const TENANT_TAG: u8 = b'T';
const DATA_TAG: u8 = b'D';

/// Appends `s` escaped and terminated (see module docs).
pub(crate) fn push_str(out: &mut Vec<u8>, s: &[u8]) {
    for &b in s {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0, 1]);
}

/// Reads one escaped string from the front of `b`; returns it and the rest.
fn read_str(b: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == 0 {
            match b.get(i + 1)? {
                0xFF => out.push(0),
                1 => return Some((out, &b[i + 2..])),
                _ => return None,
            }
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    None
}

/// The tenant id of a tenant record key.
pub(crate) fn tenant_id_of_key(key: &[u8]) -> Result<TenantId, StoreError> {
    key.strip_prefix(&[TENANT_TAG])
        .and_then(read_str)
        .filter(|(_, rest)| rest.is_empty())
        .and_then(|(id, _)| String::from_utf8(id).ok())
        .and_then(|id| TenantId::new(&id).ok())
        .ok_or_else(|| StoreError::Corrupt("malformed tenant key".into()))
}

/// The tenant record key.
pub(crate) fn tenant_key(t: &TenantId) -> Vec<u8> {
    let mut k = vec![TENANT_TAG];
    push_str(&mut k, t.as_str().as_bytes());
    k
}

/// The prefix of all tenant records.
pub(crate) fn tenants_prefix() -> Vec<u8> {
    vec![TENANT_TAG]
}

/// The prefix under which every data key of tenant `t` lives.
pub(crate) fn tenant_prefix(t: &TenantId) -> Vec<u8> {
    let mut k = vec![DATA_TAG];
    push_str(&mut k, t.as_str().as_bytes());
    k
}

fn sub(t: &TenantId, tag: u8) -> Vec<u8> {
    let mut k = tenant_prefix(t);
    k.push(tag);
    k
}

/// Prefix of a tenant's audit records (`D <t> a`).
pub(crate) fn audit_prefix(t: &TenantId) -> Vec<u8> {
    sub(t, b'a')
}

/// Prefix of a tenant's audit records about one patient (`D <t> p <patient>`).
pub(crate) fn audit_patient_prefix(t: &TenantId, patient: &str) -> Vec<u8> {
    let mut k = sub(t, b'p');
    push_str(&mut k, patient.as_bytes());
    k
}

/// Current pointer of one resource.
pub(crate) fn current_key(t: &TenantId, ty: ResourceType, id: &ResourceId) -> Vec<u8> {
    let mut k = sub(t, b'r');
    push_str(&mut k, ty.as_str().as_bytes());
    push_str(&mut k, id.as_str().as_bytes());
    k
}

/// Prefix of all versions of one resource.
pub(crate) fn versions_prefix(t: &TenantId, ty: ResourceType, id: &ResourceId) -> Vec<u8> {
    let mut k = sub(t, b'v');
    push_str(&mut k, ty.as_str().as_bytes());
    push_str(&mut k, id.as_str().as_bytes());
    k
}

/// One version of one resource.
pub(crate) fn version_key(
    t: &TenantId,
    ty: ResourceType,
    id: &ResourceId,
    v: VersionId,
) -> Vec<u8> {
    let mut k = versions_prefix(t, ty, id);
    k.extend_from_slice(&v.0.to_be_bytes());
    k
}

/// Prefix of the tenant's change log.
pub(crate) fn changes_prefix(t: &TenantId) -> Vec<u8> {
    sub(t, b'c')
}

/// One change-log record.
pub(crate) fn change_key(t: &TenantId, seq: u64) -> Vec<u8> {
    let mut k = changes_prefix(t);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Prefix of the type-history index of one type.
pub(crate) fn type_history_prefix(t: &TenantId, ty: ResourceType) -> Vec<u8> {
    let mut k = sub(t, b'h');
    push_str(&mut k, ty.as_str().as_bytes());
    k
}

/// One type-history index entry.
pub(crate) fn type_history_key(t: &TenantId, ty: ResourceType, seq: u64) -> Vec<u8> {
    let mut k = type_history_prefix(t, ty);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Which identifiers an index prefix selects.
pub(crate) enum SystemSel<'a> {
    /// Any system, or none.
    Any,
    /// Only identifiers without a system.
    Absent,
    /// Only this system.
    Is(&'a str),
}

/// The index prefix for identifiers of type `ty` with `value` and the given system selection.
pub(crate) fn identifier_prefix(
    t: &TenantId,
    ty: ResourceType,
    value: &str,
    system: SystemSel<'_>,
) -> Vec<u8> {
    let mut k = sub(t, b'i');
    push_str(&mut k, ty.as_str().as_bytes());
    push_str(&mut k, value.as_bytes());
    match system {
        SystemSel::Any => {}
        SystemSel::Absent => k.push(0),
        SystemSel::Is(s) => {
            k.push(1);
            push_str(&mut k, s.as_bytes());
        }
    }
    k
}

/// The index key of one identifier of one resource.
pub(crate) fn identifier_key(
    t: &TenantId,
    ty: ResourceType,
    ident: &IndexedIdentifier,
    id: &ResourceId,
) -> Vec<u8> {
    let sel = match &ident.system {
        Some(s) => SystemSel::Is(s),
        None => SystemSel::Absent,
    };
    let mut k = identifier_prefix(t, ty, &ident.value, sel);
    push_str(&mut k, id.as_str().as_bytes());
    k
}

/// The sequence number at the end of a change-log or type-history key.
pub(crate) fn seq_of_key(key: &[u8]) -> Result<u64, StoreError> {
    let tail = key
        .len()
        .checked_sub(8)
        .and_then(|at| key.get(at..))
        .ok_or_else(|| StoreError::Corrupt("change-log key too short".into()))?;
    let mut b = [0u8; 8];
    b.copy_from_slice(tail);
    Ok(u64::from_be_bytes(b))
}

// ---------------------------------------------------------------------------------------------
// values

/// An identifier as kept in the index: a value, and a system if it has a non-empty one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct IndexedIdentifier {
    pub system: Option<String>,
    pub value: String,
}

struct Enc(Vec<u8>);

impl Enc {
    fn new() -> Enc {
        Enc(Vec::new())
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i64(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        // Lengths are bounded by the 4 GiB a u32 can say; the server limits bodies far below.
        self.0
            .extend_from_slice(&u32::try_from(v.len()).unwrap_or(u32::MAX).to_be_bytes());
        self.0.extend_from_slice(v);
        self
    }
    fn rest(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

struct Dec<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Dec<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Dec<'a> {
        Dec { buf, what }
    }
    fn corrupt(&self) -> StoreError {
        StoreError::Corrupt(format!("truncated or malformed {}", self.what))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.buf.len() < n {
            return Err(self.corrupt());
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
    fn i64(&mut self) -> Result<i64, StoreError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(i64::from_be_bytes(b))
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }
    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, StoreError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.corrupt())
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn end(&self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.corrupt())
        }
    }
}

fn method_code(m: Method) -> u8 {
    match m {
        Method::Create => 1,
        Method::Update => 2,
        Method::Delete => 3,
    }
}

fn method_of(code: u8, what: &'static str) -> Result<Method, StoreError> {
    match code {
        1 => Ok(Method::Create),
        2 => Ok(Method::Update),
        3 => Ok(Method::Delete),
        _ => Err(StoreError::Corrupt(format!(
            "unknown method code in {what}"
        ))),
    }
}

fn resource_type_of(name: &[u8], what: &'static str) -> Result<ResourceType, StoreError> {
    std::str::from_utf8(name)
        .ok()
        .and_then(ResourceType::parse)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown resource type in {what}")))
}

fn resource_id_of(id: &[u8], what: &'static str) -> Result<ResourceId, StoreError> {
    std::str::from_utf8(id)
        .ok()
        .and_then(|s| ResourceId::new(s).ok())
        .ok_or_else(|| StoreError::Corrupt(format!("invalid resource id in {what}")))
}

/// The tenant record: state, creation instant (µs since the epoch) and display name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TenantRecord {
    /// Being removed: invisible, refuses writes, its data is being deleted in chunks.
    pub removing: bool,
    pub created_micros: i64,
    pub name: String,
}

impl TenantRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        e.u8(u8::from(self.removing))
            .i64(self.created_micros)
            .bytes(self.name.as_bytes());
        e.0
    }

    pub fn decode(b: &[u8]) -> Result<TenantRecord, StoreError> {
        let mut d = Dec::new(b, "tenant record");
        let removing = d.u8()? != 0;
        let created_micros = d.i64()?;
        let name = d.string()?;
        d.end()?;
        Ok(TenantRecord {
            removing,
            created_micros,
            name,
        })
    }
}

/// The current pointer of a resource: its newest version, whether that is a deletion, and the
/// identifiers indexed for it (so that an update or delete can remove exactly those).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pointer {
    pub deleted: bool,
    pub version: VersionId,
    pub last_updated_micros: i64,
    pub identifiers: Vec<IndexedIdentifier>,
}

impl Pointer {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        e.u8(u8::from(self.deleted))
            .u64(self.version.0)
            .i64(self.last_updated_micros)
            .u64(self.identifiers.len() as u64);
        for ident in &self.identifiers {
            match &ident.system {
                Some(s) => e.u8(1).bytes(s.as_bytes()),
                None => e.u8(0),
            };
            e.bytes(ident.value.as_bytes());
        }
        e.0
    }

    pub fn decode(b: &[u8]) -> Result<Pointer, StoreError> {
        let mut d = Dec::new(b, "current pointer");
        let deleted = d.u8()? != 0;
        let version = VersionId(d.u64()?);
        let last_updated_micros = d.i64()?;
        let n = d.u64()?;
        let mut identifiers = Vec::new();
        for _ in 0..n {
            let system = match d.u8()? {
                0 => None,
                _ => Some(d.string()?),
            };
            let value = d.string()?;
            identifiers.push(IndexedIdentifier { system, value });
        }
        d.end()?;
        Ok(Pointer {
            deleted,
            version,
            last_updated_micros,
            identifiers,
        })
    }
}

/// One version of a resource: how it came about, its change-log sequence number, its instant,
/// and (unless it is a deletion) the exact JSON bytes served to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VersionRecord {
    pub method: Method,
    pub seq: u64,
    pub last_updated_micros: i64,
    pub json: Vec<u8>,
}

impl VersionRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        e.u8(method_code(self.method))
            .u64(self.seq)
            .i64(self.last_updated_micros)
            .rest(&self.json);
        e.0
    }

    pub fn decode(b: &[u8]) -> Result<VersionRecord, StoreError> {
        let mut d = Dec::new(b, "version record");
        let method = method_of(d.u8()?, "version record")?;
        let seq = d.u64()?;
        let last_updated_micros = d.i64()?;
        let json = d.rest().to_vec();
        Ok(VersionRecord {
            method,
            seq,
            last_updated_micros,
            json,
        })
    }
}

/// A change-log record (the sequence number is in the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChangeRecord {
    pub method: Method,
    pub resource_type: ResourceType,
    pub id: ResourceId,
    pub version: VersionId,
    pub last_updated_micros: i64,
}

impl ChangeRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        e.u8(method_code(self.method))
            .u64(self.version.0)
            .i64(self.last_updated_micros)
            .bytes(self.resource_type.as_str().as_bytes())
            .bytes(self.id.as_str().as_bytes());
        e.0
    }

    pub fn decode(b: &[u8]) -> Result<ChangeRecord, StoreError> {
        let what = "change-log record";
        let mut d = Dec::new(b, what);
        let method = method_of(d.u8()?, what)?;
        let version = VersionId(d.u64()?);
        let last_updated_micros = d.i64()?;
        let resource_type = resource_type_of(d.bytes()?, what)?;
        let id = resource_id_of(d.bytes()?, what)?;
        d.end()?;
        Ok(ChangeRecord {
            method,
            resource_type,
            id,
            version,
            last_updated_micros,
        })
    }
}

/// Decodes the id stored as the value of an identifier index entry.
pub(crate) fn decode_index_id(b: &[u8]) -> Result<ResourceId, StoreError> {
    resource_id_of(b, "identifier index entry")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(s: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        push_str(&mut v, s);
        v
    }

    #[test]
    fn escaping_is_prefix_free_and_ordered() {
        let samples: [&[u8]; 7] = [b"", b"a", b"a\0", b"a\0b", b"ab", b"b", b"\0\x01"];
        for a in samples {
            for b in samples {
                let (ea, eb) = (esc(a), esc(b));
                if a != b {
                    assert!(!eb.starts_with(&ea), "{a:?} {b:?}");
                }
                assert_eq!(a.cmp(b), ea.cmp(&eb), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn tenant_keys_decode() {
        let t = TenantId::new("hf-vest_1").unwrap();
        assert_eq!(tenant_id_of_key(&tenant_key(&t)).unwrap(), t);
        assert!(tenant_id_of_key(b"Tabc").is_err());
        let encoded = esc(b"a\0b");
        let (s, rest) = read_str(&encoded).unwrap();
        assert_eq!((s.as_slice(), rest), (&b"a\0b"[..], &b""[..]));
    }

    #[test]
    fn tenant_prefixes_do_not_collide() {
        let a = tenant_prefix(&TenantId::new("a").unwrap());
        let ab = tenant_prefix(&TenantId::new("ab").unwrap());
        assert!(!ab.starts_with(&a));
        assert!(!a.starts_with(&ab));
    }

    #[test]
    fn records_round_trip() {
        let p = Pointer {
            deleted: false,
            version: VersionId(7),
            last_updated_micros: 123,
            identifiers: vec![
                IndexedIdentifier {
                    system: Some("s\0|".into()),
                    value: "v".into(),
                },
                IndexedIdentifier {
                    system: None,
                    value: "x".into(),
                },
            ],
        };
        assert_eq!(Pointer::decode(&p.encode()).unwrap(), p);
        let c = ChangeRecord {
            method: Method::Update,
            resource_type: ResourceType::parse("Patient").unwrap(),
            id: ResourceId::new("abc").unwrap(),
            version: VersionId(2),
            last_updated_micros: -5,
        };
        assert_eq!(ChangeRecord::decode(&c.encode()).unwrap(), c);
        assert!(ChangeRecord::decode(&c.encode()[..5]).is_err());
        let t = TenantRecord {
            removing: true,
            created_micros: 9,
            name: "Helse Bergen".into(),
        };
        assert_eq!(TenantRecord::decode(&t.encode()).unwrap(), t);
    }
}
