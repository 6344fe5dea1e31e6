//! The console's HTML, written with `maud`: every `(value)` in a template
//! is HTML-escaped by the macro, and the only way around it is a visible
//! `PreEscaped`, which this file never uses on anything but the fixed
//! doctype. So an agent's status, a task's text or result, a label or a
//! selector can contain any markup and still shows as text.
//!
//! Each page keeps the part that changes inside `<div id="live">`: the
//! script fetches the page again when the server says something changed and
//! swaps that part only, so forms outside it keep what an operator is
//! typing. Without the script the pages read the same (and reload by hand).
//!
//! States are written as words with a mark (`●` up, `○` down, `✗` failed),
//! never told by colour alone; every control has a label; the first link
//! skips to the content.

use maud::{DOCTYPE, Markup, html};

use super::session::Session;
use crate::{
    proto::admin as pb,
    tasks::{AgentState, TaskView, jobs::shown_ms},
};

/// Longest text shown whole; longer is folded under its first line.
const FOLD_BYTES: usize = 240;
/// Lines shown whole; more are folded.
const FOLD_LINES: usize = 4;
/// Characters of a folded text's summary.
const SUMMARY_CHARS: usize = 80;

/// The page around `body`: navigation, the signed-in operator and the
/// log-out button.
pub(super) fn layout(
    title: &str,
    session: Option<&Session>,
    current: &str,
    body: Markup,
) -> Markup {
    let link = |href: &str, name: &str, label: &str| {
        html! {
            li { a href=(href) aria-current=[(current == name).then_some("page")] { (label) } }
        }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · contactd" }
                link rel="stylesheet" href="/assets/app.css";
                script src="/assets/app.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    span.brand { "contactd" }
                    @if session.is_some() {
                        nav aria-label="Main" {
                            ul {
                                (link("/", "fleet", "Fleet"))
                                (link("/agents", "agents", "Agents"))
                                (link("/tasks", "tasks", "Tasks"))
                                (link("/jobs", "jobs", "Jobs"))
                            }
                        }
                    }
                    @if let Some(s) = session {
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            span { "Signed in as " strong { (s.name) } }
                            " "
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main #main tabindex="-1" {
                    h1 { (title) }
                    (body)
                }
                footer {
                    p #live-status role="status" aria-live="polite" {}
                }
            }
        }
    }
}

/// The login form; `problem` says why the last try failed.
pub(super) fn login(problem: Option<&str>, certificate: Option<&str>) -> Markup {
    html! {
        @if let Some(problem) = problem {
            p.problem role="alert" { "✗ " (problem) }
        }
        @if let Some(name) = certificate {
            form method="post" action="/login" {
                input type="hidden" name="method" value="certificate";
                p { "Your client certificate names you " strong { (name) } "." }
                button type="submit" { "Log in with the certificate" }
            }
            p { "or with a token:" }
        }
        form method="post" action="/login" {
            p {
                label for="token" { "Operator token" }
                input #token name="token" type="password" autocomplete="current-password"
                    required autofocus;
            }
            p.hint { "A named token with role operator (" code { "contactd token create NAME --role operator" } ")." }
            button type="submit" { "Log in" }
        }
    }
}

/// A refusal: what was refused and why, and a way back.
pub(super) fn refused(what: &str, why: &str, back: &str) -> Markup {
    html! {
        p.problem role="alert" { "✗ " (what) ": " (why) }
        p { a href=(back) { "Back" } }
    }
}

/// Text that may be long: whole when short, else folded under its start.
pub(super) fn folded(text: &str) -> Markup {
    if text.is_empty() {
        return html! { span.none { "—" } };
    }
    let lines = text.lines().count();
    if text.len() <= FOLD_BYTES && lines <= FOLD_LINES {
        return html! { pre.out { (text) } };
    }
    let first = text.lines().next().unwrap_or_default();
    let summary: String = first.chars().take(SUMMARY_CHARS).collect();
    html! {
        details.out {
            summary { (summary) "… (" (text.len()) " bytes, " (lines) " lines)" }
            pre.out { (text) }
        }
    }
}

