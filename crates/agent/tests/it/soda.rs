//! The SODA client against the SODA stand-in (`soda_syncer_standin::soda`,
//! which reproduces hotpot's routes, status codes, `{code, message}` error
//! bodies, metadata merge, name rule, list paging and Keystone tokens; see
//! its module doc), and the domain's mapping applied through real requests.

use chrono::{DateTime, Utc};
use serde_json::json;
use soda_syncer::soda::{KeystoneCredentials, SodaAuth, SodaClient, SodaConfig, VolumeQuery};
use soda_syncer_domain::soda::{
    desired_volume, meta, metadata_value, profile_policy, volume_update, BackupFacts, HostRequest, NewVolume, PvFacts,
    PvPhase, SodaVolume, VolumeUpdate, DEFAULT_TENANT_ID,
};
use soda_syncer_domain::Secret;
use soda_syncer_standin::soda::{KeystoneUser, SodaStandin, StandinAuth};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PASSWORD: &str = "s3cr3t-Keystone-pw";

fn noauth_client(soda: &SodaStandin) -> SodaClient {
    SodaClient::new(SodaConfig::new(soda.url(), SodaAuth::NoAuth { tenant_id: DEFAULT_TENANT_ID.into() })).unwrap()
}

fn keystone_client(soda: &SodaStandin, password: &str) -> SodaClient {
    SodaClient::new(SodaConfig::new(
        soda.url(),
        SodaAuth::Keystone(KeystoneCredentials {
            auth_url: soda.keystone_url(),
            username: "admin".into(),
            password: Secret::new(password),
            project_name: "admin".into(),
            user_domain_id: "default".into(),
        }),
    ))
    .unwrap()
}

fn facts(uid: &str) -> PvFacts {
    PvFacts {
        pv_name: format!("pvc-{uid}"),
        pv_uid: uid.into(),
        capacity_bytes: 3 << 30,
        phase: PvPhase::Bound,
        attached: true,
        storage_class: Some("soda-local".into()),
        soda_profile_id: None,
        csi_driver: Some("local.csi.openebs.io".into()),
        volume_handle: Some(format!("handle-{uid}")),
        claim_namespace: Some("shop".into()),
        claim_name: Some("orders".into()),
        node: Some("node-a".into()),
        volume_mode: Some("Filesystem".into()),
        availability_zone: None,
        last_backup: None,
    }
}

