//! `tidings compliance search|export|audit|hold`: the compliance team's tools on the
//! machine that holds the store. Each search and export goes through
//! [`Compliance::search`], which records it in the tenant's audit log.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use tidings_archive::compliance::{
    Action, Actor, Compliance, ComplianceError, Hit, HoldSpec, Progress, Query, Scope, Sink, Via,
    audit, export, hit_json, hold, parse_time,
};
use tidings_log::{Log, TenantId};

use crate::cli::{ComplianceCommand, ExportFormat, HoldCommand, QueryArgs};
use crate::config::Config;
use crate::output::emit;

/// The compliance service over an open log, sharing its store and keys.
pub fn service(
    log: &Log,
    config: &Config,
    gate: Arc<tokio::sync::RwLock<()>>,
) -> anyhow::Result<Compliance> {
    Ok(Compliance::new(
        log.store().clone(),
        log.keyring().clone(),
        Some(crate::archive::objects(config)?),
        gate,
    ))
}

/// Runs a compliance command. Returns whether everything checked out.
pub async fn command(cmd: ComplianceCommand, log: &Log, config: &Config) -> anyhow::Result<bool> {
    let compliance = service(log, config, Arc::default())?;
    match cmd {
        ComplianceCommand::Search(args) => {
            let (query, actor) = request(&compliance, &args, "search").await?;
            let mut sink = Stdout(std::io::BufWriter::new(std::io::stdout()));
            let progress = Progress::default();
            compliance
                .search(&query, &actor, &Action::Search, &progress, &mut sink)
                .await?;
            Ok(true)
        }
        ComplianceCommand::Export { query, format, out } => {
            let (q, actor) = request(&compliance, &query, "export").await?;
            let format = match format {
                ExportFormat::Jsonl => export::Format::Jsonl,
                ExportFormat::Csv => export::Format::Csv,
                ExportFormat::Parquet => export::Format::Parquet,
            };
            let destination = format!("{} ({})", out.display(), format.as_str());
            let action = Action::Export { destination };
            let progress = Arc::new(Progress::default());
            let bar = std::io::stderr()
                .is_terminal()
                .then(|| spawn_bar(progress.clone()));
            let result = async {
                let mut file = match export::create(&out, format) {
                    Ok(file) => file,
                    Err(e) => {
                        // A refused destination is still an attempt to export: record it.
                        compliance
                            .deny(
                                &tenant_of(&q),
                                &actor,
                                "export",
                                q.to_json().to_string(),
                                &e.to_string(),
                            )
                            .await?;
                        return Err(e);
                    }
                };
                compliance
                    .search(&q, &actor, &action, &progress, &mut file)
                    .await
            }
            .await;
            if let Some(bar) = bar {
                bar.abort();
                eprintln!();
            }
            let rows = result?;
            emit(
                &json!({"exported": rows, "path": out.display().to_string(), "format": format.as_str()}),
            )?;
            Ok(true)
        }
        ComplianceCommand::Audit { tenant } => {
            // Streamed a page at a time: the log may hold far more records than memory.
            let mut emitted = Ok(());
            let checked = audit::read_each(&**log.store(), log.keyring(), &tenant, |record| {
                emitted = emit(&audit::record_json(&tenant, &record));
                std::future::ready(emitted.is_ok())
            })
            .await?;
            emitted?;
            if !checked.problems.is_empty() {
                emit(&json!({"problems": checked.problems}))?;
            }
            Ok(checked.problems.is_empty())
        }
        ComplianceCommand::Hold(cmd) => {
            hold_command(&compliance, cmd).await?;
            Ok(true)
        }
    }
}

fn tenant_of(q: &Query) -> TenantId {
    q.tenant.clone().expect("set from a required argument")
}

