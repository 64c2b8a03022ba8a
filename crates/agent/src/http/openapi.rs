//! The machine-readable API description served at `GET /openapi.json`. It
//! is generated from the handlers' `#[utoipa::path]` annotations and from
//! the types they accept and send, so it cannot drift from the code.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::LazyLock;

use soda_syncer_domain::{PolicySpec, RunKind, RunState};
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type};
use utoipa::openapi::RefOr;
use utoipa::{OpenApi, PartialSchema, ToSchema};

use super::views::RunView;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "soda-syncer agent API",
        description = "Scheduled, consistent restic backups of this node's volumes. Errors always have the body \
            `{\"error\": {\"code\", \"message\", \"field\"?}}`. Secrets are accepted on write and never returned."
    ),
    paths(
        super::legacy::legacy_snapshot,
        super::policies::list_policies,
        super::policies::create_policy,
        super::policies::get_policy,
        super::policies::put_policy,
        super::policies::patch_policy,
        super::policies::delete_policy,
        super::policies::pause_policy,
        super::policies::resume_policy,
        super::runs::run_policy,
        super::runs::drill_policy,
        super::snapshots::policy_snapshots,
        super::snapshots::restore_policy,
        super::runs::maintain_policy,
        super::runs::list_runs,
        super::runs::get_run,
        super::runs::cancel_run,
        super::runs::run_events,
        super::status::agent_status,
        super::status::cluster_view,
        super::status::healthz,
        super::status::readyz,
        super::status::metrics,
        super::status::openapi_json,
    ),
    tags(
        (name = "legacy", description = "The upstream route soda-proxy calls"),
        (name = "policies", description = "What to back up, where to and when"),
        (name = "runs", description = "Backups and other jobs, queued, running and done"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    )
)]
struct ApiDoc;

/// The OpenAPI document of the agent's API.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// [`document`] as JSON, built once.
pub fn json() -> &'static str {
    static JSON: LazyLock<String> =
        LazyLock::new(|| document().to_pretty_json().expect("an OpenAPI document always serializes"));
    &JSON
}

/// The body of `PATCH /v1/policies/{id}`: an RFC 7396 merge patch over the
/// policy, derived from [`PolicySpec`]'s schema. Nested objects are merged
/// key by key, so every field is optional at every depth; `null` removes a
/// field, so it is allowed where the field is optional. The merged policy is
/// then checked like a PUT body.
pub struct PolicyPatch;

impl PartialSchema for PolicyPatch {
    fn schema() -> RefOr<Schema> {
        let mut components = Vec::new();
        PolicySpec::schemas(&mut components);
        let components: BTreeMap<_, _> = components.into_iter().collect();
        let mut patch = merge_patch_of(PolicySpec::schema(), &components);
        if let RefOr::T(Schema::Object(o)) = &mut patch {
            o.description = Some(
                "An RFC 7396 merge patch over the policy: any of PolicySpec's fields, at any depth; null removes \
                 an optional field (its default applies). The merged policy is checked like a PUT body."
                    .into(),
            );
        }
        patch
    }
}

impl ToSchema for PolicyPatch {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("PolicyPatch")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        // Enums stay references.
        PolicySpec::schemas(schemas);
    }
}

/// The schema of a merge patch over values of `schema`: the properties of
/// objects (also behind references) all become optional, and the optional
/// ones may be null.
fn merge_patch_of(schema: RefOr<Schema>, components: &BTreeMap<String, RefOr<Schema>>) -> RefOr<Schema> {
    match schema {
        RefOr::Ref(r) => {
            let name = r.ref_location.rsplit('/').next().unwrap_or_default();
            match components.get(name) {
                Some(target @ RefOr::T(Schema::Object(o))) if !o.properties.is_empty() => {
                    merge_patch_of(target.clone(), components)
                }
                _ => RefOr::Ref(r),
            }
        }
        RefOr::T(Schema::Object(mut o)) if !o.properties.is_empty() => {
            let required = std::mem::take(&mut o.required);
            o.properties = std::mem::take(&mut o.properties)
                .into_iter()
                .map(|(name, field)| {
                    let field = merge_patch_of(field, components);
                    // Removing a required field leaves no valid policy.
                    let field = if required.contains(&name) { field } else { or_null(field) };
                    (name, field)
                })
                .collect();
            RefOr::T(Schema::Object(o))
        }
        other => other,
    }
}