async fn wait_status(client: &SodaClient, id: &str, status: &str) -> SodaVolume {
    let cancel = CancellationToken::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = client.get_volume(id, &cancel).await.unwrap();
        if v.status == status {
            return v;
        }
        assert!(Instant::now() < deadline, "volume {id} stayed {:?}, wanted {status}", v.status);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn noauth_client_creates_reads_updates_lists_and_deletes_a_volume() {
    let soda = SodaStandin::start(StandinAuth::NoAuth).await;
    let client = noauth_client(&soda);
    let cancel = CancellationToken::new();
    let desired = desired_volume(&facts("u-1"));
    let created = client.create_volume(&desired.create_request(), &cancel).await.unwrap();
    assert_eq!(created.status, "creating");
    assert_eq!(created.size, 3);
    assert_eq!(created.availability_zone, "default");
    assert_eq!(created.tenant_id, DEFAULT_TENANT_ID);
    assert!(!created.profile_id.is_empty(), "SODA fills in default_block");
    assert_eq!(created.updated_at, "", "a fresh volume has an empty updatedAt, as Go writes it");
    assert!(DateTime::parse_from_rfc3339(&format!("{}Z", created.created_at)).is_ok(), "{}", created.created_at);
    let v = wait_status(&client, &created.id, "available").await;
    assert!(!v.pool_id.is_empty());

    let u = volume_update(&v, &desired).expect("status differs");
    assert_eq!(u.status.as_deref(), Some("inUse"));
    let after = client.update_volume(&v.id, &u, &cancel).await.unwrap();
    assert_eq!(after.status, "inUse");
    assert!(!after.updated_at.is_empty());
    assert_eq!(volume_update(&after, &desired), None);

    let other = client
        .create_volume(&NewVolume { name: "not ours".into(), size: 1, ..Default::default() }, &cancel)
        .await
        .unwrap();
    let ours = client.list_volumes(&VolumeQuery::with_metadata(meta::PV_UID, "u-1"), &cancel).await.unwrap();
    assert_eq!(ours.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), [v.id.as_str()]);
    let by_name = client
        .list_volumes(&VolumeQuery { name: Some("not ours".into()), ..Default::default() }, &cancel)
        .await
        .unwrap();
    assert_eq!(by_name.len(), 1);
    assert_eq!(by_name[0].id, other.id);

    // SODA refuses to delete an inUse volume; the sync first makes it available.
    let e = client.delete_volume(&v.id, &cancel).await.unwrap_err();
    assert_eq!(e.kind(), "soda_rejected", "{e}");
    assert!(e.to_string().contains("the volume status is inUse"), "{e}");
    let prep = soda_syncer_domain::soda::delete_preparation(&after).unwrap();
    client.update_volume(&v.id, &prep, &cancel).await.unwrap();
    client.delete_volume(&v.id, &cancel).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.get_volume(&v.id, &cancel).await {
            Err(e) if e.kind() == "soda_not_found" => break,
            Ok(v) => assert!(Instant::now() < deadline, "still there: {}", v.status),
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reqs = soda.requests();
    assert!(reqs.iter().all(|r| r.auth_token.is_none()));
    assert!(reqs.iter().all(|r| r.path.starts_with(&format!("/v1beta/{DEFAULT_TENANT_ID}/block/volumes"))));
}

#[tokio::test]
async fn lists_page_past_sodas_default_limit_of_fifty() {
    let soda = SodaStandin::start(StandinAuth::NoAuth).await;
    let client = noauth_client(&soda);
    let cancel = CancellationToken::new();
    for i in 0..230 {
        client
            .create_volume(&NewVolume { name: format!("vol {i}"), size: 1, ..Default::default() }, &cancel)
            .await
            .unwrap();
    }
    let raw: Vec<serde_json::Value> = reqwest::get(format!("{}/v1beta/{DEFAULT_TENANT_ID}/block/volumes", soda.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(raw.len(), 50, "SODA returns 50 without a limit");
    let all = client.list_volumes(&VolumeQuery::default(), &cancel).await.unwrap();
    assert_eq!(all.len(), 230);
    let mut ids: Vec<_> = all.iter().map(|v| v.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 230);
}

#[tokio::test]
async fn keystone_login_scopes_urls_to_the_tokens_project() {
    let soda = SodaStandin::start(StandinAuth::Keystone(KeystoneUser::admin(PASSWORD))).await;
    let client = keystone_client(&soda, PASSWORD);
    let cancel = CancellationToken::new();
    let profiles = client.list_profiles(&cancel).await.unwrap();
    assert!(profiles.iter().any(|p| p.name() == "default_block"));
    client.list_volumes(&VolumeQuery::default(), &cancel).await.unwrap();
    assert_eq!(client.tenant_id(&cancel).await.unwrap(), soda.project_id().unwrap());
    assert_eq!((soda.logins(), client.logins()), (1, 1), "the token is cached");
    let api: Vec<_> = soda.requests().into_iter().filter(|r| r.path.starts_with("/v1beta/")).collect();
    assert_eq!(api.len(), 2);
    let project = soda.project_id().unwrap();
    for r in &api {
        assert!(r.path.starts_with(&format!("/v1beta/{project}/")), "{}", r.path);
        assert!(r.auth_token.as_deref().is_some_and(|t| !t.is_empty()));
    }
    let login = soda.requests().into_iter().find(|r| r.path == "/identity/v3/auth/tokens").unwrap();
    assert_eq!(login.body.unwrap().pointer("/auth/identity/password/user/password").unwrap(), "***");
    // Without a token the API says 401, in SODA's error shape.
    let r = reqwest::get(format!("{}/v1beta/{project}/block/volumes", soda.url())).await.unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body, json!({"code": 401, "message": "token not found in header"}));
}

#[tokio::test]
async fn an_expired_token_is_renewed_exactly_once() {
    let soda = SodaStandin::start(StandinAuth::Keystone(KeystoneUser::admin(PASSWORD))).await;
    let client = keystone_client(&soda, PASSWORD);
    let cancel = CancellationToken::new();
    client.list_volumes(&VolumeQuery::default(), &cancel).await.unwrap();
    soda.expire_tokens();
    soda.clear_requests();
    // Several calls at once all hit the expired token; one login serves them all.
    let calls = (0..5).map(|_| {
        let c = client.clone();
        let cancel = cancel.clone();
        async move { c.list_volumes(&VolumeQuery::default(), &cancel).await }
    });
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    assert_eq!(soda.logins(), 2);
    assert_eq!(client.logins(), 2);
    let reqs = soda.requests();
    let logins: Vec<_> = reqs.iter().filter(|r| r.path.starts_with("/identity/")).collect();
    assert_eq!(logins.len(), 1, "one re-auth");
    assert_eq!(reqs.iter().filter(|r| r.status == 401).count(), 5);
    assert_eq!(reqs.iter().filter(|r| r.status == 200).count(), 5);
}

#[tokio::test]
async fn a_token_refused_again_after_renewal_is_a_clear_error() {
    let mut user = KeystoneUser::admin(PASSWORD);
    user.token_ttl = Duration::ZERO; // every token is dead on arrival
    let soda = SodaStandin::start(StandinAuth::Keystone(user)).await;
    let client = keystone_client(&soda, PASSWORD);
    let e = client.get_volume("v1", &CancellationToken::new()).await.unwrap_err();
    assert_eq!(e.kind(), "soda_unauthorized", "{e}");
    assert!(e.to_string().contains("even with a fresh token"), "{e}");
    assert_eq!(soda.logins(), 2, "renewed once, then gave up");
    assert!(!format!("{e} {e:?} {client:?}").contains(PASSWORD));
}

#[tokio::test]
async fn a_wrong_password_is_a_login_error_that_never_shows_the_password() {
    let soda = SodaStandin::start(StandinAuth::Keystone(KeystoneUser::admin(PASSWORD))).await;
    let wrong = "Wr0ng-Pa55word";
    let client = keystone_client(&soda, wrong);
    let e = client.list_profiles(&CancellationToken::new()).await.unwrap_err();
    assert_eq!(e.kind(), "soda_login_failed", "{e}");
    assert_eq!(e.status(), Some(401));
    let shown = format!("{e} | {e:?} | {client:?} | {:?}", client.config());
    assert!(shown.contains("requires authentication") && shown.contains("OS_PASSWORD"), "{shown}");
    assert!(!shown.contains(wrong) && !shown.contains(PASSWORD), "{shown}");
    assert_eq!(soda.logins(), 0);
    assert_eq!(soda.requests().len(), 1, "a refused login is not retried");
}

#[tokio::test]
async fn soda_answering_503_and_then_recovering_is_retried() {
    let soda = std::sync::Arc::new(SodaStandin::start(StandinAuth::NoAuth).await);
    let client = noauth_client(&soda);
    soda.set_down(true);
    let s = soda.clone();
    let back = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.set_down(false);
    });
    let t0 = Instant::now();
    let profiles = client.list_profiles(&CancellationToken::new()).await.unwrap();
    back.await.unwrap();
    assert!(!profiles.is_empty());
    assert!(t0.elapsed() >= Duration::from_millis(500));
    let statuses: Vec<u16> = soda.requests().iter().map(|r| r.status).collect();
    assert!(statuses.len() >= 3 && statuses[..statuses.len() - 1].iter().all(|s| *s == 503), "{statuses:?}");
    assert_eq!(*statuses.last().unwrap(), 200);
}

