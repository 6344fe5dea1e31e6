//! The console's actions: what a POST from a logged-in operator does, once
//! `routes` has checked its session, role, origin and CSRF token. Each goes
//! through the admin service's own method (the one `contactd task ...` and
//! `contactd job ...` call), so the console applies the admin API's checks
//! and nothing else, and each is logged with the operator's name and how
//! they logged in.

use std::collections::HashMap;

use http::{HeaderValue, Response, StatusCode, header};
use tonic::Request as Call;

use super::{
    Body, Web, field, html, pages, plain, redirect,
    session::{self, Session},
};
use crate::proto::admin::{self as pb, admin_server::Admin};

/// A POST for a logged-in operator, its CSRF token checked: an action.
pub(super) async fn post(
    web: &Web,
    session: &Session,
    id: &str,
    path: &str,
    form: &HashMap<String, String>,
) -> Response<Body> {
    let who = &session.name;
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let refused = |what: &str, e: tonic::Status, back: &str| {
        tracing::info!(operator = %who, by = session.by(), what, "web console: action refused: {}", crate::untrusted::shown(e.message()));
        html(
            StatusCode::CONFLICT,
            pages::layout(
                "Refused",
                Some(session),
                "",
                pages::refused(what, e.message(), back),
            ),
        )
    };
    match segments.as_slice() {
        ["logout"] => {
            web.sessions.logout(id);
            tracing::info!(operator = %who, "web console: logged out");
            let mut response = redirect("/login");
            if let Ok(cookie) = HeaderValue::from_str(&session::clear_cookie(web.tls)) {
                response.headers_mut().insert(header::SET_COOKIE, cookie);
            }
            response
        }
        ["tasks"] => {
            let request = pb::SubmitTaskRequest {
                text: field(form, "text").replace("\r\n", "\n"),
                agent: field(form, "agent").trim().to_owned(),
                selector: field(form, "selector").trim().to_owned(),
                batch: field(form, "batch").trim().to_owned(),
                max_failed: field(form, "max_failed").trim().to_owned(),
            };
            let selector = request.selector.clone();
            match web.admin.submit_task(Call::new(request)).await {
                Ok(done) => {
                    let done = done.into_inner();
                    let shown = if done.run > 0 { done.run } else { done.id };
                    tracing::info!(operator = %who, by = session.by(), task_id = shown, selector = %crate::untrusted::shown(&selector), "web console: task submitted");
                    redirect(&format!("/tasks/{shown}"))
                }
                Err(e) => refused("Task not submitted", e, "/tasks"),
            }
        }
        ["tasks", task, verb @ ("cancel" | "retry")] => {
            let Ok(task) = task.parse::<u64>() else {
                return plain(StatusCode::NOT_FOUND, "no such task\n");
            };
            let request = Call::new(pb::TaskIdRequest { id: task });
            let result = if *verb == "cancel" {
                web.admin.cancel_task(request).await
            } else {
                web.admin.retry_task(request).await
            };
            match result {
                Ok(_) => {
                    tracing::info!(operator = %who, by = session.by(), task_id = task, action = verb, "web console: task {verb}");
                    redirect(&format!("/tasks/{task}"))
                }
                Err(e) => refused(
                    &format!("Task {task} not {verb}"),
                    e,
                    &format!("/tasks/{task}"),
                ),
            }
        }
        ["jobs", name, verb @ ("pause" | "resume")] => {
            let name = decode(name);
            let request = pb::PauseJobRequest {
                name: name.clone(),
                paused: *verb == "pause",
            };
            match web.admin.pause_job(Call::new(request)).await {
                Ok(_) => {
                    tracing::info!(operator = %who, by = session.by(), job = %crate::untrusted::shown(&name), action = verb, "web console: job {verb}d");
                    redirect("/jobs")
                }
                Err(e) => refused(&format!("Job not {verb}d"), e, "/jobs"),
            }
        }
        ["runs", run, "halt"] => {
            let Ok(run) = run.parse::<u64>() else {
                return plain(StatusCode::NOT_FOUND, "no such run\n");
            };
            match web
                .admin
                .halt_run(Call::new(pb::RunIdRequest { run }))
                .await
            {
                Ok(_) => {
                    tracing::info!(operator = %who, by = session.by(), run, "web console: rollout halted");
                    redirect(&format!("/tasks/{run}"))
                }
                Err(e) => refused(
                    &format!("Run {run} not halted"),
                    e,
                    &format!("/tasks/{run}"),
                ),
            }
        }
        ["runs", run, "resume"] => {
            let Ok(run) = run.parse::<u64>() else {
                return plain(StatusCode::NOT_FOUND, "no such run\n");
            };
            match web
                .admin
                .resume_run(Call::new(pb::RunIdRequest { run }))
                .await
            {
                Ok(_) => {
                    tracing::info!(operator = %who, by = session.by(), run, "web console: rollout resumed");
                    redirect(&format!("/tasks/{run}"))
                }
                Err(e) => refused(
                    &format!("Run {run} not resumed"),
                    e,
                    &format!("/tasks/{run}"),
                ),
            }
        }
        _ => plain(StatusCode::NOT_FOUND, "no such action\n"),
    }
}

/// A path segment, percent-decoded (as `pages::query` encodes it).
fn decode(segment: &str) -> String {
    form_urlencoded::parse(format!("x={segment}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_segment_is_decoded() {
        assert_eq!(decode("a+b%2Fc"), "a b/c");
    }
}