/// A time, or a dash for none.
fn when(ms: i64) -> Markup {
    if ms <= 0 {
        return html! { span.none { "—" } };
    }
    let shown = shown_ms(ms);
    html! { time datetime=(shown) { (shown) } }
}

/// "Page N of M" with previous and next links; `link(page)` makes each.
fn pager(page: usize, pages: usize, link: &dyn Fn(usize) -> String) -> Markup {
    html! {
        nav.pager aria-label="Pages" {
            @if page > 1 { a href=(link(page - 1)) rel="prev" { "← Previous" } }
            span { " Page " (page) " of " (pages.max(1)) " " }
            @if page < pages { a href=(link(page + 1)) rel="next" { "Next →" } }
        }
    }
}

/// An agent's connection state, in words.
fn up(connected: bool) -> Markup {
    if connected {
        html! { span.state.up { "● connected" } }
    } else {
        html! { span.state.down { "○ down" } }
    }
}

/// What the fleet page shows.
pub(super) struct Fleet<'a> {
    pub servers: &'a [pb::Server],
    /// Agents known, and of those connected.
    pub known: usize,
    pub connected: usize,
    /// Per label shared by several agents, connected and down, the largest
    /// groups first, at most a page of them.
    pub labels: &'a LabelCounts,
    /// Labels left out of `labels`.
    pub more: usize,
    /// Results per minute over the last hour, oldest first.
    pub throughput: &'a [(u64, u64)],
}

/// A label's connected and down agents, keyed by (key, value).
pub(super) type LabelCounts = Vec<((String, String), (usize, usize))>;

/// Per label (`role=web`), how many agents are connected and down: the
/// labels several agents share, the largest groups first, at most `page`
/// of them, and how many more there are. A label every agent has alone (a
/// host name) is left for the agents page.
pub(super) fn by_label<'a>(
    agents: impl Iterator<Item = (bool, Vec<(&'a str, &'a str)>)>,
    page: usize,
) -> (LabelCounts, usize) {
    let mut counts: std::collections::HashMap<(&str, &str), (usize, usize)> =
        std::collections::HashMap::new();
    let mut known = 0;
    for (connected, labels) in agents {
        known += 1;
        for label in labels {
            let entry = counts.entry(label).or_default();
            if connected {
                entry.0 += 1;
            } else {
                entry.1 += 1;
            }
        }
    }
    let mut labels: Vec<_> = counts
        .into_iter()
        .filter(|(_, (c, d))| c + d > 1 || known <= 1)
        .collect();
    labels.sort_by(|a, b| (b.1.0 + b.1.1).cmp(&(a.1.0 + a.1.1)).then(a.0.cmp(&b.0)));
    let more = labels.len().saturating_sub(page);
    labels.truncate(page);
    let labels = labels
        .into_iter()
        .map(|((k, v), n)| ((k.to_owned(), v.to_owned()), n))
        .collect();
    (labels, more)
}