#[tokio::test]
async fn soda_stopped_and_restarted_is_retried_even_for_a_create() {
    let soda = std::sync::Arc::new(SodaStandin::start(StandinAuth::NoAuth).await);
    let client = noauth_client(&soda);
    let cancel = CancellationToken::new();
    client.list_profiles(&cancel).await.unwrap(); // a pooled connection exists
    soda.stop().await;
    assert!(reqwest::get(soda.url()).await.is_err(), "the port is closed");
    let s = soda.clone();
    let back = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.restart().await;
    });
    // Connection refused means SODA never saw it: a POST may be retried too.
    let v =
        client.create_volume(&NewVolume { name: "after restart".into(), size: 2, ..Default::default() }, &cancel).await;
    back.await.unwrap();
    let v = v.unwrap();
    assert_eq!(soda.volumes().len(), 1);
    assert_eq!(client.get_volume(&v.id, &cancel).await.unwrap().name, "after restart");
}

#[tokio::test]
async fn a_create_is_not_repeated_after_soda_answered_503() {
    let soda = SodaStandin::start(StandinAuth::NoAuth).await;
    let client = noauth_client(&soda);
    soda.set_down(true);
    let e = client
        .create_volume(&NewVolume { name: "once".into(), size: 1, ..Default::default() }, &CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "soda_server_error", "{e}");
    assert_eq!(e.status(), Some(503));
    assert!(e.is_transient());
    assert_eq!(soda.requests().len(), 1);
}

