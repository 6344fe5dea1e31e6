//! Trust on a hostile network, against the real server on 127.0.0.1:0 with
//! real certificates (made by `contactd tls init/issue` and by openssl):
//! TLS and mTLS (the certificate's name as an identity nobody can forge,
//! openssl-made certificates, a grpcio client), certificate reload, acks only from whom a
//! task went to, named tokens and their roles, the `tls` and `token`
//! commands, and the budgets that keep half-open connections and unfinished
//! messages from locking agents out.

use crate::common;

use std::{net::SocketAddr, path::Path, process::Command, sync::Arc, time::Duration};

use common::{
    LIMIT, TestServer,
    fleet::{TestAgent, agent_config, connected, failed},
    submit, within, within_for,
};
use contactd::{
    auth::Role,
    config::{ClientAuth, Config, DeliveryMode, ServerTlsConfig},
    proto::{
        AGENT_HEADER,
        admin::{ListTasksRequest, TaskState},
        contact::{CmdRequest, Empty, Result as ResultMsg, contact_client::ContactClient},
    },
    tls::{ClientTls, pki},
};
use tokio::io::AsyncReadExt;
use tonic::{
    Code, Request,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A CA, a server certificate and agent certificates `names`, in `dir`.
fn make_pki(dir: &Path, names: &[&str]) {
    pki::init(dir, &[], &[], 30, false).unwrap();
    for name in names {
        pki::issue(dir, name, 30, false, None).unwrap();
    }
}

fn tls_server(dir: &Path, client_auth: ClientAuth) -> Config {
    let mut config = Config::default();
    config.tasks.batch = 0;
    let tls = format!(
        "cert = {:?}\nkey = {:?}\n{}client_auth = {:?}\n",
        dir.join("server.pem"),
        dir.join("server.key"),
        if client_auth == ClientAuth::None {
            String::new()
        } else {
            format!("client_ca = {:?}\n", dir.join("ca.pem"))
        },
        format!("{client_auth:?}").to_lowercase(),
    );
    config.server.tls = Some(toml::from_str::<ServerTlsConfig>(&tls).unwrap());
    config
}

fn client_tls(ca: &Path, identity: Option<(&Path, &str)>) -> ClientTls {
    ClientTls {
        ca: Some(ca.to_owned()),
        cert: identity.map(|(dir, name)| dir.join(format!("{name}.pem"))),
        key: identity.map(|(dir, name)| dir.join(format!("{name}.key"))),
        ..ClientTls::default()
    }
}

async fn tls_channel(addr: SocketAddr, tls: &ClientTls) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(LIMIT);
    let settings = contactd::tls::for_url(endpoint.uri(), tls).map_err(|e| e.to_string())?;
    within("TLS connect", contactd::tls::connect(endpoint, settings))
        .await
        .map_err(|e| format!("{e:?}"))
}

/// A health check over `channel`: Ok if SERVING.
async fn health(channel: Channel) -> Result<(), tonic::Status> {
    let request = HealthCheckRequest {
        service: String::new(),
    };
    within("health", HealthClient::new(channel).check(request))
        .await
        .map(drop)
}

fn named<T>(message: T, name: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(AGENT_HEADER, name.parse().unwrap());
    request
}

fn with_token<T>(mut request: Request<T>, token: &str) -> Request<T> {
    let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

/// Whether a TLS client with `tls` can make a call (a health check).
async fn can_call(addr: SocketAddr, tls: &ClientTls) -> bool {
    match tls_channel(addr, tls).await {
        Ok(channel) => health(channel).await.is_ok(),
        Err(_) => false,
    }
}

// ---- mTLS: the certificate's name is the identity; no valid one, no handshake ----

#[tokio::test]
async fn mtls_calls_pass_and_the_certificate_name_is_the_identity() {
    let pki_dir = tempfile::tempdir().unwrap();
    let dir = pki_dir.path();
    make_pki(dir, &["web1"]);
    let server = TestServer::start(tls_server(dir, ClientAuth::Require)).await;
    let channel = tls_channel(
        server.addr,
        &client_tls(&dir.join("ca.pem"), Some((dir, "web1"))),
    )
    .await
    .unwrap();
    health(channel.clone()).await.unwrap();
    let mut client = ContactClient::new(channel);

    // No header: the certificate's name. The same name in the header: fine.
    let mut tasks = client.get_task(Empty {}).await.unwrap().into_inner();
    let mut admin = server.admin().await;
    let id = submit(&mut admin, "hello", "web1").await;
    let task = within("a task", tasks.message()).await.unwrap().unwrap();
    assert_eq!((task.id, task.task.as_str()), (id, "hello"));
    let mut again = client
        .get_task(named(Empty {}, "web1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        within("replay", again.message()).await.unwrap().unwrap().id,
        id
    );

    // A header that disagrees with the certificate is refused.
    let err = client.get_task(named(Empty {}, "web2")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("\"web1\""), "{err:?}");

    let agents = common::agents(&mut admin).await;
    let names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["web1"], "both streams are one agent");
    server.stop().await;
}

#[tokio::test]
async fn handshakes_without_a_valid_client_certificate_are_refused() {
    let pki_dir = tempfile::tempdir().unwrap();
    let dir = pki_dir.path();
    make_pki(dir, &["web1"]);
    let other = tempfile::tempdir().unwrap();
    make_pki(other.path(), &["web1"]);
    let expired = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("ca.pem"), expired.path().join("ca.pem")).unwrap();
    std::fs::copy(dir.join("ca.key"), expired.path().join("ca.key")).unwrap();
    issue_expired(expired.path(), "web1");

    let server = TestServer::start(tls_server(dir, ClientAuth::Require)).await;
    let ca = dir.join("ca.pem");
    for (what, tls) in [
        ("no client certificate", client_tls(&ca, None)),
        (
            "a certificate from another CA",
            client_tls(&ca, Some((other.path(), "web1"))),
        ),
        (
            "an expired certificate",
            client_tls(&ca, Some((expired.path(), "web1"))),
        ),
    ] {
        assert!(!can_call(server.addr, &tls).await, "{what} was let in");
    }
    // Trusting another CA, the client refuses the server.
    let err = tls_channel(server.addr, &client_tls(&other.path().join("ca.pem"), None))
        .await
        .unwrap_err();
    // Both CAs have the same name: the signature is what fails.
    assert!(
        err.contains("invalid peer certificate: BadSignature"),
        "{err}"
    );
    assert!(err.contains("not signed by a trusted CA"), "{err}");
    // Plaintext against the TLS port.
    let plain = within(
        "plaintext connect",
        Endpoint::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect(),
    )
    .await;
    if let Ok(channel) = plain {
        assert!(health(channel).await.is_err(), "plaintext was answered");
    }
    // The server still serves a good client.
    assert!(can_call(server.addr, &client_tls(&ca, Some((dir, "web1")))).await);
    server.stop().await;
}

