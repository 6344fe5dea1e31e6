//! What each path of the console does. Reads go through the admin
//! service's methods (agents, jobs, runs) or the broker (tasks); actions
//! (`actions.rs`) through the admin service's methods only, so the console
//! applies the admin API's checks and nothing else. Before a session, only
//! the login page, the assets and redirects are answered; a session's role
//! is asked again at every request; every action needs the session's CSRF
//! token and a same-origin request, and is logged with the operator's name.

use std::{collections::HashMap, sync::Arc};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use tonic::Request as Call;

use super::{
    Body, Peer, Web, field, full, html, pages, plain, redirect, secure,
    session::{self, Proof, Session},
};
use crate::{
    auth::{Credential, Role},
    model::TaskState,
    proto::admin::{self as pb, admin_server::Admin},
};

/// The one stylesheet and script, compiled in.
const APP_CSS: &str = include_str!("assets/app.css");
const APP_JS: &str = include_str!("assets/app.js");

/// The answer to one request.
pub(super) async fn respond(web: &Web, peer: &Peer, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    // A certificate the client CA in force no longer trusts (a reload
    // replaced it) is refused on a connection opened before, as new
    // connections refuse it at their handshake.
    if let Some(presented) = &peer.presented
        && !web.still_trusted(presented)
    {
        web.refused_logins.hit(|n| {
            tracing::warn!(refused = n, peer = %peer.address, name = %crate::untrusted::shown(peer.certificate.as_deref().unwrap_or("")), "web console: a client certificate server.tls.client_ca no longer trusts was refused");
        });
        let mut response = plain(
            StatusCode::FORBIDDEN,
            "refused: your client certificate is no longer trusted (a reload changed \
             server.tls.client_ca); connect again with one it trusts\n",
        );
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    // Assets and the login page need no session.
    match (&method, path.as_str()) {
        (&Method::GET, "/assets/app.css") => return asset(APP_CSS, "text/css; charset=utf-8"),
        (&Method::GET, "/assets/app.js") => {
            return asset(APP_JS, "text/javascript; charset=utf-8");
        }
        (&Method::GET, "/login") => {
            return html(StatusCode::OK, login_page(None, peer));
        }
        _ => {}
    }
    if method == Method::POST && !same_origin(&request) {
        return plain(
            StatusCode::FORBIDDEN,
            "refused: a form posted from another site\n",
        );
    }
    if (&method, path.as_str()) == (&Method::POST, "/login") {
        return login(web, peer, request).await;
    }
    let cookie = request
        .headers()
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok());
    let id = session::cookie_id(cookie).map(str::to_owned);
    // A certificate's session is honoured only on a connection presenting
    // that certificate: its cookie alone is not enough.
    let bound = |s: &Session| match s.proof {
        Proof::Certificate(fingerprint) => peer
            .presented
            .as_ref()
            .is_some_and(|p| p.fingerprint == fingerprint),
        Proof::Token(_) => true,
    };
    let Some((id, session)) =
        id.and_then(|id| web.sessions.get(&id).filter(|s| bound(s)).map(|s| (id, s)))
    else {
        return match method {
            Method::GET | Method::HEAD if path != "/events" => redirect("/login"),
            _ => plain(StatusCode::UNAUTHORIZED, "log in first: /login\n"),
        };
    };
    if let Err(why) = still_operator(web, &session) {
        web.sessions.logout(&id);
        tracing::warn!(operator = %session.name, by = session.by(), peer = %peer.address, path = %crate::untrusted::shown(&path), "web console: session ended, {why}: no longer an operator");
        return match method {
            Method::GET | Method::HEAD if path != "/events" => redirect("/login"),
            _ => plain(
                StatusCode::FORBIDDEN,
                "refused: you no longer hold the operator role (the server's tokens or \
                 remote_cmd.callers changed); the session has ended\n",
            ),
        };
    }
    if method == Method::GET || method == Method::HEAD {
        let query = parse(request.uri().query().unwrap_or_default().as_bytes());
        let started = std::time::Instant::now();
        let read = async { get(web, &session, &id, &path, &query).await };
        let mut response = match tokio::time::timeout(web.config.timeout, read).await {
            Ok(response) => response,
            Err(_) => plain(StatusCode::SERVICE_UNAVAILABLE, "the page took too long\n"),
        };
        // The server's time for the page (read and built; its body is
        // whole by then), for the browser's developer tools and the
        // benchmark: `Server-Timing: page;dur=MS`.
        let took = started.elapsed().as_secs_f64() * 1000.0;
        if let Ok(value) = HeaderValue::from_str(&format!("page;dur={took:.2}")) {
            response.headers_mut().insert("server-timing", value);
        }
        return response;
    }
    if method != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST\n");
    }
    let form = match body(web, request).await {
        Ok(form) => form,
        Err(response) => return response,
    };
    if !form
        .get("csrf")
        .is_some_and(|given| session.csrf_matches(given))
    {
        tracing::warn!(operator = %session.name, peer = %peer.address, path = %crate::untrusted::shown(&path), "web console: action refused, its CSRF token is missing or wrong");
        return plain(
            StatusCode::FORBIDDEN,
            "refused: the form's token is missing or stale; load the page again\n",
        );
    }
    let act = async { super::actions::post(web, &session, &id, &path, &form).await };
    match tokio::time::timeout(web.config.timeout, act).await {
        Ok(response) => response,
        Err(_) => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "the action took too long; look at the task list before trying again\n",
        ),
    }
}