#[tokio::test]
async fn soda_that_stays_down_gives_up_after_the_configured_tries() {
    let soda = SodaStandin::start(StandinAuth::NoAuth).await;
    let url = soda.url();
    soda.stop().await; // nothing listens there any more
    let mut cfg = SodaConfig::new(url, SodaAuth::NoAuth { tenant_id: DEFAULT_TENANT_ID.into() });
    cfg.max_attempts = 3;
    cfg.backoff_initial = Duration::from_millis(50);
    let client = SodaClient::new(cfg).unwrap();
    let t0 = Instant::now();
    let e = client.list_profiles(&CancellationToken::new()).await.unwrap_err();
    assert_eq!(e.kind(), "soda_unreachable", "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(150), "backed off 50 + 100 ms");
}

#[tokio::test]
async fn a_slow_soda_times_out_and_a_cancelled_call_returns_at_once() {
    let soda = SodaStandin::start(StandinAuth::NoAuth).await;
    soda.set_delay(Duration::from_secs(3));
    let mut cfg = SodaConfig::new(soda.url(), SodaAuth::NoAuth { tenant_id: DEFAULT_TENANT_ID.into() });
    cfg.request_timeout = Duration::from_millis(300);
    cfg.max_attempts = 2;
    cfg.backoff_initial = Duration::from_millis(10);
    let client = SodaClient::new(cfg).unwrap();
    let t0 = Instant::now();
    let e = client.get_volume("x", &CancellationToken::new()).await.unwrap_err();
    assert_eq!(e.kind(), "soda_timeout", "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());

    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c2.cancel();
    });
    let t0 = Instant::now();
    let e = noauth_client(&soda).list_profiles(&cancel).await.unwrap_err();
    assert_eq!(e.kind(), "soda_cancelled", "{e}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn metadata_is_merged_a_removed_key_is_blanked_and_the_diff_is_idempotent() {
    let soda = SodaStandin::start(StandinAuth::NoAuth).await;
    let client = noauth_client(&soda);
    let cancel = CancellationToken::new();
    let mut f = facts("u-7");
    f.last_backup = Some(BackupFacts {
        time: DateTime::parse_from_rfc3339("2026-02-01T03:04:05Z").unwrap().with_timezone(&Utc),
        state: "succeeded".into(),
        snapshot_id: Some("ab12cd34".into()),
    });
    let d = desired_volume(&f);
    let id = client.create_volume(&d.create_request(), &cancel).await.unwrap().id;
    let v = wait_status(&client, &id, "available").await;
    // Someone else (a SODA driver) owns a key of its own.
    let foreign =
        VolumeUpdate { metadata: [("lvPath".to_string(), "/dev/vg/lv1".to_string())].into(), ..Default::default() };
    client.update_volume(&id, &foreign, &cancel).await.unwrap();
    let v = client.update_volume(&v.id, &volume_update(&v, &d).unwrap(), &cancel).await.unwrap();

    // The claim goes away and a backup fails without a snapshot.
    f.claim_namespace = None;
    f.claim_name = None;
    f.phase = PvPhase::Released;
    f.attached = false;
    f.last_backup.as_mut().unwrap().state = "failed".into();
    f.last_backup.as_mut().unwrap().snapshot_id = None;
    let d2 = desired_volume(&f);
    let u = volume_update(&v, &d2).unwrap();
    let before = v.updated_at.clone();
    tokio::time::sleep(Duration::from_millis(1100)).await; // updatedAt has whole seconds
    let after = client.update_volume(&id, &u, &cancel).await.unwrap();
    assert_ne!(after.updated_at, before, "updatedAt is refreshed");
    let stored: SodaVolume = serde_json::from_value(soda.volume(&id).unwrap()).unwrap();
    assert_eq!(stored, after);
    for k in [meta::CLAIM_NAMESPACE, meta::CLAIM_NAME, meta::LAST_SNAPSHOT_ID] {
        assert_eq!(stored.metadata.get(k).map(String::as_str), Some(""), "{k} is kept by SODA, blanked by us");
        assert_eq!(metadata_value(&stored, k), None);
    }
    assert_eq!(stored.metadata["lvPath"], "/dev/vg/lv1", "keys of others survive");
    assert_eq!(stored.metadata[meta::LAST_BACKUP_STATE], "failed");
    assert_eq!(stored.status, "available");
    let put = soda.requests().into_iter().rfind(|r| r.method == "PUT").unwrap();
    let sent = put.body.unwrap();
    assert!(sent.get("name").is_none() && sent.get("size").is_none(), "only changes are sent: {sent}");

    // Nothing changed: nothing to send, and a second pass agrees.
    let fresh = client.get_volume(&id, &cancel).await.unwrap();
    assert_eq!(volume_update(&fresh, &d2), None);
    // An empty update body changes nothing but updatedAt: SODA never deletes a key.
    let same = client.update_volume(&id, &VolumeUpdate::default(), &cancel).await.unwrap();
    assert_eq!(same.metadata, fresh.metadata);
}

#[tokio::test]
async fn sodas_error_bodies_become_stable_error_codes() {
    let soda = SodaStandin::start(StandinAuth::NoAuth).await;
    let client = noauth_client(&soda);
    let cancel = CancellationToken::new();

    let e = client.get_volume("no-such-volume", &cancel).await.unwrap_err();
    assert_eq!((e.kind(), e.status()), ("soda_not_found", Some(404)), "{e}");
    assert!(e.to_string().contains("volume no-such-volume not found"), "{e}");

    let bad = NewVolume { name: "pvc.with.dots".into(), size: 1, ..Default::default() };
    let e = client.create_volume(&bad, &cancel).await.unwrap_err();
    assert_eq!((e.kind(), e.status()), ("soda_rejected", Some(400)), "{e}");
    assert!(e.to_string().contains("invalid volume name"), "{e}");
    let e = client
        .create_volume(&NewVolume { name: "zero".into(), size: 0, ..Default::default() }, &cancel)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("invalid volume size: 0"), "{e}");
    let e = client
        .create_volume(
            &NewVolume { name: "x".into(), size: 1, profile_id: Some("nope".into()), ..Default::default() },
            &cancel,
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "soda_rejected", "{e}");

    // SODA answers a PUT on a missing volume with its own 500: not retried.
    soda.clear_requests();
    let e = client
        .update_volume("gone", &VolumeUpdate { status: Some("available".into()), ..Default::default() }, &cancel)
        .await;
    let e = e.unwrap_err();
    assert_eq!((e.kind(), e.status()), ("soda_server_error", Some(500)), "{e}");
    assert_eq!(soda.requests().len(), 1);

    // The raw wire: SODA's error body and content type.
    let r = reqwest::get(format!("{}/v1beta/{DEFAULT_TENANT_ID}/block/volumes/nope", soda.url())).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/json; charset=utf-8");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], 404);
    assert!(body["message"].as_str().unwrap().contains("nope"));
}

