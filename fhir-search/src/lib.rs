//! # fhir-search
//!
//! FHIR R4 search over a [tantivy](https://docs.rs/tantivy) index derived from the store's
//! change log. The index is never the only copy of anything: it can always be rebuilt from the
//! store ([`SearchIndex::rebuild`]), and search results are the store's own bytes of the
//! indexed versions (design invariant 7).
//!
//! ```text
//! Store::changes(tenant, seq+1)  ──►  TenantIndex (DATA/index/{tenant})  ──►  SearchIndex::search
//!        ▲ acknowledged writes           one commit per batch, payload = seq        │
//!        └──── Store::last_seq(tenant) ◄── a search waits until the index covers it ┘
//! ```
//!
//! ## Design
//!
//! - **One index per tenant**, in `{dir}/{tenant}` (design invariant 5: every index belongs to
//!   exactly one tenant). No query can reach another tenant's documents because they are in
//!   another index; removing a tenant deletes its directory ([`SearchIndex::remove_tenant`]),
//!   and an index is only reused for the tenant *incarnation* that built it (the tenant's
//!   creation instant is in every commit), because a tenant created again under the same id
//!   starts its change log at 1 again.
//! - **Fed from the change log.** Each commit records the change-log sequence number it covers
//!   in the tantivy commit payload. After a crash (even `kill -9`) the index resumes from there;
//!   uncommitted work is simply done again (deletes and adds are idempotent per resource).
//! - **Read-your-writes.** [`SearchIndex::search`] reads the store's newest sequence number
//!   first and waits until the index covers it. Indexing is done by whoever holds the tenant's
//!   indexing lock — the background indexer or a waiting search — in batches with one commit
//!   and one reader reload each, so concurrent writers and searchers share commits (group
//!   commit) instead of committing tantivy per write.
//! - **Schema.** Parameters are not fields (tenants add parameters at run time): one field per
//!   kind of value, every term prefixed by the parameter's code; see the table in the source of
//!   `fields.rs`. Strings are normalised (case and accents folded), numbers and instants are
//!   encoded so that text order is numeric order, and dates are intervals with their calendar
//!   units indexed, so every prefix is one or two term or range queries (see `dates.rs`).
//! - **Stable paging.** A search with more than one page keeps its tantivy `Searcher` (an
//!   immutable snapshot) in a cache under a random token for [`IndexOptions::page_ttl`]
//!   (10 minutes). Later pages run the same query on that snapshot in the same total order
//!   and serve each hit by reading the *indexed version* from the store, so pages never repeat
//!   or skip a match and never show a version newer than the snapshot, whatever is written
//!   meanwhile.
//! - **Dates without a time zone** (`2024-03-01`, `2024-03-01T10:00:00`) are taken as UTC, in
//!   resources and in search values alike (as [`fhir_core::search_param::date_bounds`] does), so
//!   every server gives the same answer. Norwegian local times should be written with their
//!   offset (`+01:00`/`+02:00`), as FHIR requires for times anyway.
//!
//! ## Supported
//!
//! All parameter types (number, date, string, token, reference, quantity, uri, composite) and
//! `_id`, `_lastUpdated`, `_tag`, `_profile`, `_security`, `_source`, `_text` (word prefix in
//! the narrative), `_has`; prefixes `eq ne gt lt ge le sa eb ap`; modifiers `:exact`,
//! `:contains`, `:missing`, `:not`, `:text`, `:of-type`, `:identifier`, `:[type]`, `:below`,
//! `:above` (uri); `,` is OR, a repeated parameter AND; chains (`subject:Patient.name=…`, any
//! depth) and reverse chains; `_sort` (several keys), `_count`, `_total`, `_summary`,
//! `_elements`, `_include`/`_revinclude` (`:iterate`, `*`); system-level search (`_type`),
//! compartment search (Patient); custom SearchParameters per tenant ([`SearchIndex::reindex`]).
//! Conditional create, update and delete on any criteria
//! ([`SearchIndex::conditional_create`]), also inside `batch`/`transaction` Bundles
//! processed by [`fhir_store::bundle::process`] with a [`BundleResolver`].
//! Token modifiers `:in`, `:not-in`, `:below`, `:above` need terminology and are refused with
//! [`SearchError::NotSupported`], never ignored.
#![warn(missing_docs)]

mod bundle;
mod collect;
mod datefilter;
mod dates;
mod error;
mod fields;
mod index;
mod query;
mod request;
mod summary;
mod tenant;
mod terms;

pub use bundle::{BundleResolver, searchset};
pub use error::SearchError;
pub use index::{CriteriaGuard, EntryMode, IndexOptions, SearchEntry, SearchIndex, SearchResult};
pub use request::{Handling, Include, Scope, SearchRequest, SortKey, Summary, Total};
pub use terms::normalize;
