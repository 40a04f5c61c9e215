//! The cascade in the server: a request `decide` marked for it is served on the local engine
//! to completion (token logprobs and entropies collected whether or not the client asked for
//! them), the answer goes through [`switchyard_router::cascade::check`], and
//! - if it passes, the client gets the local answer (`x-switchyard-cascade: passed`);
//! - if it fails, the request as sent goes to the cascade tier through [`Upstreams::dispatch`]
//!   (retries and remote fallbacks, never back to the local tier) and the client gets that
//!   answer (`escalated`); if every remote tier fails, the client still gets the local answer
//!   (`escalation_failed`), with the remote error in the reasons.
//!
//! A streamed request is only here when the policy allows holding it back
//! (`cascade.buffer_streams`): the local answer is replayed as SSE once it passed, or the remote
//! stream is passed through. The telemetry record lists both attempts (tier, latency, tokens,
//! cost, and the verdict on the local answer); its totals are their sums.
//!
//! [`Upstreams::dispatch`]: switchyard_router::upstream::Upstreams::dispatch

use std::sync::Arc;
use std::time::Instant;

use axum::response::{IntoResponse, Response};
use axum::Json;
use switchyard_router::cascade::{check, Answer};
use switchyard_router::upstream::{Dispatch, DispatchReport, UpstreamBody};
use switchyard_router::{Attempt, CascadeOutcome, Outcome, Usage};

use super::error::ApiError;
use super::local::{self, ChoiceOutput};
use super::route::{NormalizedRequest, RouteHeaders};
use super::routing::{self, CascadePlan, RequestRecord};
use super::AppState;

/// Serves `req` through the cascade; `render` turns finished local choices into the
/// endpoint's response (JSON, or SSE for a held-back stream).
pub async fn serve<R>(
    app: &Arc<AppState>,
    mut req: NormalizedRequest,
    mut headers: RouteHeaders,
    mut record: RequestRecord,
    plan: CascadePlan,
    arrived: Instant,
    render: R,
) -> Response
where
    R: FnOnce(&NormalizedRequest, Vec<ChoiceOutput>, local::Usage) -> Response,
{
    let api = req.api;
    // The checks need the chosen tokens' logprobs (and the sampler's entropies, which come
    // with them); the client sees logprobs only if it asked.
    let asked_logprobs = req.sampling.logprobs;
    req.sampling.logprobs = Some(asked_logprobs.unwrap_or(0));
    let started = Instant::now();
    let (outs, usage) = match local::run(app, &req, arrived).await {
        Ok(x) => x,
        Err(e) => return routing::finish_local(api, Err(e), &headers, Some(record)),
    };
    req.sampling.logprobs = asked_logprobs;

    let verdict = {
        let out = outs.first();
        let tokens = out.map(|o| o.tokens.as_slice()).unwrap_or_default();
        let logprobs: Vec<f64> = tokens
            .iter()
            .filter_map(|t| t.logprob.map(f64::from))
            .collect();
        let entropies: Vec<f64> = tokens
            .iter()
            .filter_map(|t| t.entropy.map(f64::from))
            .collect();
        check(
            &plan.checks,
            &Answer {
                text: out.map(|o| o.text.as_str()).unwrap_or_default(),
                logprobs: &logprobs,
                entropies: &entropies,
                finish_reason: out
                    .and_then(|o| o.completion.as_ref())
                    .map(|c| c.finish_reason.as_str()),
            },
        )
    };
    let mut local_attempt = Attempt::new(
        &headers.tier,
        started.elapsed().as_millis() as u64,
        &routing::router_usage(usage),
        0.0,
    );
    local_attempt.verdict = Some(verdict.clone());

    if !verdict.escalate {
        record.cascade_attempt(local_attempt, CascadeOutcome::Passed);
        headers
            .reasons
            .push("cascade: the local answer passed its checks".into());
        return answer_locally(
            &req,
            outs,
            usage,
            headers,
            record,
            CascadeOutcome::Passed,
            render,
        );
    }

    let remote = plan.decision.tier.clone().unwrap_or_default();
    record.cascade_attempt(local_attempt, CascadeOutcome::Escalated);
    headers.reasons.push(format!(
        "cascade: the local answer failed ({}); escalating to `{remote}`",
        verdict.reasons.join("; ")
    ));
    record.start_attempt();
    let remote_started = Instant::now();
    let dispatched = app
        .routing
        .upstreams
        .dispatch(&plan.decision, &plan.upstream, plan.api_key_id.as_deref())
        .await;
    let failed = |report: &DispatchReport, error: String| {
        let mut a = Attempt::new(
            &remote,
            remote_started.elapsed().as_millis() as u64,
            &Usage::default(),
            0.0,
        );
        a.outcome = Outcome::Error;
        a.error = Some(report.errors.last().cloned().unwrap_or(error));
        a
    };
    match dispatched {
        Dispatch::Remote { tier, body, report } => {
            record.report(&report);
            record.served_by(Some(&tier));
            headers.tier = tier.clone();
            headers.cascade = Some(CascadeOutcome::Escalated.as_str());
            match body {
                UpstreamBody::Json {
                    value,
                    usage,
                    cost_usd,
                } => {
                    let ms = remote_started.elapsed().as_millis() as u64;
                    record.cascade_attempt(
                        Attempt::new(&tier, ms, &usage, cost_usd),
                        CascadeOutcome::Escalated,
                    );
                    headers.cost_usd = cost_usd;
                    record.finish(Outcome::Ok, None);
                    let mut resp = Json(value).into_response();
                    headers.write_headers(resp.headers_mut());
                    resp
                }
                UpstreamBody::Stream(s) => {
                    // The stream's usage arrives with its end; the record adds the attempt then.
                    headers.cost_usd = routing::prompt_cost_estimate(
                        &app.routing.policy,
                        &tier,
                        plan.estimated_prompt_tokens,
                    );
                    let mut resp =
                        routing::sse_response(routing::remote_sse(api, s, record, arrived));
                    headers.write_headers(resp.headers_mut());
                    resp
                }
            }
        }
        Dispatch::Local { report, .. } | Dispatch::Failed { report, .. } => {
            record.report(&report);
            let a = failed(&report, "no remote tier could serve".into());
            let why = a.error.clone().unwrap_or_default();
            escalation_failed(
                &req, outs, usage, headers, record, a, "failed", &why, render,
            )
        }
        Dispatch::Refused(f) => {
            let a = failed(&DispatchReport::default(), f.message.clone());
            escalation_failed(
                &req, outs, usage, headers, record, a, "refused", &f.message, render,
            )
        }
    }
}