#[tokio::test]
async fn hosts_are_created_found_by_name_and_updated() {
    let soda = SodaStandin::start(StandinAuth::NoAuth).await;
    let client = noauth_client(&soda);
    let cancel = CancellationToken::new();
    let req = HostRequest {
        host_name: "node-a".into(),
        os_type: "linux".into(),
        access_mode: "agentless".into(),
        ip: "10.0.0.7".into(),
        ..Default::default()
    };
    let h = client.create_host(&req, &cancel).await.unwrap();
    assert_eq!(h.host_name, "node-a");
    assert!(h.availability_zones.is_empty());
    let e = client.create_host(&req, &cancel).await.unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    let found = client.list_hosts(Some("node-a"), &cancel).await.unwrap();
    assert_eq!(found.len(), 1);
    assert!(client.list_hosts(Some("node-b"), &cancel).await.unwrap().is_empty());
    let upd = HostRequest { availability_zones: vec!["zone-1".into()], ..Default::default() };
    let h2 = client.update_host(&h.id, &upd, &cancel).await.unwrap();
    assert_eq!(h2.availability_zones, ["zone-1"]);
    assert_eq!(h2.ip, "10.0.0.7");
    let e =
        client.create_host(&HostRequest { ip: "fe80::1".into(), host_name: "n".into(), ..req.clone() }, &cancel).await;
    assert_eq!(e.unwrap_err().kind(), "soda_rejected");
}

