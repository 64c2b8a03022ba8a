//! Strategic merge patch, enough for what kubectl and kube-rs send: merge
//! semantics (RFC 7386: `null` deletes) plus lists merged by key for the
//! core types' lists that carry a `patchMergeKey`, the `$patch` directives
//! (`delete`, `replace`), `$deleteFromPrimitiveList/<field>`, `$retainKeys`,
//! and `$setElementOrder/<field>` (accepted, order not enforced).

use serde_json::{Map, Value};

/// The `patchMergeKey` of a list field, by field name (the same name has
/// the same key everywhere in the core types this stand-in serves).
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => "containerPort",
        "conditions" | "addresses" => "type",
        "ownerReferences" => "uid",
        "taints" => "key",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        _ => return None,
    })
}

/// Lists of scalars with `patchStrategy: merge` (a union, not a replace).
fn merges_scalars(field: &str) -> bool {
    field == "finalizers"
}

fn directive(v: &Value) -> Option<&str> {
    v.get("$patch").and_then(Value::as_str)
}

/// Apply a strategic merge patch (a JSON object) to `target`.
pub(crate) fn strategic(target: &mut Value, patch: &Value) -> Result<(), String> {
    let Some(p) = patch.as_object() else { return Err("a strategic merge patch must be a JSON object".into()) };
    match directive(patch) {
        Some("replace") => {
            let mut p = p.clone();
            p.remove("$patch");
            *target = fresh(&Value::Object(p));
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        Some(other) => return Err(format!("unknown patch type {other:?}")),
        None => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let gone = v.as_array().ok_or("$deleteFromPrimitiveList needs a list")?;
            if let Some(Value::Array(list)) = t.get_mut(field) {
                list.retain(|x| !gone.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        match v {
            Value::Null => drop(t.remove(k)),
            Value::Object(_) if directive(v) == Some("delete") => drop(t.remove(k)),
            Value::Object(_) => strategic(t.entry(k.clone()).or_insert(Value::Null), v)?,
            Value::Array(items) => {
                let key = merge_key(k).filter(|_| items.iter().all(Value::is_object));
                match (key, t.get_mut(k)) {
                    (Some(key), Some(Value::Array(cur))) => merge_list(cur, items, key)?,
                    (_, Some(Value::Array(cur))) if merges_scalars(k) => {
                        for x in items {
                            if !cur.contains(x) {
                                cur.push(x.clone());
                            }
                        }
                    }
                    _ => {
                        let items = items.iter().filter(|i| directive(i).is_none()).map(fresh).collect();
                        t.insert(k.clone(), Value::Array(items));
                    }
                }
            }
            scalar => drop(t.insert(k.clone(), scalar.clone())),
        }
    }
    if let Some(Value::Array(keep)) = p.get("$retainKeys") {
        t.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
    }
    Ok(())
}

fn merge_list(cur: &mut Vec<Value>, items: &[Value], key: &str) -> Result<(), String> {
    if items.iter().any(|i| directive(i) == Some("replace")) {
        *cur = items.iter().filter(|i| directive(i).is_none()).map(fresh).collect();
        return Ok(());
    }
    for item in items {
        let id = item.get(key);
        let pos = id.and_then(|id| cur.iter().position(|c| c.get(key) == Some(id)));
        match (directive(item), pos) {
            (Some("delete"), Some(i)) => drop(cur.remove(i)),
            (Some("delete"), None) => {}
            (_, Some(i)) => strategic(&mut cur[i], item)?,
            (_, None) => cur.push(fresh(item)),
        }
    }
    Ok(())
}

/// A patch value that lands where nothing was: directives and nulls out.
fn fresh(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter().filter(|(k, v)| !k.starts_with('$') && !v.is_null()).map(|(k, v)| (k.clone(), fresh(v))).collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(fresh).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::strategic;
    use serde_json::json;

    #[test]
    fn containers_merge_by_name_and_delete_directive_removes_one() {
        let mut pod = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}],
            "finalizers": ["f1"]}});
        let patch = json!({"spec": {"containers": [{"name": "a", "image": "z"}, {"name": "b", "$patch": "delete"},
            {"name": "c", "image": "w", "env": null}], "$setElementOrder/containers": [{"name": "a"}]}});
        strategic(&mut pod, &patch).unwrap();
        assert_eq!(pod["spec"]["containers"], json!([{"name": "a", "image": "z"}, {"name": "c", "image": "w"}]));
        strategic(&mut pod, &json!({"spec": {"finalizers": ["f2"], "$deleteFromPrimitiveList/finalizers": ["f1"]}}))
            .unwrap();
        assert_eq!(pod["spec"]["finalizers"], json!(["f2"]));
        strategic(&mut pod, &json!({"spec": {"containers": [{"name": "q"}, {"$patch": "replace"}]}})).unwrap();
        assert_eq!(pod["spec"]["containers"], json!([{"name": "q"}]));
    }
}