/// Whether the session's operator still is one: its token still held
/// with role operator, or its certificate's name still in
/// `remote_cmd.callers` (a reload may have changed either); else why not.
fn still_operator(web: &Web, session: &Session) -> Result<(), &'static str> {
    match session.proof {
        Proof::Token(digest) => match web.state.policy.auth.read().holder_by_digest(&digest) {
            Some(holder) if holder.role == Role::Operator && holder.name == session.name => Ok(()),
            Some(_) => Err("its token no longer has role operator"),
            None => Err("its token was revoked"),
        },
        Proof::Certificate(_) => {
            let config = web.state.config.borrow();
            if config
                .remote_cmd
                .callers
                .iter()
                .any(|c| **c == *session.name)
            {
                Ok(())
            } else {
                Err("its certificate's name is no longer in remote_cmd.callers")
            }
        }
    }
}

/// A compiled-in file.
fn asset(text: &'static str, kind: &'static str) -> Response<Body> {
    let mut response = Response::new(full(text));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=300"),
    );
    secure(response)
}

/// Whether a POST comes from this console's own pages: a browser says
/// where a form's page came from (`Sec-Fetch-Site`, else `Origin`); one from
/// another site is refused even before its (missing) CSRF token is looked
/// at. A client that says neither is no browser on another site's page.
fn same_origin<B>(request: &Request<B>) -> bool {
    let headers = request.headers();
    if let Some(site) = headers.get("sec-fetch-site") {
        return site.as_bytes() == b"same-origin" || site.as_bytes() == b"none";
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| !host.is_empty() && rest == host)
}

/// A form's fields (a later field of the same name wins).
fn parse(bytes: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(bytes).into_owned().collect()
}

/// A POST's form, read up to `web.max_body_size`.
async fn body(
    web: &Web,
    request: Request<Incoming>,
) -> Result<HashMap<String, String>, Response<Body>> {
    let max = usize::try_from(web.config.max_body_size.as_u64()).unwrap_or(usize::MAX);
    let limited = http_body_util::Limited::new(request.into_body(), max);
    match tokio::time::timeout(web.config.timeout, limited.collect()).await {
        Ok(Ok(collected)) => Ok(parse(&collected.to_bytes())),
        Ok(Err(_)) => Err(plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the form is larger than web.max_body_size\n",
        )),
        Err(_) => Err(plain(
            StatusCode::REQUEST_TIMEOUT,
            "the form did not arrive within web.timeout\n",
        )),
    }
}

fn login_page(problem: Option<&str>, peer: &Peer) -> maud::Markup {
    pages::layout(
        "Log in",
        None,
        "",
        pages::login(problem, peer.certificate.as_deref()),
    )
}