/// `schema`, or null.
fn or_null(schema: RefOr<Schema>) -> RefOr<Schema> {
    match schema {
        RefOr::T(Schema::Object(mut o)) => {
            o.schema_type = match o.schema_type {
                SchemaType::Type(Type::Null) => SchemaType::Type(Type::Null),
                SchemaType::Type(t) => SchemaType::from_iter([t, Type::Null]),
                SchemaType::Array(mut ts) => {
                    if !ts.contains(&Type::Null) {
                        ts.push(Type::Null);
                    }
                    SchemaType::Array(ts)
                }
                SchemaType::AnyValue => SchemaType::AnyValue,
            };
            if let Some(values) = &mut o.enum_values {
                if !values.contains(&serde_json::Value::Null) {
                    values.push(serde_json::Value::Null);
                }
            }
            RefOr::T(Schema::Object(o))
        }
        RefOr::T(Schema::Array(mut a)) => {
            a.schema_type = match a.schema_type {
                SchemaType::Type(t) if t != Type::Null => SchemaType::from_iter([t, Type::Null]),
                other => other,
            };
            RefOr::T(Schema::Array(a))
        }
        RefOr::T(Schema::OneOf(o)) if o.items.iter().any(is_null) => RefOr::T(Schema::OneOf(o)),
        other => OneOfBuilder::new().item(ObjectBuilder::new().schema_type(Type::Null)).item(other).into(),
    }
}

fn is_null(schema: &RefOr<Schema>) -> bool {
    matches!(schema, RefOr::T(Schema::Object(o)) if o.schema_type == SchemaType::Type(Type::Null))
}

/// One server-sent event of `GET /v1/runs/{id}/events`. Before OpenAPI 3.2
/// (`itemSchema`), the schema of a `text/event-stream` response describes
/// each event: its `event` name and its `data`, here a Run as JSON.
pub struct RunEvent;

impl PartialSchema for RunEvent {
    fn schema() -> RefOr<Schema> {
        // utoipa has no builder for `contentSchema` (JSON Schema 2020-12), so
        // it goes in as an extension: extensions are written as given.
        let run = serde_json::json!({ "$ref": format!("#/components/schemas/{}", RunView::name()) });
        let data = ObjectBuilder::new()
            .schema_type(Type::String)
            .content_media_type("application/json")
            .extensions(Some(Extensions::from_iter([("contentSchema", run)])))
            .description(Some("The run, as JSON (a RunView)."));
        let event = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some([super::runs::EVENT_PROGRESS, super::runs::EVENT_END]))
            .description(Some("`progress` while the run is queued or running, then one `end`."));
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("event", event)
            .property("data", data)
            .required("event")
            .required("data")
            .into()
    }
}

impl ToSchema for RunEvent {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("RunEvent")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((RunView::name().into_owned(), RunView::schema()));
        RunView::schemas(schemas);
    }
}

/// `state` of `GET /v1/runs`: a run state, or empty for any.
pub(super) fn run_state_filter() -> Schema {
    empty_or(RunState::schema(), "Only runs in this state; empty for any.")
}

/// `kind` of `GET /v1/runs`: a run kind, or empty for any.
pub(super) fn run_kind_filter() -> Schema {
    empty_or(RunKind::schema(), "Only runs of this kind; empty for any.")
}

fn empty_or(values: RefOr<Schema>, description: &str) -> Schema {
    let mut all = vec![serde_json::Value::from("")];
    if let RefOr::T(Schema::Object(o)) = values {
        all.extend(o.enum_values.unwrap_or_default());
    }
    ObjectBuilder::new().schema_type(Type::String).enum_values(Some(all)).description(Some(description)).into()
}