/// Parses the filters. A malformed one from a valid tenant and actor is an access attempt
/// and is recorded as denied before the error is returned.
async fn request(
    compliance: &Compliance,
    args: &QueryArgs,
    action: &str,
) -> anyhow::Result<(Query, Actor)> {
    let actor = Actor::new(&args.actor, Via::Cli)?;
    let time = |flag: &str, text: &Option<String>| -> Result<Option<i64>, ComplianceError> {
        text.as_deref()
            .map(|t| parse_time(t).map_err(|e| ComplianceError::invalid(format!("--{flag}: {e}"))))
            .transpose()
    };
    let parsed = (|| {
        let query = Query {
            tenant: Some(args.tenant.clone()),
            conv: args.conv.clone(),
            sender: args.sender.clone(),
            from_ms: time("from", &args.from)?,
            to_ms: time("to", &args.to)?,
            text: args.text.clone(),
        };
        query.validate()?;
        Ok::<_, ComplianceError>(query)
    })();
    match parsed {
        Ok(query) => Ok((query, actor)),
        Err(e) => {
            let filters = json!({
                "tenant": args.tenant.as_str(), "conversation": args.conv.as_ref().map(|c| c.as_str()),
                "sender": args.sender.as_ref().map(|u| u.as_str()), "from": args.from, "to": args.to,
                "text": args.text,
            });
            compliance
                .deny(
                    &args.tenant,
                    &actor,
                    action,
                    filters.to_string(),
                    &e.to_string(),
                )
                .await?;
            Err(e.into())
        }
    }
}

/// `\rscanned N events (s/t segments), M matches` on stderr while an export runs.
fn spawn_bar(progress: Arc<Progress>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            eprint!(
                "\rscanned {} events ({}/{} segments), {} matches",
                progress.scanned.load(Ordering::Relaxed),
                progress.segments_done.load(Ordering::Relaxed),
                progress.segments_total.load(Ordering::Relaxed),
                progress.hits.load(Ordering::Relaxed),
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

async fn hold_command(compliance: &Compliance, cmd: HoldCommand) -> anyhow::Result<()> {
    match cmd {
        HoldCommand::Create {
            tenant,
            actor,
            conv,
            user,
            from,
            to,
            reason,
        } => {
            let actor = Actor::new(&actor, Via::Cli)?;
            let time = |flag: &str, text: Option<String>| -> anyhow::Result<Option<i64>> {
                text.map(|t| parse_time(&t).map_err(|e| anyhow::anyhow!("--{flag}: {e}")))
                    .transpose()
            };
            let scope = match (conv, user) {
                (Some(c), _) => Scope::Conversation(c),
                (None, Some(u)) => Scope::User(u),
                (None, None) => Scope::Tenant,
            };
            let spec = HoldSpec {
                scope,
                from_ms: time("from", from)?,
                to_ms: time("to", to)?,
                reason,
            };
            let created = compliance.create_hold(&tenant, &spec, &actor).await?;
            emit(&hold::hold_json(&tenant, &created))?;
        }
        HoldCommand::List { tenant } => {
            for h in hold::list(&**compliance.store(), compliance.keyring(), &tenant).await? {
                emit(&hold::hold_json(&tenant, &h))?;
            }
        }
        HoldCommand::Release { tenant, actor, id } => {
            let actor = Actor::new(&actor, Via::Cli)?;
            let released = compliance.release_hold(&tenant, &id, &actor).await?;
            emit(&hold::hold_json(&tenant, &released))?;
        }
    }
    Ok(())
}

/// Search results as JSON lines on stdout.
struct Stdout(std::io::BufWriter<std::io::Stdout>);

#[async_trait::async_trait]
impl Sink for Stdout {
    async fn hit(&mut self, hit: Hit) -> Result<(), ComplianceError> {
        writeln!(self.0, "{}", hit_json(&hit)).map_err(stdout_error)
    }

    async fn finish(&mut self) -> Result<(), ComplianceError> {
        self.0.flush().map_err(stdout_error)
    }
}

fn stdout_error(e: std::io::Error) -> ComplianceError {
    ComplianceError::Delivery {
        to: "stdout".into(),
        reason: e.to_string(),
    }
}