/// An agent certificate that expired yesterday, signed by the CA in `dir`.
fn issue_expired(dir: &Path, name: &str) {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};
    let issuer = contactd::tls::pki::ca_issuer(dir).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = vec![SanType::DnsName(name.to_owned().try_into().unwrap())];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(10);
    params.not_after = now - time::Duration::days(1);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

// ---- certificates made by openssl work too ----

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client
/// certificate with only a CN, all made by openssl.
fn openssl_pki(dir: &Path, client: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "30",
        "-subj",
        "/CN=openssl test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (stem, subject, ext) in [
        ("server", "/CN=localhost".to_owned(), "server.ext"),
        (client, format!("/CN={client}"), "client.ext"),
    ] {
        let (key, csr, pem) = (
            format!("{stem}.key"),
            format!("{stem}.csr"),
            format!("{stem}.pem"),
        );
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "30",
                "-extfile",
                ext,
            ],
        );
    }
}

#[tokio::test]
async fn certificates_made_by_openssl_work_too() {
    let pki_dir = tempfile::tempdir().unwrap();
    let dir = pki_dir.path();
    openssl_pki(dir, "web9");
    let server = TestServer::start(tls_server(dir, ClientAuth::Require)).await;
    let channel = tls_channel(
        server.addr,
        &client_tls(&dir.join("ca.pem"), Some((dir, "web9"))),
    )
    .await
    .unwrap();
    let mut client = ContactClient::new(channel);
    // The CN is the identity when there is no subjectAltName.
    client.get_task(named(Empty {}, "web9")).await.unwrap();
    let err = client.get_task(named(Empty {}, "web1")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    server.stop().await;
}

// ---- certificate reload: new handshakes get it, open streams carry on ----

#[tokio::test]
async fn a_reloaded_certificate_serves_new_handshakes_while_open_streams_flow() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    make_pki(a.path(), &[]);
    make_pki(b.path(), &[]);
    // The server's files, first A's.
    let live = tempfile::tempdir().unwrap();
    let copy = |from: &Path, stems: &[&str]| {
        for stem in stems {
            std::fs::copy(from.join(stem), live.path().join(stem)).unwrap();
        }
    };
    copy(a.path(), &["server.pem", "server.key", "ca.pem"]);
    let config = tls_server(live.path(), ClientAuth::None);
    let server = TestServer::start(config.clone()).await;
    let (trust_a, trust_b) = (
        client_tls(&a.path().join("ca.pem"), None),
        client_tls(&b.path().join("ca.pem"), None),
    );
    let old = tls_channel(server.addr, &trust_a).await.unwrap();
    let mut stream = ContactClient::new(old)
        .get_task(named(Empty {}, "keeper"))
        .await
        .unwrap()
        .into_inner();

    // Rotate to B's certificate, then reload.
    copy(b.path(), &["server.pem", "server.key"]);
    server.config.send_replace(Arc::new(config.clone()));
    within("the new certificate", async {
        while !can_call(server.addr, &trust_b).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        !can_call(server.addr, &trust_a).await,
        "A's certificate is gone"
    );
    // The stream opened before the reload goes on.
    let mut admin = server.admin().await;
    let id = submit(&mut admin, "after rotation", "").await;
    assert_eq!(
        within("a task", stream.message())
            .await
            .unwrap()
            .unwrap()
            .id,
        id
    );

    // A key that does not match, then an unreadable file: B stays in force.
    std::fs::copy(a.path().join("server.key"), live.path().join("server.key")).unwrap();
    server.config.send_replace(Arc::new(config.clone()));
    std::fs::remove_file(live.path().join("server.pem")).unwrap();
    server.config.send_replace(Arc::new(config));
    let mut admin = server.admin().await; // the reloads have been applied in order
    submit(&mut admin, "sync", "").await;
    assert!(
        can_call(server.addr, &trust_b).await,
        "the old pair stays in force"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_uses_its_replaced_certificate_at_the_next_reconnect() {
    let good = tempfile::tempdir().unwrap();
    make_pki(good.path(), &["web1"]);
    let wrong = tempfile::tempdir().unwrap();
    make_pki(wrong.path(), &["web1"]);
    let mut server_config = tls_server(good.path(), ClientAuth::Require);
    server_config.tasks.batch = 0;
    let server = TestServer::start(server_config).await;

    // The agent's files: a certificate the server does not trust, at first.
    let files = tempfile::tempdir().unwrap();
    let put = |from: &Path| {
        for stem in ["web1.pem", "web1.key"] {
            std::fs::copy(from.join(stem), files.path().join(stem)).unwrap();
        }
    };
    put(wrong.path());
    let mut config = agent_config(server.addr, "web1");
    config.servers = vec![format!("https://{}", server.addr)];
    config.tls.ca = Some(good.path().join("ca.pem"));
    config.tls.cert = Some(files.path().join("web1.pem"));
    config.tls.key = Some(files.path().join("web1.key"));
    let mut agent = TestAgent::start(config);
    agent.wait_for("a refused attempt", failed).await;

    put(good.path());
    agent
        .wait_for("connected with the new certificate", connected)
        .await;
    let mut admin = server.admin().await;
    within("web1 in the roster", async {
        loop {
            let agents = common::agents(&mut admin).await;
            if agents.iter().any(|a| a.name == "web1" && a.connected) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    agent.stop().await;
    server.stop().await;
}

// ---- acks: only from the agent a task was delivered to ----

/// Acks for `ids` as `name` (or anonymously), on their own connection.
async fn forge_acks(server: &TestServer, name: Option<&str>, ids: impl Iterator<Item = u64>) {
    let results: Vec<ResultMsg> = ids
        .map(|id| ResultMsg {
            ret: "forged".into(),
            task_id: id,
            ..ResultMsg::default()
        })
        .collect();
    let request = tokio_stream::iter(results);
    let request = match name {
        Some(name) => named(request, name),
        None => Request::new(request),
    };
    server.client().await.tell_result(request).await.unwrap();
}

async fn task_states(server: &TestServer) -> Vec<(u64, TaskState)> {
    let mut admin = server.admin().await;
    let tasks = admin
        .list_tasks(ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tasks;
    tasks.iter().map(|t| (t.id, t.state())).collect()
}

#[tokio::test]
async fn forged_broadcast_acks_change_nothing_and_the_real_agent_still_gets_its_tasks() {
    let mut config = Config::default();
    config.tasks.batch = 0;
    let server = TestServer::start(config).await;
    let mut admin = server.admin().await;
    let first = submit(&mut admin, "one", "").await;
    let mut client = server.client().await;
    let mut tasks = client
        .get_task(named(Empty {}, "web2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        within("task one", tasks.message())
            .await
            .unwrap()
            .unwrap()
            .id,
        first
    );

    // Future ids under web2's name, ids meant for another agent, anonymous acks.
    forge_acks(&server, Some("web2"), first + 1..first + 1001).await;
    let other = submit(&mut admin, "for web1", "web1").await;
    forge_acks(&server, Some("web2"), [other].into_iter()).await;
    forge_acks(&server, None, [first].into_iter()).await;

    let next = submit(&mut admin, "two", "").await;
    assert_eq!(
        within("task two", tasks.message())
            .await
            .unwrap()
            .unwrap()
            .id,
        next
    );
    let states = task_states(&server).await;
    assert!(
        states.iter().all(|(_, s)| *s != TaskState::Acked),
        "a forged ack was applied: {states:?}"
    );
    // web2's own ack of a task it got is applied.
    forge_acks(&server, Some("web2"), [next].into_iter()).await;
    let states = task_states(&server).await;
    assert!(states.contains(&(next, TaskState::Acked)), "{states:?}");
    let web2 = common::agent(&mut admin, "web2").await;
    assert_eq!(web2.refused_acks, 1001, "{web2:?}");
    server.stop().await;
}

#[tokio::test]
async fn forged_queue_acks_leave_the_task_with_its_holder() {
    let mut config = Config::default();
    config.tasks.batch = 0;
    config.tasks.mode = DeliveryMode::Queue;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let mut tasks = client
        .get_task(named(Empty {}, "web1"))
        .await
        .unwrap()
        .into_inner();
    let mut admin = server.admin().await;
    let id = submit(&mut admin, "work", "").await;
    assert_eq!(
        within("the task", tasks.message())
            .await
            .unwrap()
            .unwrap()
            .id,
        id
    );

    forge_acks(&server, None, [id].into_iter()).await;
    forge_acks(&server, Some("web2"), [id].into_iter()).await;
    assert_eq!(task_states(&server).await, [(id, TaskState::Delivered)]);
    forge_acks(&server, Some("web1"), [id].into_iter()).await;
    assert_eq!(task_states(&server).await, [(id, TaskState::Acked)]);
    server.stop().await;
}

// ---- tokens: named identities and their roles ----

/// A token removed from the tokens file ends, at the reload, the open
/// streams of the agent that held it (UNAUTHENTICATED, within a second),
/// and its next call is refused; another agent's stream goes on.
#[tokio::test]
async fn a_reload_that_revokes_a_token_ends_its_open_streams() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    let web1 = contactd::auth::create_token(&file, "web1", Role::Agent, false).unwrap();
    let web2 = contactd::auth::create_token(&file, "web2", Role::Agent, false).unwrap();
    let mut config = Config::default();
    config.tasks.batch = 0;
    config.server.tokens_file = Some(file.clone());
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let mut revoked = client
        .get_task(with_token(Request::new(Empty {}), &web1))
        .await
        .unwrap()
        .into_inner();
    let mut kept = client
        .get_task(with_token(Request::new(Empty {}), &web2))
        .await
        .unwrap()
        .into_inner();
    // web1's line removed: the file as `token create` wrote it, less one.
    let lines: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .filter(|line| !line.starts_with("web1 "))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    std::fs::write(&file, lines.concat()).unwrap();
    server.reload(|_| {});
    let ended = within_for(
        Duration::from_secs(5),
        "web1's stream to end",
        revoked.message(),
    )
    .await
    .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("revoked"), "{ended:?}");
    let refused = client
        .get_task(with_token(Request::new(Empty {}), &web1))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // web2's stream is still open: a task submitted now reaches it.
    let mut admin = server.admin().await;
    submit(&mut admin, "after the revocation", "").await;
    let task = within("web2's task", kept.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(task.task, "after the revocation");
    server.stop().await;
}

/// Queue mode: a task in flight at an agent whose token a reload revokes
/// goes back to the queue and reaches another agent.
#[tokio::test]
async fn a_revoked_agents_queue_claims_go_back_to_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    let web1 = contactd::auth::create_token(&file, "web1", Role::Agent, false).unwrap();
    let mut config = Config::default();
    config.tasks.batch = 0;
    config.tasks.mode = DeliveryMode::Queue;
    config.server.tokens_file = Some(file.clone());
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let mut admin = server.admin().await;
    let mut holder = client
        .get_task(with_token(Request::new(Empty {}), &web1))
        .await
        .unwrap()
        .into_inner();
    let id = submit(&mut admin, "held", "").await;
    let held = within("web1's task", holder.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.id, id);
    // web1 revoked, web2 added, in one reload.
    std::fs::write(&file, "").unwrap();
    let web2 = contactd::auth::create_token(&file, "web2", Role::Agent, false).unwrap();
    server.reload(|_| {});
    let ended = within_for(
        Duration::from_secs(5),
        "web1's stream to end",
        holder.message(),
    )
    .await
    .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    let mut taker = client
        .get_task(with_token(Request::new(Empty {}), &web2))
        .await
        .unwrap()
        .into_inner();
    let again = within("the task at web2", taker.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.id, id);
    server.stop().await;
}

/// A tokens file emptied (truncated to 0 bytes) and reloaded keeps the
/// tokens in force: the operator's token still runs commands, a call
/// without one is still refused.
#[tokio::test]
async fn an_emptied_tokens_file_at_reload_keeps_the_tokens_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    let ops = contactd::auth::create_token(&file, "ops", Role::Operator, false).unwrap();
    let mut config = common::with_commands(&["true"]);
    config.tasks.batch = 0;
    config.server.tokens_file = Some(file.clone());
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let cmd = || CmdRequest {
        index: 1,
        cmd_str: "true".into(),
        log: String::new(),
    };
    std::fs::write(&file, "").unwrap();
    // A reload (the server re-reads its credentials at each one, before
    // its rules), which also allows `false`: once `false` runs, the
    // credentials were re-read.
    server.reload(|config| config.remote_cmd.allow.push("false".parse().unwrap()));
    let run_false = || CmdRequest {
        cmd_str: "false".into(),
        ..cmd()
    };
    let answer = common::until(
        "the reload to apply",
        || {
            let (mut client, ops) = (client.clone(), ops.clone());
            async move {
                client
                    .remote_cmd(with_token(Request::new(run_false()), &ops))
                    .await
                    .map(drop)
            }
        },
        |answer| !matches!(answer, Err(e) if e.code() == Code::PermissionDenied),
    )
    .await;
    if let Err(e) = answer {
        panic!("the emptied tokens file was taken: {e:?}");
    }
    let ok = client
        .remote_cmd(with_token(Request::new(cmd()), &ops))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.success);
    let err = client.remote_cmd(cmd()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "no token: {err:?}");
    server.stop().await;
}

#[tokio::test]
async fn named_tokens_give_identities_and_roles() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    let web1 = contactd::auth::create_token(&file, "web1", Role::Agent, false).unwrap();
    let ops = contactd::auth::create_token(&file, "ops", Role::Operator, false).unwrap();
    let mut config = common::with_commands(&["true"]);
    config.tasks.batch = 0;
    config.server.tokens_file = Some(file.clone());
    let server = TestServer::start(config.clone()).await;
    let mut client = server.client().await;
    let cmd = || CmdRequest {
        index: 1,
        cmd_str: "true".into(),
        log: String::new(),
    };

    let err = client.remote_cmd(cmd()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "no token: {err:?}");
    let err = client
        .remote_cmd(with_token(Request::new(cmd()), &web1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "agent token: {err:?}");
    assert!(err.message().contains("operator role"), "{err:?}");
    let ok = client
        .remote_cmd(with_token(Request::new(cmd()), &ops))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.success);
    let err = client
        .get_task(with_token(Request::new(Empty {}), &ops))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "operator getTask: {err:?}"
    );
    let err = client
        .get_task(with_token(named(Empty {}, "web2"), &web1))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "header not the token's: {err:?}"
    );
    client
        .get_task(with_token(named(Empty {}, "web1"), &web1))
        .await
        .unwrap();
    let err = client
        .get_task(with_token(Request::new(Empty {}), "ctd_0000"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        !err.message().contains("ctd_0000"),
        "the token is echoed: {err:?}"
    );

    // A replaced token revokes the old one at the reload; a tokens file
    // that disappears keeps the tokens in force.
    let new = contactd::auth::create_token(&file, "web1", Role::Agent, true).unwrap();
    server.config.send_replace(Arc::new(config.clone()));
    within("the old token to stop working", async {
        loop {
            let call = client
                .get_task(with_token(Request::new(Empty {}), &web1))
                .await;
            if call.is_err_and(|e| e.code() == Code::Unauthenticated) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    std::fs::remove_file(&file).unwrap();
    server.config.send_replace(Arc::new(config));
    client
        .get_task(with_token(Request::new(Empty {}), &new))
        .await
        .unwrap();
    server.stop().await;
}

// ---- the `tls` and `token` commands; check-config's public-port warning ----

fn contactd(args: &[&str]) -> std::process::Output {
    common::contactd().args(args).output().unwrap()
}

/// A plaintext probe at a TLS port says that the server speaks TLS (tonic
/// says only "transport error"); one at a plaintext server's closed port
/// says no such thing.
#[tokio::test]
async fn a_plaintext_probe_at_a_tls_port_says_the_server_speaks_tls() {
    let pki_dir = tempfile::tempdir().unwrap();
    make_pki(pki_dir.path(), &[]);
    let server = TestServer::start(tls_server(pki_dir.path(), ClientAuth::Request)).await;
    let addr = server.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        contactd(&["health", "--addr", &addr, "--timeout", "5s"])
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(matches!(out.status.code(), Some(2 | 3)), "{out:?}");
    assert!(said.contains("speaks TLS: add --tls"), "{said}");
    server.stop().await;

    let closed = common::fleet::reserve_port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        contactd(&["health", "--addr", &closed, "--timeout", "2s"])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("speaks TLS"),
        "{out:?}"
    );
}

/// `contactd cmd -c` reaches a server whose config has `[server.tls]` over
/// TLS (verified against its `client_ca`, which `tls init` made sign the
/// server's certificate too), and `--token-file` carries an operator token
/// to a server that requires one.
#[tokio::test]
async fn cmd_with_the_servers_config_speaks_tls_and_carries_its_token() {
    let pki_dir = tempfile::tempdir().unwrap();
    let dir = pki_dir.path().to_owned();
    make_pki(&dir, &[]);
    let tokens = dir.join("tokens");
    let ops = contactd::auth::create_token(&tokens, "ops", Role::Operator, false).unwrap();
    let token_file = dir.join("ops.token");
    std::fs::write(&token_file, format!("{ops}\n")).unwrap();
    let mut config = tls_server(&dir, ClientAuth::Request);
    config.server.tokens_file = Some(tokens);
    config.remote_cmd = common::with_commands(&["true"]).remote_cmd;
    let server = TestServer::start(config).await;
    // What `cmd -c` reads of the server's config: its listen and TLS.
    let file = dir.join("contactd.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = \"{}\"\n[server.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            server.addr,
            dir.join("server.pem"),
            dir.join("server.key"),
            dir.join("ca.pem"),
        ),
    )
    .unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let (config_arg, token_arg, addr) = (path(&file), path(&token_file), server.addr.to_string());
    let out = tokio::task::spawn_blocking(move || {
        let with_token = contactd(&["cmd", "-c", &config_arg, "--token-file", &token_arg, "true"]);
        let without = contactd(&["cmd", "-c", &config_arg, "true"]);
        let plaintext = contactd(&["cmd", "--addr", &addr, "--token-file", &token_arg, "true"]);
        (with_token, without, plaintext)
    })
    .await
    .unwrap();
    let (with_token, without, plaintext) = out;
    assert_eq!(with_token.status.code(), Some(0), "{with_token:?}");
    assert!(
        String::from_utf8_lossy(&with_token.stdout).contains("[1] ok: true"),
        "{with_token:?}"
    );
    assert_eq!(without.status.code(), Some(1), "{without:?}");
    assert!(
        String::from_utf8_lossy(&without.stdout).contains("UNAUTHENTICATED")
            || String::from_utf8_lossy(&without.stdout).contains("Unauthenticated"),
        "{without:?}"
    );
    assert_ne!(plaintext.status.code(), Some(0), "{plaintext:?}");
    server.stop().await;
}

#[test]
fn the_pki_and_token_commands_write_what_they_say() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let out = contactd(&[
        "tls",
        "init",
        &path(&tls),
        "--dns",
        "server.example",
        "--ip",
        "127.0.0.1",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = contactd(&["tls", "issue", "web1", "--dir", &path(&tls)]);
    assert!(out.status.success(), "{out:?}");
    for key in ["ca.key", "server.key", "web1.key"] {
        let mode = std::fs::metadata(tls.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let out = contactd(&["tls", "issue", "web1", "--dir", &path(&tls)]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--force"),
        "{out:?}"
    );
    let out = contactd(&["tls", "init", &path(&tls)]);
    assert!(!out.status.success(), "init does not overwrite");
    // --group: the key readable by that group (the packaged agent's), 0640.
    let group = nix::unistd::Group::from_gid(nix::unistd::getegid())
        .unwrap()
        .expect("the test's own group has a name");
    let out = contactd(&[
        "tls",
        "issue",
        "web2",
        "--dir",
        &path(&tls),
        "--group",
        &group.name,
    ]);
    assert!(out.status.success(), "{out:?}");
    let key = std::fs::metadata(tls.join("web2.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o640);
    assert_eq!(
        std::os::unix::fs::MetadataExt::gid(&key),
        group.gid.as_raw()
    );
    let out = contactd(&[
        "tls",
        "issue",
        "web3",
        "--dir",
        &path(&tls),
        "--group",
        "no-such-group-here",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no group"),
        "{out:?}"
    );
    assert!(
        !tls.join("web3.key").exists(),
        "a misspelt group writes nothing"
    );
    let der = std::fs::read(tls.join("web1.pem")).unwrap();
    use rustls_pki_types::pem::PemObject;
    let cert = rustls_pki_types::CertificateDer::from_pem_slice(&der).unwrap();
    assert_eq!(contactd::tls::identity(&cert).as_deref(), Some("web1"));

    let tokens = dir.path().join("tokens");
    let out = contactd(&[
        "token",
        "create",
        "ops",
        "--role",
        "operator",
        "--file",
        &path(&tokens),
    ]);
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    let stored = std::fs::read_to_string(&tokens).unwrap();
    assert!(!stored.contains(token.trim()) && stored.starts_with("ops operator sha256:"));
    let out = contactd(&[
        "token",
        "create",
        "ops",
        "--role",
        "root",
        "--file",
        &path(&tokens),
    ]);
    assert_eq!(out.status.code(), Some(2), "a bad role is a usage error");
}

#[test]
fn check_config_warns_about_a_public_port_without_identities() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "[server]\nlisten = \"0.0.0.0:55555\"\n").unwrap();
    let out = contactd(&["check-config", "-c", config.to_str().unwrap()]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: server.listen = 0.0.0.0:55555 is beyond loopback"),
        "{stderr}"
    );
    std::fs::write(
        &config,
        "[server]\nlisten = \"0.0.0.0:55555\"\ntokens_file = \"/x\"\n",
    )
    .unwrap();
    let out = contactd(&["check-config", "-c", config.to_str().unwrap()]);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{out:?}"
    );
}

// ---- another client library: grpcio over mTLS ----

/// The seed's own client library (grpcio) over mTLS, with
/// `ssl_channel_credentials`, against `contactd serve`.
#[test]
fn grpcio_speaks_mtls_to_contactd() {
    let has_grpcio = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_grpcio {
        // .ci/run installs grpcio: CI never takes this branch.
        assert!(std::env::var_os("CI").is_none(), "CI must have grpcio");
        eprintln!("skipped: python3 with grpcio and grpcio-tools is not installed");
        return;
    }
    let pki_dir = tempfile::tempdir().unwrap();
    let dir = pki_dir.path();
    make_pki(dir, &["pyagent"]);
    let server = format!(
        "[tasks]\nbatch = 0\n[server.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
        dir.join("server.pem"),
        dir.join("server.key"),
        dir.join("ca.pem")
    );
    let daemon = common::daemon::Daemon::start(&server);
    let script = r#"
import sys, grpc
from grpc_tools import protoc
out = sys.argv[1]
assert protoc.main(["protoc", "-I" + sys.argv[2], "--python_out=" + out, "--grpc_python_out=" + out, "contact.proto"]) == 0
sys.path.insert(0, out)
import contact_pb2, contact_pb2_grpc
d = sys.argv[3]
creds = grpc.ssl_channel_credentials(
    root_certificates=open(d + "/ca.pem", "rb").read(),
    private_key=open(d + "/pyagent.key", "rb").read(),
    certificate_chain=open(d + "/pyagent.pem", "rb").read())
with grpc.secure_channel("localhost:" + sys.argv[4], creds) as channel:
    stub = contact_pb2_grpc.ContactStub(channel)
    replies = stub.sendStatus(iter([contact_pb2.ClientMsg(msg="hello over mtls")]), timeout=10)
    print(next(replies).ret, flush=True)
# grpcio's threads can hang the interpreter's exit (seen once in CI, the
# answer printed, the process left waiting on a futex): leave at once.
import os
os._exit(0)
"#;
    let out_dir = tempfile::tempdir().unwrap();
    let (stdout, stderr) = (out_dir.path().join("stdout"), out_dir.path().join("stderr"));
    let mut child = Command::new("python3")
        .args([
            "-c",
            script,
            out_dir.path().to_str().unwrap(),
            common::daemon::proto_dir().to_str().unwrap(),
            dir.to_str().unwrap(),
            &daemon.addr.port().to_string(),
        ])
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    // Bounded: a client that hangs fails the test instead of holding CI.
    let deadline = std::time::Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (
        std::fs::read_to_string(&stdout).unwrap_or_default(),
        std::fs::read_to_string(&stderr).unwrap_or_default(),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "python3 {status:?}; stdout: {out}; stderr: {err}"
    );
    assert_eq!(out.trim(), "server received: hello over mtls");
}

// ---- budgets: half-open connections and unfinished messages lock no one out ----

#[tokio::test]
async fn half_open_connections_are_closed_and_never_lock_out_agents() {
    let mut config = Config::default();
    config.tasks.batch = 0;
    config.server.max_connections = 100;
    config.server.handshake_timeout = Duration::from_secs(2);
    // Every connection here comes from one address: the global bound is
    // what this test is about (the per-address one has its own test).
    config.server.max_handshakes_per_address = config.server.max_handshakes;
    let server = TestServer::start(config).await;
    // 500 connections: silent, or stopping half-way through the preface.
    let mut idle = Vec::new();
    for i in 0..500 {
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        if i % 2 == 1 {
            tokio::io::AsyncWriteExt::write_all(&mut stream, b"PRI * HTTP/2.0\r\n")
                .await
                .unwrap();
        }
        idle.push(stream);
    }
    // Health answers and an agent gets its tasks meanwhile.
    health(server.channel().await).await.unwrap();
    let mut client = server.client().await;
    client.get_task(named(Empty {}, "web1")).await.unwrap();
    // Each half-open connection is closed by the server.
    for stream in &mut idle {
        let mut byte = [0u8; 1];
        let read = within("the server to close it", stream.read(&mut byte)).await;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    server.stop().await;
}

/// A gRPC channel to `server` whose connection comes from `source` (another
/// loopback address).
fn channel_from(source: std::net::IpAddr, server: SocketAddr) -> Channel {
    let connector = tower::service_fn(move |_: http::Uri| async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(server).await?;
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
    });
    // Lazy: the connection is made by the first call, whose failure the
    // caller sees.
    Endpoint::from_shared(format!("http://{server}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(connector)
}

/// One address holding stalled connections (more than its share of the
/// handshake slots) keeps no one else out: health from another loopback
/// address answers and an agent from a third gets its tasks, while the
/// abusive address's excess connections are closed at once.
#[tokio::test]
async fn one_address_cannot_take_every_handshake_slot() {
    let mut config = Config::default();
    config.tasks.batch = 0;
    config.server.max_handshakes = 100;
    config.server.max_handshakes_per_address = 32;
    config.server.handshake_timeout = Duration::from_secs(30);
    let server = TestServer::start(config).await;
    // 150 silent connections from 127.0.0.1: more than every slot there is.
    let mut stalled = Vec::new();
    for _ in 0..150 {
        stalled.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    // While 32 of them hold their slots (until the timeout, 30 s), health
    // from another address answers and an agent from a third gets in.
    let other: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    health(channel_from(other, server.addr)).await.unwrap();
    let third: std::net::IpAddr = "127.0.0.3".parse().unwrap();
    let mut client = ContactClient::new(channel_from(third, server.addr));
    within(
        "an agent's getTask",
        client.get_task(named(Empty {}, "web1")),
    )
    .await
    .unwrap();
    // The abusive address's excess was closed soon, not at the timeout:
    // in plaintext, after a moment to read an UNAVAILABLE with a retry hint
    // (its HTTP/2 SETTINGS come first), which a peer that sends nothing
    // never asks for.
    for stream in &mut stalled[32..] {
        let mut buf = [0u8; 256];
        let closed = within_for(
            Duration::from_secs(10),
            "an excess connection to be closed",
            async {
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            },
        );
        closed.await;
    }
    drop(stalled);
    server.stop().await;
}

/// Health answers, and an agent gets its stream, on a new connection.
async fn still_served(addr: SocketAddr) {
    let channel = within(
        "connect",
        Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    health(channel.clone()).await.unwrap();
    ContactClient::new(channel)
        .get_task(named(Empty {}, "web1"))
        .await
        .unwrap();
}

/// A Contact call's request headers for a raw HTTP/2 client: `method`, as
/// the agent `agent`.
fn contact_request(addr: SocketAddr, method: &str, agent: &str) -> http::Request<()> {
    http::Request::post(format!("http://{addr}/Contact/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header(AGENT_HEADER, agent)
        .body(())
        .unwrap()
}

/// The server's resident memory, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Opens `streams` tellResult calls on a new connection and sends on each
/// an unfinished message just under `size`. Returns the open streams, which
/// keep their messages unfinished until dropped, and their responses.
async fn open_unfinished(
    addr: SocketAddr,
    streams: usize,
    size: usize,
) -> (
    Vec<h2::SendStream<bytes::Bytes>>,
    Vec<h2::client::ResponseFuture>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut open = Vec::new();
    let mut responses = Vec::new();
    for _ in 0..streams {
        sender = within("stream capacity", sender.ready()).await.unwrap();
        let request = contact_request(addr, "tellResult", "hog");
        let (response, mut body) = sender.send_request(request, false).unwrap();
        let mut data = vec![0u8; 5 + size - 16];
        data[1..5].copy_from_slice(&u32::try_from(size).unwrap().to_be_bytes());
        body.send_data(data.into(), false).unwrap();
        open.push(body);
        responses.push(response);
    }
    (open, responses)
}

/// Waits until `refusals` of `responses` are RESOURCE_EXHAUSTED.
async fn refused(responses: Vec<h2::client::ResponseFuture>, refusals: usize) {
    use futures_util::StreamExt;
    let refused = responses
        .into_iter()
        .collect::<futures_util::stream::FuturesUnordered<_>>()
        .filter_map(|response| async move {
            let response = response.ok()?;
            (response.headers().get("grpc-status").map(|v| v.as_bytes()) == Some(b"8"))
                .then_some(())
        })
        .take(refusals)
        .count();
    assert_eq!(within("the refusals", refused).await, refusals);
}

/// [`open_unfinished`], then waits until the server has refused `refusals`
/// of them.
async fn unfinished_messages(
    addr: SocketAddr,
    streams: usize,
    size: usize,
    refusals: usize,
) -> Vec<h2::SendStream<bytes::Bytes>> {
    let (open, responses) = open_unfinished(addr, streams, size).await;
    refused(responses, refusals).await;
    open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_messages_are_held_within_the_memory_budget() {
    let daemon = common::daemon::Daemon::start("[tasks]\nbatch = 0\n");
    let pid = daemon.process.child.id();
    let before = rss_bytes(pid);
    // 2 connections × 256 streams × a result just under its 256KiB limit:
    // 128 MiB if every one were held; a connection may hold 4 MiB, so all
    // but 16 of each connection's streams are refused.
    let limit = 256 * 1024;
    let _a = unfinished_messages(daemon.addr, 256, limit, 256 - 17).await;
    let _b = unfinished_messages(daemon.addr, 256, limit, 256 - 17).await;
    // Health and agents are still served.
    still_served(daemon.addr).await;
    let grown = rss_bytes(pid).saturating_sub(before);
    assert!(grown < 64 << 20, "RSS grew by {} MiB", grown >> 20);
}

/// A queue-mode agent that subscribed and then stopped reading its socket
/// (its windows wide open, its receive buffer small); closed when dropped.
async fn stalled_agent(addr: SocketAddr, name: &str) -> UnreadPeer {
    // Until the server has taken its subscription (a connection may be
    // turned away at server.accept_rate or the per-address handshake cap,
    // and a peer that reads nothing would never know): bounded retries.
    for _ in 0..100 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let (reads, writes) = tokio::io::split(tcp);
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let halves = tokio::io::join(
            Stalled {
                reads,
                stalled: Arc::clone(&stalled),
            },
            writes,
        );
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size((1 << 30) - 1)
            .initial_connection_window_size((1 << 30) - 1)
            .handshake(halves)
            .await
            .unwrap();
        let connection = tokio::spawn(connection);
        let mut sender = within("stream capacity", sender.ready()).await.unwrap();
        let request = contact_request(addr, "getTask", name);
        let (response, mut stream) = sender.send_request(request, false).unwrap();
        stream.send_data(vec![0u8; 5].into(), true).unwrap();
        match within("getTask's headers", response).await {
            // Subscribed (a refusal is trailers-only: it has a status).
            Ok(response) if response.headers().get("grpc-status").is_none() => {
                stalled.store(true, std::sync::atomic::Ordering::Relaxed);
                return UnreadPeer {
                    connection,
                    _sender: sender,
                    _streams: vec![stream],
                    _responses: Vec::new(),
                    _bodies: vec![response.into_body()],
                };
            }
            _ => {
                connection.abort();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    panic!("{name} could not subscribe");
}

/// A reading half that reads until told to stall, then never again (and is
/// never woken).
struct Stalled<R> {
    reads: R,
    stalled: Arc<std::sync::atomic::AtomicBool>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Stalled<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.stalled.load(std::sync::atomic::Ordering::Relaxed) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.reads).poll_read(cx, buf)
    }
}

/// 1,000 queue-mode agents that stop reading while tasks keep coming cost
/// the server at most `server.max_connection_unsent` of queued sends each
/// (hyper's send buffer could hold 400 KiB per stream), and the server goes
/// on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_stalled_agents_cost_at_most_their_send_budget() {
    let template = "t".repeat(8 * 1024);
    let mut daemon = common::daemon::Daemon::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nsocket_send_buffer = \"16KiB\"\n\
         [tasks]\nmode = \"queue\"\nwindow = 1000\nmax_pending = 12000\n\
         ack_timeout = \"1h\"\ninterval = \"10ms\"\nbatch = 1000\ntemplate = \"{template}\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n"
    ));
    let line = daemon.wait_for_line("metrics endpoint listening");
    let metrics: SocketAddr = common::daemon::field(&line, "addr").parse().unwrap();
    let pid = daemon.process.child.id();
    let (agents, budget) = (1000usize, 32 * 1024);
    let mut stalled = Vec::new();
    for i in 0..agents {
        stalled.push(stalled_agent(daemon.addr, &format!("stalled{i}")).await);
    }
    let before = rss_bytes(pid);
    let mut unsent = 0.0;
    within_for(
        Duration::from_secs(120),
        "every agent's budget to fill",
        async {
            loop {
                let text = crate::metrics::scrape(metrics).await;
                unsent = crate::metrics::value(&text, "contactd_unsent_bytes").unwrap();
                if unsent >= (agents * budget) as f64 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    // At most 64 KiB each: the budget and a chunk of tasks.
    assert!(
        unsent <= (agents * 64 * 1024) as f64,
        "{unsent} bytes unsent"
    );
    // The rest of the growth is the tasks themselves, held until acked (at
    // most two copies each: the queue's, and its encoded message): 400
    // KiB of sends per stalled agent would be 400 MiB more.
    let grown = rss_bytes(pid).saturating_sub(before);
    let text = crate::metrics::scrape(metrics).await;
    let published = crate::metrics::value(&text, "contactd_tasks_published_total").unwrap();
    let tasks = published as u64 * 2 * template.len() as u64;
    assert!(
        grown <= tasks + (agents * 64 * 1024) as u64,
        "RSS grew by {} MiB with {published} tasks",
        grown >> 20
    );
    // Still serving (a new connection may be told to come back at its turn
    // at server.accept_rate, as the agents were).
    within("health from a new connection", async {
        loop {
            let channel = Endpoint::from_shared(format!("http://{}", daemon.addr))
                .unwrap()
                .connect_lazy();
            match health(channel).await {
                Ok(()) => return,
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    let hint = contactd::proto::retry_hint(&status);
                    tokio::time::sleep(hint.unwrap_or(Duration::from_millis(100))).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await;
    drop(stalled);
}

/// Anonymous peers holding unfinished messages get half of
/// `server.max_buffered` at most: a known agent's large status still gets
/// in (48 such connections filled the budget, and a real agent's 60 KB
/// status was refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_peers_cannot_take_the_buffer_budget_from_known_agents() {
    let config = "[server]\nmax_buffered = \"1MiB\"\nmax_connection_buffer = \"64KiB\"\n\
                  [tasks]\nbatch = 0\n";
    let daemon = common::daemon::Daemon::start(config);
    // 16 connections of one unfinished 60 KiB message each (960 KiB, under
    // max_buffered): 8 of them are refused, at half of it.
    let size = 60 * 1024;
    let (mut hogs, mut responses) = (Vec::new(), Vec::new());
    for _ in 0..16 {
        let (open, waiting) = open_unfinished(daemon.addr, 1, size).await;
        hogs.push(open);
        responses.extend(waiting);
    }
    refused(responses, 8).await;
    // A known agent (it has sent a whole message) sends a 60 KB status.
    let channel = within(
        "connect",
        Endpoint::from_shared(format!("http://{}", daemon.addr))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    let statuses = vec![
        contactd::proto::contact::ClientMsg {
            msg: "hello".into(),
        },
        contactd::proto::contact::ClientMsg {
            msg: "y".repeat(size),
        },
    ];
    let mut replies = within(
        "the status call",
        ContactClient::new(channel).send_status(named(tokio_stream::iter(statuses), "known")),
    )
    .await
    .unwrap()
    .into_inner();
    for _ in 0..2 {
        let reply = within("a reply", replies.message()).await;
        assert!(matches!(reply, Ok(Some(_))), "{reply:?}");
    }
    drop(hogs);
}

/// One gRPC message of a `ClientMsg` whose status text is `text`.
fn status_message(text: &str) -> bytes::Bytes {
    use prost::Message;
    let msg = contactd::proto::contact::ClientMsg { msg: text.into() };
    let body = msg.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&body);
    framed.into()
}

/// Opens a connection whose own window is wide open (each stream's is the
/// default 64 KiB) and sends `per_stream` statuses of `size` bytes on each
/// of `streams` sendStatus calls, never reading a reply. Returns what keeps
/// the connection open.
async fn unread_status_streams(
    addr: SocketAddr,
    streams: usize,
    per_stream: usize,
    size: usize,
) -> UnreadPeer {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = h2::client::Builder::new()
        .initial_connection_window_size((1 << 30) - 1)
        .handshake(tcp)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let text = "x".repeat(size);
    let mut open = Vec::new();
    let mut responses = Vec::new();
    for _ in 0..streams {
        sender = within("stream capacity", sender.ready()).await.unwrap();
        let request = contact_request(addr, "sendStatus", "unread");
        let (response, mut stream) = sender.send_request(request, false).unwrap();
        for _ in 0..per_stream {
            stream.send_data(status_message(&text), false).unwrap();
        }
        open.push(stream);
        responses.push(response);
    }
    UnreadPeer {
        connection,
        _sender: sender,
        _streams: open,
        _responses: responses,
        _bodies: Vec::new(),
    }
}

/// A connection whose replies are never read; closed when dropped.
struct UnreadPeer {
    connection: tokio::task::JoinHandle<Result<(), h2::Error>>,
    _sender: h2::client::SendRequest<bytes::Bytes>,
    _streams: Vec<h2::SendStream<bytes::Bytes>>,
    _responses: Vec<h2::client::ResponseFuture>,
    _bodies: Vec<h2::RecvStream>,
}

impl Drop for UnreadPeer {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// A peer that sends statuses on many streams and never reads the replies
/// makes the server hold at most `server.max_connection_unsent` of them per
/// connection (it held every reply: 40 connections × 250 streams, 1.29
/// GB); its streams wait, the pause is counted, everyone else is served,
/// and the memory goes when the peer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_nobody_reads_are_held_within_the_send_budget() {
    let mut daemon = common::daemon::Daemon::start(
        "[server]\nlisten = \"127.0.0.1:0\"\n[tasks]\nbatch = 0\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let line = daemon.wait_for_line("metrics endpoint listening");
    let metrics: SocketAddr = common::daemon::field(&line, "addr").parse().unwrap();
    let pid = daemon.process.child.id();
    let before = rss_bytes(pid);
    // 10 connections × 100 streams × 8 statuses of 32 KiB: the replies
    // beyond each stream's 64 KiB window, if all held, 1000 × 192 KiB.
    let (connections, streams, budget) = (10usize, 100usize, 32 * 1024);
    let held_before_the_fix = (connections * streams * 192 * 1024) as u64;
    let mut peers = Vec::new();
    for _ in 0..connections {
        peers.push(unread_status_streams(daemon.addr, streams, 8, 32 * 1024).await);
    }
    // Every connection holds its budget of unsent replies, no more.
    let mut unsent = 0.0;
    within("every connection to reach its budget", async {
        loop {
            let text = crate::metrics::scrape(metrics).await;
            unsent = crate::metrics::value(&text, "contactd_unsent_bytes").unwrap();
            if unsent >= (connections * budget) as f64 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let text = crate::metrics::scrape(metrics).await;
    let paused = crate::metrics::value(&text, "contactd_sends_paused_total").unwrap();
    assert!(paused >= connections as f64, "{text}");
    // A connection's unsent bytes stop within a chunk of its budget (a
    // chunk: at most tonic's 32 KiB and a reply).
    assert!(
        unsent <= (connections * (budget + 72 * 1024)) as f64,
        "{unsent} bytes unsent"
    );
    // Health and an agent are still served.
    still_served(daemon.addr).await;
    let grown = rss_bytes(pid).saturating_sub(before);
    // What is left is the streams' own codec buffers.
    assert!(
        grown < held_before_the_fix / 2,
        "RSS grew by {} MiB",
        grown >> 20
    );
    tokio::task::block_in_place(|| daemon.wait_for_line("a peer is not reading"));
    // The peers leave: nothing is held for them any more.
    drop(peers);
    within("the unsent bytes to go", async {
        loop {
            let text = crate::metrics::scrape(metrics).await;
            if crate::metrics::value(&text, "contactd_unsent_bytes") == Some(0.0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // And the memory goes back (trimmed within ten seconds).
    within("the memory to be returned", async {
        while rss_bytes(pid).saturating_sub(before) > 16 << 20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}

/// A reload that replaces the client CA ends the open streams of the agents
/// whose certificates it no longer trusts (UNAUTHENTICATED, within a
/// second), and refuses their next call on the same connection.
#[tokio::test]
async fn a_reload_that_changes_the_client_ca_ends_the_streams_it_no_longer_trusts() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path(), &["web1"]);
    let other = tempfile::tempdir().unwrap();
    make_pki(other.path(), &[]);
    // The client CA in a file of its own, so that replacing it leaves the
    // CA the agent checks the server against alone.
    let client_ca = dir.path().join("client-ca.pem");
    std::fs::copy(dir.path().join("ca.pem"), &client_ca).unwrap();
    let mut config = tls_server(dir.path(), ClientAuth::Require);
    config.server.tls.as_mut().unwrap().client_ca = Some(client_ca.clone());
    let server = TestServer::start(config).await;
    let tls = client_tls(&dir.path().join("ca.pem"), Some((dir.path(), "web1")));
    let mut client = ContactClient::new(tls_channel(server.addr, &tls).await.unwrap());
    let mut stream = client.get_task(Empty {}).await.unwrap().into_inner();
    let mut admin = server.admin().await;
    submit(&mut admin, "before", "").await;
    assert_eq!(
        within("a task", stream.message())
            .await
            .unwrap()
            .unwrap()
            .task,
        "before"
    );

    std::fs::copy(other.path().join("ca.pem"), &client_ca).unwrap();
    server.reload(|_| {});
    let ended = within_for(
        Duration::from_secs(5),
        "the stream to end",
        stream.message(),
    )
    .await
    .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    let refused = client.get_task(Empty {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("no longer trusted"),
        "{refused:?}"
    );
    // And a new connection with that certificate fails its handshake.
    assert!(
        tls_channel(server.addr, &tls).await.is_err() || {
            let mut client = ContactClient::new(tls_channel(server.addr, &tls).await.unwrap());
            client.get_task(Empty {}).await.is_err()
        }
    );
    server.stop().await;
}

/// One source address holding `server.max_connections_per_address` open
/// connections gets no more; another address (monitoring, an agent) still
/// connects and is served.
#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let mut config = Config::default();
    config.tasks.batch = 0;
    config.server.max_connections = 8;
    config.server.max_connections_per_address = Some(3);
    let server = TestServer::start(config).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut client = server.client().await;
        let stream = client.get_task(Empty {}).await.unwrap().into_inner();
        held.push((client, stream));
    }
    let health = |local: std::net::IpAddr| {
        let addr = server.addr;
        async move {
            let channel = Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .local_address(Some(local))
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(5))
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
                .map(|r| r.into_inner().status)
                .map_err(|e| e.to_string())
        }
    };
    // A fourth from the same address is closed once its handshake is done.
    let refused = within("a fourth connection", health("127.0.0.1".parse().unwrap())).await;
    assert!(refused.is_err(), "{refused:?}");
    // Another address is served.
    let served = within("another address", health("127.0.0.2".parse().unwrap())).await;
    assert_eq!(served, Ok(1), "SERVING");
    // The held ones are still open.
    let mut admin = server.admin().await;
    submit(&mut admin, "still here", "").await;
    for (_, stream) in &mut held {
        let task = within("a held stream's task", stream.message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(task.task, "still here");
    }
    server.stop().await;
}