pub(super) fn fleet(f: &Fleet<'_>) -> Markup {
    let (connected, down) = (f.connected, f.known - f.connected.min(f.known));
    let (labels, more) = (f.labels, f.more);
    let peak = f
        .throughput
        .iter()
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(0)
        .max(1);
    let total: u64 = f.throughput.iter().map(|(_, n)| n).sum();
    html! {
        div #live {
            section aria-labelledby="counts" {
                h2 #counts { "Agents" }
                dl.counts {
                    div { dt { "Known" } dd { (f.known) } }
                    div { dt { "● Connected" } dd #connected { (connected) } }
                    div { dt { "○ Down" } dd #down { (down) } }
                }
                p { a href="/agents?state=down" { "Show the agents that are down" } }
            }
            section aria-labelledby="servers" {
                h2 #servers { "Servers" }
                @if f.servers.is_empty() {
                    p { "One server, with a store of its own." }
                } @else {
                    table {
                        thead { tr { th scope="col" { "Server" } th scope="col" { "State" } th scope="col" { "Started" } th scope="col" { "Heartbeat" } } }
                        tbody {
                            @for s in f.servers {
                                tr {
                                    td { (s.name) @if s.this { " (this one)" } }
                                    td { @if s.alive { "● alive" } @else if s.stopped { "○ stopped" } @else { "✗ silent" } }
                                    td { (when(s.started_ms)) }
                                    td { (when(s.heartbeat_ms)) }
                                }
                            }
                        }
                    }
                }
            }
            section aria-labelledby="labels" {
                h2 #labels { "By label" }
                @if labels.is_empty() {
                    p { "No labels shared by several agents." }
                } @else {
                    table {
                        thead { tr { th scope="col" { "Label" } th scope="col" { "● Connected" } th scope="col" { "○ Down" } } }
                        tbody {
                            @for ((k, v), (c, d)) in labels {
                                tr {
                                    td { a href=(format!("/agents?selector={}", query(&format!("{k}={v}")))) { code { (k) "=" (v) } } }
                                    td { (c) }
                                    td { (d) }
                                }
                            }
                        }
                    }
                    @if more > 0 { p { (more) " more labels (web.page_size)." } }
                }
            }
            section aria-labelledby="throughput" {
                h2 #throughput { "Results in the last hour" }
                p {
                    (total) " results (acks and failures) in " (f.throughput.len())
                    @if f.throughput.len() == 1 { " minute." } @else { " minutes." }
                }
                @if !f.throughput.is_empty() {
                    table.throughput {
                        thead { tr { th scope="col" { "Minute (UTC)" } th scope="col" { "Results" } th scope="col" { "Share of the busiest minute" } } }
                        tbody {
                            @for (minute, n) in f.throughput.iter().rev() {
                                tr {
                                    td { (shown_ms(i64::try_from(minute * 60_000).unwrap_or(0))) }
                                    td { (n) }
                                    td { meter min="0" max=(peak) value=(n) aria-label=(format!("{n} of {peak}")) { (n) } }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What the agents page shows: one page of `agents`, already filtered.
pub(super) struct Agents<'a> {
    pub agents: &'a [pb::Agent],
    pub matching: usize,
    pub selector: &'a str,
    pub state: &'a str,
    pub page: usize,
    pub pages: usize,
    pub problem: Option<&'a str>,
}

pub(super) fn agents(a: &Agents<'_>) -> Markup {
    let link = |page: usize| {
        format!(
            "/agents?selector={}&state={}&page={page}",
            query(a.selector),
            query(a.state)
        )
    };
    html! {
        form.filter method="get" action="/agents" role="search" {
            p {
                label for="selector" { "Selector" }
                input #selector name="selector" type="text" value=(a.selector)
                    placeholder="role=web,zone in (a,b)" size="40";
            }
            p {
                label for="state" { "State" }
                select #state name="state" {
                    @for (value, label) in [("", "any"), ("connected", "connected"), ("down", "down")] {
                        option value=(value) selected[a.state == value] { (label) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        @if let Some(problem) = a.problem {
            p.problem role="alert" { "✗ " (problem) }
        }
        div #live {
            p #matching { (a.matching) " agents match." }
            table #agents {
                thead {
                    tr {
                        th scope="col" { "Agent" }
                        th scope="col" { "State" }
                        th scope="col" { "Last status" }
                        th scope="col" { "Last seen" }
                        th scope="col" { "Labels" }
                        th scope="col" { "Delivered / acked / failed" }
                    }
                }
                tbody {
                    @for agent in a.agents {
                        tr.agent {
                            td.name { (agent.name) @if !agent.named { " (anonymous)" } @if !agent.server.is_empty() { br; small { "on " (agent.server) } } }
                            td { (up(agent.connected)) }
                            td.status { (folded(&agent.last_status)) }
                            td { (when(agent.last_seen_ms)) }
                            td.labels {
                                @let mut labels: Vec<_> = agent.labels.iter().collect();
                                @let () = labels.sort();
                                ul { @for (k, v) in labels { li { code { (k) "=" (v) } } } }
                            }
                            td { (agent.delivered) " / " (agent.acked) " / " (agent.failed) }
                        }
                    }
                }
            }
            (pager(a.page, a.pages, &link))
        }
    }
}

/// A task's state as words.
fn task_state(task: &pb::Task) -> &'static str {
    match pb::TaskState::try_from(task.state).unwrap_or(pb::TaskState::Unspecified) {
        pb::TaskState::Unspecified => "unknown",
        pb::TaskState::Pending => "pending",
        pb::TaskState::Delivered => "delivered",
        pb::TaskState::Acked => "✓ acked",
        pb::TaskState::Failed => "✗ failed",
        pb::TaskState::Dead => "✗ dead",
        pb::TaskState::Cancelled => "cancelled",
    }
}

/// Who a task is for.
fn target(task: &pb::Task) -> Markup {
    html! {
        @if !task.target.is_empty() { "agent " code { (task.target) } }
        @else if !task.selector.is_empty() { "selector " code { (task.selector) } }
        @else { "every agent" }
    }
}

/// What the tasks page shows: one page of tasks, newest first.
pub(super) struct Tasks<'a> {
    pub tasks: &'a [pb::Task],
    pub state: &'a str,
    pub page: usize,
    pub pages: usize,
    pub csrf: &'a str,
    pub mode: &'a str,
}

pub(super) fn tasks(t: &Tasks<'_>) -> Markup {
    let link = |page: usize| format!("/tasks?state={}&page={page}", query(t.state));
    html! {
        details.submit open {
            summary { "Submit a task" }
            form method="post" action="/tasks" {
                input type="hidden" name="csrf" value=(t.csrf);
                p {
                    label for="text" { "Task text" }
                    textarea #text name="text" rows="3" cols="60" required {}
                }
                p {
                    label for="to" { "Selector (empty: every agent)" }
                    input #to name="selector" type="text" size="40" placeholder="role=web";
                }
                p {
                    label for="agent" { "Or one agent" }
                    input #agent name="agent" type="text" size="30";
                }
                fieldset {
                    legend { "Rollout (optional: each matching agent once)" }
                    label for="batch" { "Batch" }
                    input #batch name="batch" type="text" size="6" placeholder="10%";
                    " "
                    label for="max_failed" { "Halt after failures above" }
                    input #max_failed name="max_failed" type="text" size="6" placeholder="0";
                }
                button #submit type="submit" { "Submit" }
                p.hint { "Delivery mode: " (t.mode) "." }
            }
        }
        form.filter method="get" action="/tasks" {
            label for="task-state" { "State" }
            select #task-state name="state" {
                @for value in ["", "pending", "delivered", "acked", "failed", "dead", "cancelled"] {
                    option value=(value) selected[t.state == value] { @if value.is_empty() { "any" } @else { (value) } }
                }
            }
            " "
            button type="submit" { "Filter" }
        }
        div #live {
            table #tasks {
                thead {
                    tr {
                        th scope="col" { "Task" }
                        th scope="col" { "State" }
                        th scope="col" { "For" }
                        th scope="col" { "Created" }
                        th scope="col" { "Delivered / acked / failed" }
                        th scope="col" { "Text" }
                    }
                }
                tbody {
                    @for task in t.tasks {
                        tr {
                            td { a href=(format!("/tasks/{}", task.id)) { "#" (task.id) } }
                            td { (task_state(task)) }
                            td { (target(task)) }
                            td { (when(task.created_ms)) }
                            td { (task.delivered) " / " (task.acked) " / " (task.failed) }
                            td { (folded(&task.text)) }
                        }
                    }
                }
            }
            (pager(t.page, t.pages, &link))
        }
    }
}

fn agent_state(state: AgentState) -> &'static str {
    match state {
        AgentState::Owed => "owed",
        AgentState::Delivered => "delivered",
        AgentState::Acked => "✓ acked",
        AgentState::Failed => "✗ failed",
        AgentState::Missed => "✗ missed",
        AgentState::Cancelled => "cancelled",
    }
}

/// A small form with one button, for an action on `action`.
fn button(action: &str, csrf: &str, label: &str) -> Markup {
    html! {
        form.action method="post" action=(action) {
            input type="hidden" name="csrf" value=(csrf);
            button type="submit" { (label) }
        }
    }
}

/// One task in full: its text, its state, and every agent's result.
/// `view.agents` is one page of them, page `page` of `pages`.
pub(super) fn task(
    view: &TaskView,
    message: &pb::Task,
    mode: &str,
    csrf: &str,
    (page, pages): (usize, usize),
) -> Markup {
    let id = message.id;
    let link = |page: usize| format!("/tasks/{id}?page={page}");
    html! {
        div.actions {
            (button(&format!("/tasks/{id}/cancel"), csrf, "Cancel"))
            (button(&format!("/tasks/{id}/retry"), csrf, "Retry"))
        }
        div #live {
            dl.fields {
                div { dt { "State" } dd #task-state { (task_state(message)) } }
                div { dt { "For" } dd { (target(message)) } }
                div { dt { "Created" } dd { (when(message.created_ms)) } }
                div { dt { "Delivered / acked / failed" } dd { (message.delivered) " / " (message.acked) " / " (message.failed) } }
                div { dt { "Mode" } dd { (mode) } }
                div { dt { "Retries" } dd { (view.task.progress.retries()) } }
            }
            h2 { "Text" }
            (folded(&message.text))
            h2 { "Agents" }
            @if view.agents.is_empty() {
                p { "No agent has it yet." }
            } @else {
                table #results {
                    thead { tr { th scope="col" { "Agent" } th scope="col" { "State" } th scope="col" { "At" } th scope="col" { "Result" } } }
                    tbody {
                        @for row in &view.agents {
                            tr {
                                td { (row.agent) }
                                td { (agent_state(row.state)) }
                                td { (when(row.result_ms)) }
                                td.result { (folded(&row.result)) }
                            }
                        }
                    }
                }
                (pager(page, pages, &link))
            }
        }
    }
}

/// One job run in full: its progress, and every agent's state and result.
/// `shown.agents` is one page of them, page `page` of `pages`.
pub(super) fn run(
    shown: &pb::ShowRunResponse,
    csrf: &str,
    (page, pages): (usize, usize),
) -> Markup {
    let Some(run) = &shown.run else {
        return html! {};
    };
    let id = run.id;
    let link = |page: usize| format!("/tasks/{id}?page={page}");
    let done = run.acked + run.failed + run.missed;
    html! {
        @if run.state == "halted" {
            div.actions { (button(&format!("/runs/{}/resume", run.id), csrf, "Resume the rollout")) }
        }
        @if run.state == "running" && run.mode == "each" {
            div.actions { (button(&format!("/runs/{}/halt", run.id), csrf, "Halt the rollout")) }
        }
        div #live {
            dl.fields {
                div { dt { "Job" } dd { @if run.job.is_empty() { "(ad hoc)" } @else { (run.job) } } }
                div { dt { "State" } dd #run-state { (run.state) } }
                div { dt { "Mode" } dd { (run.mode) } }
                div { dt { "For" } dd { code { (run.target) } } }
                div { dt { "Started" } dd { (when(run.started_ms)) } }
                div { dt { "Finished" } dd { (when(run.finished_ms)) } }
                div { dt { "Batch / halt after failures" } dd { (run.batch) " / " (run.max_failed) } }
            }
            h2 { "Progress" }
            p {
                label for="progress" { (done) " of " (run.targets) " agents answered: "
                    (run.acked) " acked, " (run.failed) " failed, " (run.missed) " missed, "
                    (run.running) " running, " (run.owed) " owed" }
                " "
                progress #progress max=(run.targets.max(1)) value=(done) { (done) "/" (run.targets) }
            }
            h2 { "Text" }
            (folded(&run.text))
            h2 { "Agents" }
            table #results {
                thead { tr { th scope="col" { "Agent" } th scope="col" { "State" } th scope="col" { "Tries" } th scope="col" { "At" } th scope="col" { "Result" } } }
                tbody {
                    @for a in &shown.agents {
                        tr {
                            td { (a.agent) }
                            td { (a.state) }
                            td { (a.tries) }
                            td { (when(a.at_ms)) }
                            td.result { (folded(&a.result)) }
                        }
                    }
                }
            }
            (pager(page, pages, &link))
        }
    }
}

/// The jobs, with their last runs and a pause or resume button each.
pub(super) fn jobs(jobs: &[pb::Job], csrf: &str) -> Markup {
    html! {
        div #live {
            @if jobs.is_empty() {
                p { "No jobs are configured (" code { "[[jobs]]" } ")." }
            } @else {
                table #jobs {
                    thead {
                        tr {
                            th scope="col" { "Job" }
                            th scope="col" { "Schedule" }
                            th scope="col" { "For" }
                            th scope="col" { "Next" }
                            th scope="col" { "Last run" }
                            th scope="col" { "Running / halted" }
                            th scope="col" { "Action" }
                        }
                    }
                    tbody {
                        @for job in jobs {
                            tr {
                                td { (job.name) " (" (job.mode) ")" }
                                td { code { (job.schedule) } @if job.paused { " — paused" } }
                                td { code { (job.target) } }
                                td { (when(job.next_ms)) }
                                td {
                                    @if job.last_run > 0 {
                                        a href=(format!("/tasks/{}", job.last_run)) { "#" (job.last_run) } " " (job.last_state)
                                    } @else { span.none { "—" } }
                                }
                                td { (job.running) " / " (job.halted) }
                                td {
                                    @let verb = if job.paused { "resume" } else { "pause" };
                                    form.action method="post" action=(format!("/jobs/{}/{verb}", query(&job.name))) {
                                        input type="hidden" name="csrf" value=(csrf);
                                        button type="submit" aria-label=(format!("{verb} job {}", job.name)) {
                                            @if job.paused { "Resume" } @else { "Pause" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `text` percent-encoded for a URL's query or path segment.
pub(super) fn query(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_counted_connected_and_down_largest_first() {
        let agents = [
            (true, vec![("role", "web"), ("host", "a")]),
            (false, vec![("role", "web"), ("host", "b")]),
            (true, vec![("role", "db"), ("host", "c")]),
            (true, vec![("role", "db"), ("host", "d")]),
            (true, vec![("role", "db"), ("host", "e")]),
        ];
        let (labels, more) = by_label(agents.clone().into_iter(), 10);
        let shown: Vec<_> = labels
            .iter()
            .map(|((k, v), n)| (format!("{k}={v}"), *n))
            .collect();
        // Host names, each one agent's, are left out.
        assert_eq!(
            shown,
            vec![
                ("role=db".to_owned(), (3, 0)),
                ("role=web".to_owned(), (1, 1))
            ]
        );
        assert_eq!(more, 0);
        let (labels, more) = by_label(agents.into_iter(), 1);
        assert_eq!((labels.len(), more), (1, 1));
    }

    #[test]
    fn hostile_text_is_escaped_and_long_text_folded() {
        let shown = folded("<script>alert(1)</script>").into_string();
        assert_eq!(
            shown,
            "<pre class=\"out\">&lt;script&gt;alert(1)&lt;/script&gt;</pre>"
        );
        let long = "x".repeat(FOLD_BYTES + 1);
        let shown = folded(&long).into_string();
        assert!(shown.starts_with("<details"), "{shown}");
        assert!(shown.contains(&format!("{} bytes", FOLD_BYTES + 1)));
        let attribute = refused("a", "\" onmouseover=\"x", "/\"><b>").into_string();
        assert!(
            !attribute.contains("\"><b>") && !attribute.contains("\" onmouseover"),
            "{attribute}"
        );
    }
}