/// `POST /login`: an operator's named token, or an operator's client
/// certificate, makes a new session.
async fn login(web: &Web, peer: &Peer, request: Request<Incoming>) -> Response<Body> {
    let form = match body(web, request).await {
        Ok(form) => form,
        Err(response) => return response,
    };
    let who = if form.get("method").map(String::as_str) == Some("certificate") {
        let operators = &web.state.config.borrow().remote_cmd.callers;
        peer.certificate
            .clone()
            .filter(|name| operators.iter().any(|c| **c == **name))
            .zip(peer.presented.as_ref())
            .map(|(name, presented)| (name, Proof::Certificate(presented.fingerprint)))
    } else {
        let token = form.get("token").map(|t| t.trim()).unwrap_or_default();
        let header = crate::auth::bearer(token);
        match web
            .state
            .policy
            .auth
            .read()
            .credential(Some(header.as_bytes()))
        {
            Ok(Credential::Named(holder)) if holder.role == Role::Operator && !token.is_empty() => {
                Some((
                    holder.name,
                    Proof::Token(crate::auth::digest(token.as_bytes())),
                ))
            }
            _ => None,
        }
    };
    let Some((name, proof)) = who else {
        web.refused_logins.hit(|n| {
            tracing::warn!(refused = n, peer = %peer.address, "web console: login refused");
        });
        return html(
            StatusCode::UNAUTHORIZED,
            login_page(
                Some(
                    "not an operator: use a named token with role operator, or a client certificate named in remote_cmd.callers",
                ),
                peer,
            ),
        );
    };
    let config = &web.config;
    let id = web.sessions.login(
        Arc::clone(&name),
        proof,
        config.session_ttl,
        config.max_sessions,
    );
    tracing::info!(operator = %name, by = proof.by(), peer = %peer.address, "web console: logged in");
    let mut response = redirect("/");
    if let Ok(cookie) =
        HeaderValue::from_str(&session::set_cookie(&id, config.session_ttl, web.tls))
    {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// `?page=N`, from 1.
fn page_of(query: &HashMap<String, String>) -> usize {
    field(query, "page").parse().unwrap_or(1).max(1)
}

/// Page `page` of `len` rows: the range and the number of pages.
fn paged(len: usize, page: usize, size: usize) -> (std::ops::Range<usize>, usize, usize) {
    let pages = len.div_ceil(size).max(1);
    let page = page.min(pages);
    let start = (page - 1) * size;
    (start..(start + size).min(len), page, pages)
}

/// A GET for a logged-in operator.
async fn get(
    web: &Web,
    session: &Session,
    id: &str,
    path: &str,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let size = web.config.page_size;
    let render = |title: &str, current: &str, body| {
        html(
            StatusCode::OK,
            pages::layout(title, Some(session), current, body),
        )
    };
    match path {
        "/" => {
            let throughput = web
                .live
                .throughput
                .minutes(super::live::Watched::results(&*web.state));
            let (servers, known, connected, (labels, more)) = if web.state.broker.is_shared() {
                // Several servers: the admin service adds the agents the
                // others know (and the servers) to this one's.
                let listed = match web
                    .admin
                    .list_agents(Call::new(pb::ListAgentsRequest::default()))
                    .await
                {
                    Ok(listed) => listed.into_inner(),
                    Err(e) => return failed("the fleet", e.message()),
                };
                let agents = &listed.agents;
                let connected = agents.iter().filter(|a| a.connected).count();
                let labels = pages::by_label(
                    agents.iter().map(|a| {
                        let labels = a.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()));
                        (a.connected, labels.collect())
                    }),
                    size,
                );
                (listed.servers, agents.len(), connected, labels)
            } else {
                // One server: the callers the admin service lists, counted
                // where they are (10,000 agents' rows are not built for a
                // page that shows their counts).
                let callers = web.state.callers.list();
                let held: Vec<(bool, Arc<crate::labels::Labels>)> = callers
                    .iter()
                    .map(|c| (c.connected(), c.labels()))
                    .collect();
                let connected = held.iter().filter(|(c, _)| *c).count();
                let labels =
                    pages::by_label(held.iter().map(|(c, l)| (*c, l.iter().collect())), size);
                (Vec::new(), held.len(), connected, labels)
            };
            render(
                "Fleet",
                "fleet",
                pages::fleet(&pages::Fleet {
                    servers: &servers,
                    known,
                    connected,
                    labels: &labels,
                    more,
                    throughput: &throughput,
                }),
            )
        }
        "/agents" => {
            let selector = field(query, "selector");
            let state = field(query, "state");
            let (agents, matching, (page, pages), problem) =
                match agents_page(web, selector, state, page_of(query)).await {
                    Ok((agents, matching, pages)) => (agents, matching, pages, None),
                    Err(e) => (Vec::new(), 0, (1, 1), Some(e.message().to_owned())),
                };
            render(
                "Agents",
                "agents",
                pages::agents(&pages::Agents {
                    agents: &agents,
                    matching,
                    selector,
                    state,
                    page,
                    pages,
                    problem: problem.as_deref(),
                }),
            )
        }
        "/tasks" => {
            let state = field(query, "state");
            let wanted = [
                TaskState::Pending,
                TaskState::Delivered,
                TaskState::Acked,
                TaskState::Failed,
                TaskState::Dead,
                TaskState::Cancelled,
            ]
            .into_iter()
            .find(|s| s.name() == state);
            let (mut tasks, _) = web.state.broker.list(wanted).await;
            tasks.reverse();
            let (range, page, pages) = paged(tasks.len(), page_of(query), size);
            let shown: Vec<pb::Task> = tasks[range]
                .iter()
                .map(|t| super::super::admin::task_message(t))
                .collect();
            render(
                "Tasks",
                "tasks",
                pages::tasks(&pages::Tasks {
                    tasks: &shown,
                    state: if wanted.is_some() { state } else { "" },
                    page,
                    pages,
                    csrf: &session.csrf,
                    mode: web.state.broker.mode_name(),
                }),
            )
        }
        "/jobs" => match web
            .admin
            .list_jobs(Call::new(pb::ListJobsRequest::default()))
            .await
        {
            Ok(jobs) => render(
                "Jobs",
                "jobs",
                pages::jobs(&jobs.into_inner().jobs, &session.csrf),
            ),
            Err(e) => failed("the jobs", e.message()),
        },
        "/events" => events(web, id),
        _ => {
            if let Some(task) = path
                .strip_prefix("/tasks/")
                .and_then(|n| n.parse::<u64>().ok())
            {
                return task_page(web, session, task, page_of(query)).await;
            }
            html(
                StatusCode::NOT_FOUND,
                pages::layout(
                    "Not found",
                    Some(session),
                    "",
                    pages::refused("No such page", path, "/"),
                ),
            )
        }
    }
}