#[tokio::test]
async fn a_profile_read_from_soda_becomes_policy_settings() {
    let soda = SodaStandin::start(StandinAuth::NoAuth).await;
    let client = noauth_client(&soda);
    let cancel = CancellationToken::new();
    let id = soda.put_profile(json!({
        "name": "restic-gold",
        "storageType": "block",
        "customProperties": {
            "driver": "local.csi.openebs.io",
            "RESTIC_REPOSITORY": "s3:http://127.0.0.1:9/bucket",
            "RESTIC_PASSWORD": "repo-pw-123",
            "AWS_ACCESS_KEY_ID": "AKIA",
            "AWS_SECRET_ACCESS_KEY": "aws-secret-456",
            "TimeInterval": 120
        },
        "snapshotProperties": {"retention": {"number": 5}}
    }));
    let p = client.get_profile(&id, &cancel).await.unwrap();
    assert!(p.json()["provisioningProperties"]["dataStorage"].is_object(), "Go always writes nested structs");
    let pp = profile_policy(&p).unwrap();
    assert_eq!(pp.schedule.unwrap().interval_seconds, Some(120));
    assert_eq!(pp.retention.keep_last, Some(5));
    assert_eq!(pp.repository.password.unwrap().expose(), "repo-pw-123");
    assert!(!format!("{p:?}").contains("repo-pw-123"));

    // An operator changes the interval in SODA; the next read sees it.
    let mut changed = soda.profiles().into_iter().find(|x| x["id"] == id.as_str()).unwrap();
    changed["customProperties"]["TimeInterval"] = json!("900");
    soda.put_profile(changed);
    let pp = profile_policy(&client.get_profile(&id, &cancel).await.unwrap()).unwrap();
    assert_eq!(pp.schedule.unwrap().interval_seconds, Some(900));

    assert!(soda.delete_profile(&id));
    let e = client.get_profile(&id, &cancel).await.unwrap_err();
    assert_eq!(e.kind(), "soda_not_found", "{e}");
    assert!(!e.is_transient());
}

