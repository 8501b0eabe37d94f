//! Event contracts: JSON Schemas (draft 2020-12) of the envelope every event is published in and
//! of each event type's `data` at each schema version, generated from the Rust types with
//! `schemars` and kept as files beside the code (the payment service's are in `schemas/`).
//!
//! A service lists its contracts once ([`Contract::of`] for each payload type) and keeps one test
//! that calls [`check_dir`]: it fails when a committed schema no longer matches its type, and
//! with `UPDATE_SCHEMAS=1` in the environment it writes the files instead. A payload change that
//! breaks readers gets a new schema version (a new file), never an in-place edit of the old one.

use std::collections::BTreeMap;
use std::path::Path;

pub use schemars::{JsonSchema, Schema};

use crate::envelope::EventEnvelope;

/// The envelope's schema file in a contracts directory.
pub const ENVELOPE_FILE: &str = "envelope.json";

/// The schema of one event type's `data` at one schema version.
#[derive(Debug, Clone)]
pub struct Contract {
    /// The event type, e.g. `payment.paid`.
    pub event_type: String,
    /// The schema version the payload type is.
    pub schema_version: i32,
    /// Its JSON Schema.
    pub schema: Schema,
}

impl Contract {
    /// The contract of payload type `P`, published as `event_type` at `schema_version`.
    pub fn of<P: JsonSchema>(event_type: &str, schema_version: i32) -> Self {
        let mut schema = schemars::generate::SchemaSettings::draft2020_12()
            .into_generator()
            .into_root_schema_for::<P>();
        schema.insert(
            "title".into(),
            format!("{event_type} data, schema version {schema_version}").into(),
        );
        Self {
            event_type: event_type.to_owned(),
            schema_version,
            schema,
        }
    }

    /// The contract of an event the service appends: its payload's schema (the event as it
    /// serializes, fields under `#[serde(skip)]` left out), at its type and version.
    pub fn for_event<E: crate::producer::OutboxEvent + JsonSchema>() -> Self {
        Self::of::<E>(E::EVENT_TYPE, E::SCHEMA_VERSION)
    }

    /// Its file name in a contracts directory: `<event type>.v<schema version>.json`.
    pub fn file_name(&self) -> String {
        format!("{}.v{}.json", self.event_type, self.schema_version)
    }
}

/// The envelope's JSON Schema.
pub fn envelope_schema() -> Schema {
    schemars::generate::SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<EventEnvelope>()
}

/// Every file a contracts directory holds for `contracts`: name and text.
pub fn files(contracts: &[Contract]) -> Result<BTreeMap<String, String>, String> {
    let mut files = BTreeMap::new();
    files.insert(ENVELOPE_FILE.to_owned(), pretty(&envelope_schema()));
    for contract in contracts {
        if files
            .insert(contract.file_name(), pretty(&contract.schema))
            .is_some()
        {
            return Err(format!("{} is listed twice", contract.file_name()));
        }
    }
    Ok(files)
}

fn pretty(schema: &Schema) -> String {
    let mut text = serde_json::to_string_pretty(schema).expect("a schema is JSON");
    text.push('\n');
    text
}

/// Compares `dir` with the files of `contracts` (every `*.json` in it must be one of them). With
/// `UPDATE_SCHEMAS=1` in the environment, writes them (and removes the others) instead. Returns
/// the names it found missing, different or left over, or wrote.
pub fn check_dir(dir: &Path, contracts: &[Contract]) -> Result<Vec<String>, String> {
    let want = files(contracts)?;
    let update = std::env::var("UPDATE_SCHEMAS").is_ok_and(|v| v == "1");
    let mut found = BTreeMap::new();
    if dir.is_dir() {
        for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let name = path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                found.insert(name, text);
            }
        }
    }
    let mut differ = Vec::new();
    for (name, text) in &want {
        match found.get(name) {
            None => differ.push(format!("{name}: missing")),
            Some(have) if have != text => differ.push(format!("{name}: differs from its type")),
            Some(_) => {}
        }
    }
    for name in found.keys().filter(|n| !want.contains_key(*n)) {
        differ.push(format!("{name}: no contract has it"));
    }
    if update {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for (name, text) in &want {
            std::fs::write(dir.join(name), text).map_err(|e| format!("{name}: {e}"))?;
        }
        for name in found.keys().filter(|n| !want.contains_key(*n)) {
            std::fs::remove_file(dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
        }
        return Ok(differ);
    }
    if differ.is_empty() {
        Ok(Vec::new())
    } else {
        Err(format!(
            "the committed schemas in {} are not the types' ({}). If the change breaks readers, \
             give the payload a new schema version instead; otherwise regenerate them with \
             UPDATE_SCHEMAS=1 (make schemas).",
            dir.display(),
            differ.join("; ")
        ))
    }
}