/// Page `page` of the agents `selector` and `state` ("connected", "down",
/// or any) pick, sorted as `ListAgents` sorts them: the rows, how many
/// match, and (page, pages). One server picks its callers first and builds
/// rows for the page's only (10,000 agents' rows are not built for a page
/// of 100); several servers take `ListAgents`, which merges the fleet the
/// store knows.
async fn agents_page(
    web: &Web,
    selector: &str,
    state: &str,
    page: usize,
) -> Result<(Vec<pb::Agent>, usize, (usize, usize)), tonic::Status> {
    let size = web.config.page_size;
    let wanted = |connected: bool| match state {
        "connected" => connected,
        "down" => !connected,
        _ => true,
    };
    if web.state.broker.is_shared() {
        let request = pb::ListAgentsRequest {
            selector: selector.to_owned(),
        };
        let mut agents = web
            .admin
            .list_agents(Call::new(request))
            .await?
            .into_inner()
            .agents;
        agents.retain(|a| wanted(a.connected));
        let (range, page, pages) = paged(agents.len(), page, size);
        let matching = agents.len();
        let shown = agents.drain(range).collect();
        return Ok((shown, matching, (page, pages)));
    }
    let selector = super::super::admin::parse_selector(selector)?;
    let callers = web.state.callers.list();
    let mut picked: Vec<&Arc<crate::server::callers::Caller>> = callers
        .iter()
        .filter(|c| wanted(c.connected()))
        .filter(|c| {
            selector
                .as_ref()
                .is_none_or(|s| c.named && s.matches(&c.id, &*c.labels()))
        })
        .collect();
    picked.sort_unstable_by(|a, b| (!a.named, &a.id).cmp(&(!b.named, &b.id)));
    let (range, page, pages) = paged(picked.len(), page, size);
    let loads = web.state.broker.in_flight_by_agent();
    let shown = picked[range]
        .iter()
        .map(|c| super::super::admin::agent_message(c, &loads))
        .collect();
    Ok((shown, picked.len(), (page, pages)))
}

