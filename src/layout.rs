//! What a repository is: a prefix of chunk objects (format-1 manifests) or of packs
//! (format-2 manifests), as its `repository.json` says ([`Descriptor`]), and what a new one
//! is created as ([`Layout`], from the configuration's `[repository]`).

use crate::chunk::ChunkParams;
use crate::manifest::Repository;
use crate::manifest_v2 as v2;

/// What a prefix's `repository.json` says the repository is. Which one is decided once, at
/// creation, and every reader and writer follows it: a chunk-object repository is never
/// written with packs, nor the other way round.
#[derive(Debug, Clone, PartialEq)]
pub enum Descriptor {
    /// Every chunk an object of its own under `chunks/`, and format-1 manifests.
    Chunks(Repository),
    /// Chunks and tree blocks in packs under `packs/`, and format-2 manifests (see
    /// [`crate::manifest_v2`]).
    Packs(v2::Repository),
}

impl Descriptor {
    pub fn cluster_id(&self) -> &str {
        match self {
            Descriptor::Chunks(d) => &d.cluster_id,
            Descriptor::Packs(d) => &d.cluster_id,
        }
    }

    pub fn incarnation(&self) -> &str {
        match self {
            Descriptor::Chunks(d) => &d.incarnation,
            Descriptor::Packs(d) => &d.incarnation,
        }
    }

    pub fn chunking(&self) -> ChunkParams {
        match self {
            Descriptor::Chunks(d) => d.chunking,
            Descriptor::Packs(d) => d.chunking,
        }
    }

    /// The format's name in messages and status output.
    pub fn layout_name(&self) -> &'static str {
        match self {
            Descriptor::Chunks(_) => "chunks",
            Descriptor::Packs(_) => "packs",
        }
    }

    /// Parses a `repository.json` payload: a descriptor with the `packs` feature is read as
    /// one, anything else as a chunk-object repository, so that a repository this build
    /// cannot use is refused by what it lacks.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Descriptor, String> {
        #[derive(serde::Deserialize)]
        struct Features {
            #[serde(default)]
            features: Vec<serde_json::Value>,
        }
        let header: Features = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if header.features.iter().any(|f| f.as_str() == Some("packs")) {
            v2::Repository::parse(bytes).map(Descriptor::Packs)
        } else {
            Repository::parse(bytes).map(Descriptor::Chunks)
        }
    }

    /// The descriptor as `repository.json` holds it (pretty JSON).
    pub fn to_json(&self) -> Vec<u8> {
        match self {
            Descriptor::Chunks(d) => serde_json::to_vec_pretty(d),
            Descriptor::Packs(d) => serde_json::to_vec_pretty(d),
        }
        .expect("a descriptor serializes")
    }
}

/// What a new repository is created as: chunk objects with these parameters, or packs.
#[derive(Debug, Clone, Copy)]
pub enum Layout {
    Chunks(ChunkParams),
    Packs(v2::NewRepository),
}

impl From<ChunkParams> for Layout {
    fn from(params: ChunkParams) -> Layout {
        Layout::Chunks(params)
    }
}

impl From<v2::NewRepository> for Layout {
    fn from(settings: v2::NewRepository) -> Layout {
        Layout::Packs(settings)
    }
}

impl Layout {
    pub(crate) fn descriptor(self, cluster_id: &str) -> Descriptor {
        match self {
            Layout::Chunks(params) => Descriptor::Chunks(Repository::new(cluster_id, params)),
            Layout::Packs(settings) => Descriptor::Packs(v2::Repository::new(cluster_id, settings)),
        }
    }
}
