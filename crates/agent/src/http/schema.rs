//! Schemas written by hand for `/openapi.json`, where the derived ones
//! cannot say it: the merge-patch body of `PATCH /v1/policies/{id}`, the
//! server-sent events of `GET /v1/runs/{id}/events`, and the run filters.

use std::borrow::Cow;
use std::collections::BTreeMap;

use soda_syncer_domain::{PolicySpec, RunKind, RunState};
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use super::views::RunView;

/// The `event` names of `GET /v1/runs/{id}/events`.
pub(super) const EVENT_PROGRESS: &str = "progress";
pub(super) const EVENT_END: &str = "end";

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
            .enum_values(Some([EVENT_PROGRESS, EVENT_END]))
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