/// A task, or a job run (a run's id is its task's), with one page of its
/// agents.
async fn task_page(web: &Web, session: &Session, id: u64, page: usize) -> Response<Body> {
    let size = web.config.page_size;
    let title = format!("Task {id}");
    if let Ok(mut run) = web.admin.run_message(id).await {
        let (range, page, pages) = paged(run.agents.len(), page, size);
        run.agents = run.agents.drain(range).collect();
        let title = format!("Run {id}");
        let body = pages::run(&run, &session.csrf, (page, pages));
        return html(
            StatusCode::OK,
            pages::layout(&title, Some(session), "tasks", body),
        );
    }
    match web.state.broker.show(id).await {
        Ok(mut view) => {
            let (range, page, pages) = paged(view.agents.len(), page, size);
            view.agents = view.agents.drain(range).collect();
            let message = super::super::admin::task_message(&view.task);
            let mode = web.state.broker.mode_name();
            let body = pages::task(&view, &message, mode, &session.csrf, (page, pages));
            html(
                StatusCode::OK,
                pages::layout(&title, Some(session), "tasks", body),
            )
        }
        Err(e) => html(
            StatusCode::NOT_FOUND,
            pages::layout(
                &title,
                Some(session),
                "tasks",
                pages::refused("Not shown", &e.to_string(), "/tasks"),
            ),
        ),
    }
}

/// A read that failed (the store, most likely).
fn failed(what: &str, why: &str) -> Response<Body> {
    html(
        StatusCode::SERVICE_UNAVAILABLE,
        pages::layout(
            "Not available",
            None,
            "",
            pages::refused(&format!("Cannot read {what}"), why, "/"),
        ),
    )
}

/// `GET /events`: a server-sent event `change` whenever anything shown may
/// have changed, and a comment every 15 s so that proxies keep it open. It
/// ends with the session, or when the server closes.
fn events(web: &Web, id: &str) -> Response<Body> {
    let Ok(permit) = Arc::clone(&web.streams).try_acquire_owned() else {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "web.max_event_streams are open; the page still works, reload it by hand\n",
        );
    };
    /// A stream's state between events.
    struct Open {
        generation: tokio::sync::watch::Receiver<u64>,
        closing: tokio_util::sync::CancellationToken,
        id: String,
        started: bool,
        _permit: tokio::sync::OwnedSemaphorePermit,
    }
    let open = Open {
        generation: web.live.watch(),
        closing: web.state.closing.clone(),
        id: id.to_owned(),
        started: false,
        _permit: permit,
    };
    // The stream ends with its session: it looks it up at each event.
    let sessions = web.sessions.clone();
    let stream = futures_util::stream::unfold(open, move |mut open| {
        let sessions = sessions.clone();
        async move {
            if !open.started {
                open.started = true;
                open.generation.mark_unchanged();
                return Some((Bytes::from_static(b"retry: 5000\n: connected\n\n"), open));
            }
            let text = tokio::select! {
                changed = open.generation.changed() => {
                    changed.ok()?;
                    let generation = *open.generation.borrow_and_update();
                    Bytes::from(format!("event: change\ndata: {generation}\n\n"))
                }
                () = tokio::time::sleep(std::time::Duration::from_secs(15)) => Bytes::from_static(b": ping\n\n"),
                () = open.closing.cancelled() => return None,
            };
            sessions.get(&open.id)?;
            Some((text, open))
        }
    })
    .map(|bytes| Ok::<_, std::convert::Infallible>(Frame::data(bytes)));
    let mut response = Response::new(BodyExt::boxed(http_body_util::StreamBody::new(stream)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    secure(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_cut_in_range() {
        assert_eq!(paged(0, 1, 10), (0..0, 1, 1));
        assert_eq!(paged(25, 3, 10), (20..25, 3, 3));
        assert_eq!(paged(25, 9, 10), (20..25, 3, 3));
    }

    #[test]
    fn a_post_from_another_origin_is_refused() {
        let request = |origin: Option<&str>, site: Option<&str>| {
            let mut builder = Request::builder()
                .method("POST")
                .uri("/tasks")
                .header("host", "127.0.0.1:8080");
            if let Some(origin) = origin {
                builder = builder.header("origin", origin);
            }
            if let Some(site) = site {
                builder = builder.header("sec-fetch-site", site);
            }
            builder.body(()).unwrap()
        };
        assert!(same_origin(&request(
            Some("http://127.0.0.1:8080"),
            Some("same-origin")
        )));
        assert!(same_origin(&request(None, None)));
        assert!(!same_origin(&request(Some("http://evil.example"), None)));
        assert!(!same_origin(&request(
            Some("http://127.0.0.1:8080"),
            Some("cross-site")
        )));
    }
}