#[tokio::test]
async fn the_stand_in_keeps_sodas_own_status_codes_and_quirks() {
    let soda = SodaStandin::start(StandinAuth::NoAuth).await;
    let http = reqwest::Client::new();
    let base = format!("{}/v1beta/{DEFAULT_TENANT_ID}", soda.url());
    let send = |req: reqwest::RequestBuilder| async move {
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap_or(serde_json::Value::Null);
        (status, body)
    };
    // Swagger validation: size is required.
    let (s, b) = send(http.post(format!("{base}/block/volumes")).json(&json!({"name": "a"}))).await;
    assert_eq!((s, b["code"].as_i64()), (400, Some(400)), "{b}");
    // Profile create answers 200, not 201; the name is unique.
    let gold = json!({"name": "gold", "storageType": "block"});
    let (s, p) = send(http.post(format!("{base}/profiles")).json(&gold)).await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(send(http.post(format!("{base}/profiles")).json(&gold)).await.0, 400);
    let pid = p["id"].as_str().unwrap().to_string();
    // Upstream's customProperties POST trips over its own unique-name check.
    let (s, b) = send(http.post(format!("{base}/profiles/{pid}/customProperties")).json(&json!({"k": "v"}))).await;
    assert_eq!(s, 500);
    assert!(b["message"].as_str().unwrap().contains("already exists"), "{b}");
    // PUT merges customProperties instead.
    let (s, b) = send(http.put(format!("{base}/profiles/{pid}")).json(&json!({"customProperties": {"k": "v"}}))).await;
    assert_eq!((s, &b["customProperties"]), (200, &json!({"k": "v"})));
    // A profile with volumes cannot go.
    let (s, _) =
        send(http.post(format!("{base}/block/volumes")).json(&json!({"name": "a", "size": 1, "profileId": pid}))).await;
    assert_eq!(s, 202);
    assert_eq!(send(http.delete(format!("{base}/profiles/{pid}"))).await.0, 400);
    // Another tenant sees nothing in noauth mode; the admin tenant sees all.
    let (s, other) = send(http.get(format!("{}/v1beta/tenant-b/block/volumes", soda.url()))).await;
    assert_eq!((s, other), (200, json!([])));

    let ks = SodaStandin::start(StandinAuth::Keystone(KeystoneUser {
        roles: vec!["member".into()],
        project_name: "team".into(),
        ..KeystoneUser::admin(PASSWORD)
    }))
    .await;
    let login = json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {"name": "admin", "domain": {"id": "default"}, "password": PASSWORD}}},
        "scope": {"project": {"name": "team", "domain": {"id": "default"}}}
    }});
    let r = http.post(format!("{}/v3/auth/tokens", ks.keystone_url())).json(&login).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let token = r.headers()["x-subject-token"].to_str().unwrap().to_string();
    let project = ks.project_id().unwrap();
    let with = |req: reqwest::RequestBuilder| req.header("X-Auth-Token", token.clone());
    let kbase = format!("{}/v1beta/{project}", ks.url());
    assert_eq!(send(with(http.get(format!("{kbase}/block/volumes")))).await.0, 200);
    // Not an admin: profile writes and other tenants' URLs are refused.
    let (s, b) =
        send(with(http.post(format!("{kbase}/profiles")).json(&json!({"name": "x", "storageType": "block"})))).await;
    assert_eq!((s, b["message"].as_str()), (403, Some("operation is not permitted")));
    assert_eq!(send(with(http.get(format!("{}/v1beta/{DEFAULT_TENANT_ID}/block/volumes", ks.url())))).await.0, 403);
    ks.expire_tokens();
    assert_eq!(send(with(http.get(format!("{kbase}/block/volumes")))).await.0, 401);
}