/// The remote attempt `a` failed (`how`: failed or refused, `why`): the local answer after all.
#[allow(clippy::too_many_arguments)]
fn escalation_failed<R>(
    req: &NormalizedRequest,
    outs: Vec<ChoiceOutput>,
    usage: local::Usage,
    mut headers: RouteHeaders,
    mut record: RequestRecord,
    a: Attempt,
    how: &str,
    why: &str,
    render: R,
) -> Response
where
    R: FnOnce(&NormalizedRequest, Vec<ChoiceOutput>, local::Usage) -> Response,
{
    headers.reasons.push(format!(
        "cascade: escalation {how} ({why}); serving the local answer"
    ));
    record.cascade_attempt(a, CascadeOutcome::EscalationFailed);
    answer_locally(
        req,
        outs,
        usage,
        headers,
        record,
        CascadeOutcome::EscalationFailed,
        render,
    )
}

/// The local answer as the response, the record finished as served by the local tier.
fn answer_locally<R>(
    req: &NormalizedRequest,
    outs: Vec<ChoiceOutput>,
    usage: local::Usage,
    mut headers: RouteHeaders,
    mut record: RequestRecord,
    outcome: CascadeOutcome,
    render: R,
) -> Response
where
    R: FnOnce(&NormalizedRequest, Vec<ChoiceOutput>, local::Usage) -> Response,
{
    record.served_by(Some(&headers.tier));
    headers.cascade = Some(outcome.as_str());
    headers.cost_usd = 0.0;
    let resp: Result<Response, ApiError> = Ok(render(req, outs, usage));
    routing::finish_local(req.api, resp, &headers, Some(record))
}
