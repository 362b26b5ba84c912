//! The tool commands: each opens the log on the data directory, does one thing, prints JSON
//! lines on stdout and closes the store.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::json;
use tidings_archive::compliance::audit::Entry;
use tidings_archive::compliance::{Actor, Compliance, Via};
use tidings_log::crypto::MasterKey;
use tidings_log::store::Order;
use tidings_log::{
    Append, Body, By, ClientMsgId, CreateConversation, Log, LogError, PendingAppend, ReadRange,
    TenantId,
};
use tidings_log_api::bus_crypto::LogPublicKey;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::sync::mpsc;

use crate::cli::{Command, ConvCommand, KeysCommand, LogCommand, Target};
use crate::config::Config;
use crate::open::{env, open_log};
use crate::output::{self, emit};

/// `1h`, `30m`, `90s`, `2d`, or plain seconds.
pub fn parse_ttl(text: &str) -> anyhow::Result<u64> {
    let secs = crate::config::parse_duration_secs(text).map_err(|e| anyhow::anyhow!("ttl {e}"))?;
    anyhow::ensure!(secs > 0, "ttl {text:?} must be positive");
    Ok(secs)
}

/// Runs a tool command. Returns whether everything it was asked to do succeeded.
pub async fn run(command: Command, config: Config) -> anyhow::Result<bool> {
    match command {
        Command::Keys(KeysCommand::Init { key_file, force }) => {
            let path = key_file.unwrap_or_else(|| config.master_key_file.clone());
            keys_init(&path, force, || MasterKey::generate().to_hex())?;
            // The development token secret comes along, unless one exists already.
            let secret = &config.auth.hs256_secret_file;
            let jwt_created = !secret.exists();
            if jwt_created {
                keys_init(secret, false, || {
                    let mut bytes = [0u8; 32];
                    getrandom::fill(&mut bytes)
                        .expect("the operating system's random source failed");
                    tidings_log::crypto::hex_encode(&bytes)
                })?;
            }
            emit(&json!({
                "key_file": path.display().to_string(),
                "created": true,
                "jwt_secret_file": secret.display().to_string(),
                "jwt_secret_created": jwt_created,
            }))?;
            Ok(true)
        }
        Command::Keys(KeysCommand::BotIdentity) => {
            let master = config.master_key(env)?;
            let public = tidings_auth::ed25519_public_key(&master.bot_signing_seed());
            emit(&json!({
                "bot_public_key": tidings_log::crypto::hex_encode(&public),
                "setting": "auth.bot_public_key (TIDINGS_AUTH_BOT_PUBLIC_KEY)",
            }))?;
            Ok(true)
        }
        Command::Bot(cmd) => {
            bot(&config, cmd).await?;
            Ok(true)
        }
        Command::Cell {
            op,
            server,
            token,
            ca_file,
        } => {
            cell(op, server, token, tidings_client::ClientTls { ca_file }).await?;
            Ok(true)
        }
        Command::Keys(KeysCommand::LogIdentity) => {
            let master = config.master_key(env)?;
            let public = LogPublicKey::of_secret(&master.log_identity_secret());
            emit(&json!({
                "log_public_key": public.to_hex(),
                "setting": "gateway.log_public_key (TIDINGS_GATEWAY_LOG_PUBLIC_KEY)",
            }))?;
            Ok(true)
        }
        Command::Token(crate::cli::TokenCommand::Issue {
            tenant,
            user,
            ttl,
            role,
        }) => {
            println!("{}", issue_token(&config, &tenant, &user, &ttl, role)?);
            Ok(true)
        }
        Command::Token(crate::cli::TokenCommand::Revoke {
            tenant,
            jti,
            user,
            before,
            server,
            ca_file,
            token,
            actor,
        }) => {
            let how = match (server, token) {
                (Some(server), Some(token)) => Through::Server {
                    server,
                    token,
                    tls: tidings_client::ClientTls { ca_file },
                },
                _ => Through::Store { actor },
            };
            revoke_tokens(&config, tenant, jti, user, before, how).await
        }
        Command::Serve { role, listen } => {
            let mut config = config;
            if let Some(listen) = listen {
                config.gateway.listen = listen;
            }
            crate::serve::serve(config, role).await?;
            Ok(true)
        }
        Command::Chat {
            url,
            token,
            conv,
            history,
            ca_file,
        } => {
            let tls = tidings_client::ClientTls { ca_file };
            crate::chat::run(&url, &tls, &token, conv.as_str(), history).await
        }
        Command::Nats(crate::cli::NatsCommand::Init { dir }) => {
            let written = crate::nats_init::init(&dir)?;
            emit(&written)?;
            Ok(true)
        }
        Command::Bench(crate::cli::BenchCommand::Append(args)) => {
            crate::bench::append(args, &config).await?;
            Ok(true)
        }
        Command::Bench(crate::cli::BenchCommand::Archive(args)) => {
            crate::bench_archive::run(args).await?;
            Ok(true)
        }
        Command::Bench(crate::cli::BenchCommand::Compliance(args)) => {
            crate::bench_compliance::run(args).await?;
            Ok(true)
        }
        Command::Bench(crate::cli::BenchCommand::Outage(args)) => {
            crate::bench_outage::run(args, config.log_config()).await?;
            Ok(true)
        }
        Command::Bench(crate::cli::BenchCommand::Members(args)) => {
            crate::bench_members::run(args, config.log_config()).await?;
            Ok(true)
        }
        Command::Bench(crate::cli::BenchCommand::Search(args)) => {
            crate::bench_search::run(args, config.log_config()).await?;
            Ok(true)
        }
        Command::Bench(crate::cli::BenchCommand::Overload(args)) => {
            if args.through_gateway {
                crate::bench_overload_gateway::run(&args).await?;
            } else {
                crate::bench_overload::run(args, config.log_config()).await?;
            }
            Ok(true)
        }
        Command::Bench(crate::cli::BenchCommand::Cells(args)) => {
            crate::bench_cells::run(args).await?;
            Ok(true)
        }
        Command::Bench(crate::cli::BenchCommand::Gateway(args)) => {
            crate::bench_gateway::run(args, &config).await?;
            Ok(true)
        }
        Command::Archive(cmd) => {
            let log = open_log(&config).await?;
            let result = crate::archive::command(cmd, &log, &config).await;
            log.close().await;
            result
        }
        Command::Compliance(cmd) => {
            let log = open_log(&config).await?;
            let result = crate::compliance::command(cmd, &log, &config).await;
            log.close().await;
            result
        }
        Command::Bench(crate::cli::BenchCommand::Webhooks(args)) => {
            crate::bench_webhooks::run(args, &config).await?;
            Ok(true)
        }
        Command::Webhook(cmd) => {
            let log = open_log(&config).await?;
            let result = webhook(cmd, &log, &config).await;
            log.close().await;
            result
        }
        other => {
            let log = open_log(&config).await?;
            let result = run_on_log(other, &log).await;
            log.close().await;
            result
        }
    }
}

/// A development token: HS256, only when `auth.hs256_enabled`; a `jti` (UUID v7) so it can
/// be revoked alone; the compliance audience when it carries the compliance or admin role.
fn issue_token(
    config: &Config,
    tenant: &TenantId,
    user: &tidings_log::UserId,
    ttl: &str,
    roles: Vec<String>,
) -> anyhow::Result<String> {
    let a = &config.auth;
    let Some(secret) = crate::serve::hs256_secret(config)? else {
        bail!(
            "HS256 development tokens are disabled: set auth.hs256_enabled = true (or \
             TIDINGS_AUTH_HS256_ENABLED=1) on a development setup; production tokens come \
             from your identity provider (Ed25519, auth.ed25519_public_keys or auth.jwks_file)"
        );
    };
    let ttl = parse_ttl(ttl)?;
    if ttl > a.max_token_lifetime_secs {
        bail!(
            "ttl {ttl}s is over auth.max_token_lifetime_secs ({}s); such a token would be refused",
            a.max_token_lifetime_secs
        );
    }
    let admin_plane = roles
        .iter()
        .any(|r| r == crate::admin::COMPLIANCE_ROLE || r == crate::admin::ADMIN_ROLE);
    let audience = if admin_plane {
        &a.compliance_audience
    } else {
        &a.audience
    };
    let now = tidings_log_api::now_secs();
    let claims = tidings_auth::Claims {
        tenant: tenant.to_string(),
        user: user.to_string(),
        roles,
        expires_at: now + ttl,
        issued_at: now,
        jti: Some(uuid::Uuid::now_v7().to_string()),
    };
    Ok(tidings_auth::issue_hs256(
        &secret, &a.issuer, audience, &claims,
    ))
}

/// How `tidings token revoke` reaches the revocation records.
enum Through {
    /// A running server's admin listener, with an admin token.
    Server {
        server: String,
        token: String,
        tls: tidings_client::ClientTls,
    },
    /// The store directly (no server runs), recorded in the audit log under `actor`.
    Store { actor: String },
}

/// `tidings token revoke`: through a running server's admin listener, or on the store.
async fn revoke_tokens(
    config: &Config,
    tenant: TenantId,
    jti: Option<String>,
    user: Option<tidings_log::UserId>,
    before: Option<String>,
    how: Through,
) -> anyhow::Result<bool> {
    use crate::revoke::{Request, Target};
    let now = tidings_log_api::now_secs();
    let target = match (jti, user) {
        (Some(jti), None) => {
            Target::Jti(crate::revoke::check_jti(&jti).map_err(anyhow::Error::msg)?)
        }
        (None, Some(user)) => Target::UserBefore {
            user,
            before: crate::revoke::parse_before(before.as_deref().unwrap_or("now"), now)
                .map_err(anyhow::Error::msg)?,
        },
        _ => bail!("name a token (--jti) or a user (--user), not both"),
    };
    let request = Request { tenant, target };
    let actor = match how {
        Through::Store { actor } => Actor::new(&actor, Via::Cli)?,
        Through::Server { server, token, tls } => {
            return revoke_through_server(&server, &token, &tls, &request).await;
        }
    };
    let log = open_log(config).await.context(
        "open the store to record the revocation (while `tidings serve` runs, pass \
         --server http://ADMIN_ADDRESS --token ADMIN_TOKEN instead)",
    )?;
    // Gateways of other processes may be running: tell them, if NATS is there.
    let nats = nats_if_there(config).await;
    let result = async {
        let outcome = crate::revoke::revoke(&log, nats.as_ref(), &request).await?;
        record_key_change(
            &log,
            &request.tenant,
            &actor,
            "token_revoke",
            outcome.describe(),
        )
        .await?;
        anyhow::Ok(outcome)
    }
    .await;
    log.close().await;
    emit(&result?.to_json())?;
    Ok(true)
}

async fn revoke_through_server(
    server: &str,
    token: &str,
    tls: &tidings_client::ClientTls,
    request: &crate::revoke::Request,
) -> anyhow::Result<bool> {
    let (status, answer) = crate::revoke::call_server(server, token, tls, request).await?;
    if status != 200 {
        let message = answer["error"]["message"].as_str().unwrap_or("");
        bail!("the server refused the revocation ({status}): {message}");
    }
    emit(&answer)?;
    Ok(true)
}

/// Writes a new key file, readable by its owner only.
fn keys_init(
    path: &std::path::Path,
    force: bool,
    make: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = match options.open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
            "{} already exists; keep it (without it the data it sealed cannot be read) \
             or pass --force to replace it",
            path.display()
        ),
        other => other.with_context(|| format!("create {}", path.display()))?,
    };
    writeln!(file, "{}", make())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", path.display()))
}

async fn run_on_log(command: Command, log: &Log) -> anyhow::Result<bool> {
    match command {
        Command::Keys(KeysCommand::Rotate { tenant, actor }) => {
            let actor = Actor::new(&actor, Via::Cli)?;
            let key_id = log.keyring().rotate(&tenant).await?;
            record_key_change(
                log,
                &tenant,
                &actor,
                "rotate",
                format!("new data key {key_id}"),
            )
            .await?;
            emit(&json!({"tenant": tenant.as_str(), "key_id": key_id}))?;
        }
        Command::Keys(KeysCommand::Shred {
            tenant,
            confirm,
            actor,
        }) => {
            let actor = Actor::new(&actor, Via::Cli)?;
            if confirm.as_deref() != Some(tenant.as_str()) {
                bail!(
                    "refusing to shred tenant {tenant}: this destroys its data keys and its \
                     history can never be read again; pass --confirm {tenant} to do it"
                );
            }
            let report = compliance(log).shred(&tenant, &actor).await?;
            emit(&output::shred_report(&report))?;
        }
        Command::Keys(KeysCommand::Wrap { tenant, actor }) => {
            let actor = Actor::new(&actor, Via::Cli)?;
            let report = log.keyring().wrap_with_tenant_key(&tenant).await?;
            record_key_change(
                log,
                &tenant,
                &actor,
                "wrap",
                format!("data keys {:?} sealed under the tenant key", report.wrapped),
            )
            .await?;
            emit(&json!({
                "tenant": tenant.as_str(),
                "wrapped_key_ids": report.wrapped,
                "already_wrapped_key_ids": report.already_wrapped,
                "purged": true,
            }))?;
        }
        Command::Conv(cmd) => conv(cmd, log).await?,
        Command::Log(LogCommand::Append {
            target,
            sender,
            client_msg_id,
            text,
            edit,
            recall,
            stdin,
        }) => {
            if stdin {
                let input = tokio::io::BufReader::new(tokio::io::stdin());
                return append_lines(log, &target, &sender, input).await;
            }
            let Some(id) = client_msg_id else {
                bail!("--client-msg-id is required without --stdin");
            };
            let body = match (edit, recall, text) {
                (_, Some(target_seq), _) => {
                    Body::MessageRecalled(tidings_schemas::v1::MessageRecalled { target_seq })
                }
                (Some(target_seq), None, Some(new_text)) => {
                    Body::MessageEdited(tidings_schemas::v1::MessageEdited {
                        target_seq,
                        new_text,
                    })
                }
                (None, None, Some(text)) => {
                    Body::MessagePosted(tidings_schemas::v1::MessagePosted {
                        text,
                        ..Default::default()
                    })
                }
                (_, None, None) => bail!("--text is required without --recall or --stdin"),
            };
            let req = Append {
                tenant: target.tenant,
                conv: target.conv,
                sender,
                client_msg_id: id,
                body,
            };
            emit(&output::ack(&log.append(req).await?))?;
        }
        Command::Log(LogCommand::Read {
            target,
            from,
            limit,
            reverse,
        }) => read(log, &target, from, limit, reverse).await?,
        Command::Keys(
            KeysCommand::Init { .. } | KeysCommand::LogIdentity | KeysCommand::BotIdentity,
        )
        | Command::Archive(_)
        | Command::Compliance(_)
        | Command::Bench(_)
        | Command::Token(_)
        | Command::Bot(_)
        | Command::Cell { .. }
        | Command::Serve { .. }
        | Command::Nats(_)
        | Command::Webhook(_)
        | Command::Chat { .. } => {
            unreachable!("handled before the log is opened")
        }
    }
    Ok(true)
}

/// `keys shred`, after its confirmation: destroys the tenant's data keys and purges the store
/// (see [`Keyring::shred`]). One call on purpose, so checks that must come first and records
/// that must follow can wrap it.
/// The compliance service for key commands: audit log and holds only, no archive reads.
fn compliance(log: &Log) -> Compliance {
    Compliance::new(
        log.store().clone(),
        log.keyring().clone(),
        None,
        Arc::default(),
    )
}

/// `tidings webhook ...`: the same functions as the admin listener's routes.
async fn webhook(
    cmd: crate::cli::WebhookCommand,
    log: &Log,
    config: &Config,
) -> anyhow::Result<bool> {
    use crate::cli::WebhookCommand as W;
    let compliance = compliance(log);
    let manage = crate::webhooks::Manage {
        compliance: &compliance,
        max_per_tenant: config.webhooks.max_per_tenant,
        default_max_attempts: config.webhooks.default_max_attempts,
    };
    let lines = match cmd {
        W::Create {
            tenant,
            url,
            conversations,
            conversation_kinds,
            event_kinds,
            max_attempts,
            actor,
        } => {
            let new = crate::webhooks::NewSubscription {
                url,
                conversations,
                conversation_kinds,
                event_kinds,
                max_attempts,
            };
            let actor = Actor::new(&actor, Via::Cli)?;
            vec![manage.create(&tenant, new, &actor).await?]
        }
        W::List { tenant } => manage.list(&tenant).await?,
        W::Delete { tenant, id, actor } => {
            let actor = Actor::new(&actor, Via::Cli)?;
            vec![manage.delete(&tenant, &id, &actor).await?]
        }
        W::Replay {
            tenant,
            id,
            conv,
            from,
            actor,
        } => {
            let actor = Actor::new(&actor, Via::Cli)?;
            vec![manage.replay(&tenant, &id, &conv, from, &actor).await?]
        }
        W::DeadLetters { tenant, id } => manage.dead_letters(&tenant, &id).await?,
    };
    for line in &lines {
        emit(line)?;
    }
    Ok(true)
}

/// Records a key change in the tenant's audit log.
/// `tidings bot ...` on the store; changes recorded in the tenant's audit log.
/// `tidings cell ...`: one call to the cell's admin listener, its answer printed.
async fn cell(
    op: crate::cli::CellOp,
    server: Option<String>,
    token: Option<String>,
    tls: tidings_client::ClientTls,
) -> anyhow::Result<()> {
    use crate::cli::CellOp;
    let (Some(server), Some(token)) = (server, token) else {
        bail!(
            "tidings cell acts on a running cell: give --server (its admin listener) and --token"
        );
    };
    let (path, body) = match op {
        CellOp::Place {
            tenant,
            home,
            dr,
            tier,
            sync,
        } => (
            "/v1/admin/cells/place",
            json!({"tenant": tenant.as_str(), "home": home, "dr": dr, "tier": tier, "sync": sync}),
        ),
        CellOp::Failover {
            tenant: Some(tenant),
            unplanned,
            ..
        } => (
            "/v1/admin/cells/failover",
            json!({"tenant": tenant.as_str(), "planned": !unplanned}),
        ),
        CellOp::Failover {
            tier, unplanned, ..
        } => (
            "/v1/admin/cells/failover-tier",
            json!({"tier": tier.unwrap_or_default(), "planned": !unplanned}),
        ),
        CellOp::Show { tenant } => ("/v1/admin/cells/show", json!({"tenant": tenant.as_str()})),
        CellOp::Lost { tenant } => ("/v1/admin/cells/lost", json!({"tenant": tenant.as_str()})),
    };
    let (status, answer) = crate::revoke::post_admin(&server, path, &token, &tls, body).await?;
    if status != 200 {
        let message = answer["error"]["message"].as_str().unwrap_or("");
        bail!("the cell refused ({status}): {message}");
    }
    emit(&answer)
}

async fn bot(config: &Config, cmd: crate::cli::BotCommand) -> anyhow::Result<()> {
    use crate::cli::BotCommand;
    let log = open_log(config).await.context(
        "open the store for the bot registry (while `tidings serve` runs on an embedded \
         store, use the admin listener's /v1/admin/bots/* instead)",
    )?;
    let audience = config.auth.audience.clone();
    let result = async {
        let (tenant, actor, action, done) = match cmd {
            BotCommand::List { tenant } => {
                for line in crate::bots::list(&log, &tenant).await? {
                    emit(&line)?;
                }
                return anyhow::Ok(());
            }
            BotCommand::Create {
                tenant,
                name,
                days,
                actor,
            } => {
                let actor = Actor::new(&actor, Via::Cli)?;
                let done =
                    crate::bots::create(&log, &audience, &tenant, &name, actor.name(), days).await;
                (tenant, actor, "bot_create", done)
            }
            BotCommand::Token {
                tenant,
                bot,
                days,
                actor,
            } => {
                let done = crate::bots::token(&log, &audience, &tenant, &bot, days).await;
                (tenant, Actor::new(&actor, Via::Cli)?, "bot_token", done)
            }
            BotCommand::Revoke { tenant, bot, actor } => {
                // Gateways of other processes may be running: tell them, if NATS is there.
                let nats = nats_if_there(config).await;
                let done = crate::bots::revoke(&log, nats.as_ref(), &tenant, &bot).await;
                (tenant, Actor::new(&actor, Via::Cli)?, "bot_revoke", done)
            }
        };
        let (answer, detail) = done?;
        record_key_change(&log, &tenant, &actor, action, detail).await?;
        emit(&answer)?;
        Ok(())
    }
    .await;
    log.close().await;
    result
}

/// A NATS connection for announcing a revocation, if a server answers at `nats.url` soon.
async fn nats_if_there(config: &Config) -> Option<async_nats::Client> {
    match tokio::time::timeout(
        crate::revoke::NOTIFY_TIMEOUT,
        async_nats::ConnectOptions::new()
            .name("tidings-revoke")
            .connect(&config.nats.url),
    )
    .await
    {
        Ok(Ok(client)) => Some(client),
        _ => None,
    }
}

async fn record_key_change(
    log: &Log,
    tenant: &TenantId,
    actor: &Actor,
    action: &str,
    detail: String,
) -> anyhow::Result<()> {
    let mut entry = Entry::new(actor, action, "completed");
    entry.access_id = uuid::Uuid::now_v7().to_string();
    entry.detail = detail;
    compliance(log).record(tenant, &entry).await?;
    Ok(())
}

async fn conv(cmd: ConvCommand, log: &Log) -> anyhow::Result<()> {
    match cmd {
        ConvCommand::Create {
            target,
            kind,
            by,
            members,
            title,
        } => {
            let req = CreateConversation {
                tenant: target.tenant,
                conv: target.conv,
                kind,
                title,
                creator: by,
                members,
            };
            emit(&output::ack(&log.create_conversation(req).await?))?;
        }
        ConvCommand::AddMember {
            target,
            by,
            user,
            role,
        } => {
            let c = log
                .add_member_as(&target.tenant, &target.conv, &by, &user, role.as_deref())
                .await?;
            emit(&output::ack(&c))?;
        }
        ConvCommand::SetRole {
            target,
            by,
            user,
            role,
        } => {
            let c = log
                .set_role(&target.tenant, &target.conv, &by, &user, &role)
                .await?;
            emit(&output::ack(&c))?;
        }
        ConvCommand::SetName {
            target,
            by,
            user,
            name,
        } => {
            let by = by.map_or(By::System, By::Member);
            let c = log
                .set_display_name(&target.tenant, &target.conv, by, &user, &name)
                .await?;
            emit(&output::ack(&c))?;
        }
        ConvCommand::RemoveMember { target, by, user } => {
            let c = log
                .remove_member(&target.tenant, &target.conv, &by, &user)
                .await?;
            emit(&output::ack(&c))?;
        }
        ConvCommand::Rename { target, by, title } => {
            let c = log
                .rename(&target.tenant, &target.conv, &by, &title)
                .await?;
            emit(&output::ack(&c))?;
        }
        ConvCommand::Show { target } => {
            let info = log.conversation(&target.tenant, &target.conv).await?;
            emit(&json!({
                "tenant": target.tenant.as_str(),
                "conversation": target.conv.as_str(),
                "kind": info.kind_name,
                "head_seq": info.head_seq,
                "member_count": info.member_count,
                "last_time": output::rfc3339_ms(info.last_time_ms),
            }))?;
        }
        ConvCommand::Members {
            target,
            after,
            limit,
        } => {
            for m in log
                .members(&target.tenant, &target.conv, after.as_ref(), limit)
                .await?
            {
                emit(
                    &json!({"user": m.user.as_str(), "role": m.role_name, "display_name": m.display_name, "joined_seq": m.joined_seq}),
                )?;
            }
        }
        ConvCommand::List {
            tenant,
            user,
            after,
            limit,
        } => {
            for c in log
                .conversations(&tenant, &user, after.as_ref(), limit)
                .await?
            {
                emit(&json!({
                    "conversation": c.conv.as_str(),
                    "head_seq": c.head_seq,
                    "read_seq": c.read_seq,
                    "unread": c.unread,
                }))?;
            }
        }
        ConvCommand::MarkRead { target, user, seq } => {
            let cursor = log
                .mark_read(&target.tenant, &target.conv, &user, seq)
                .await?;
            emit(&json!({"read_seq": cursor}))?;
        }
    }
    Ok(())
}

async fn read(
    log: &Log,
    target: &Target,
    from: Option<u64>,
    limit: Option<usize>,
    reverse: bool,
) -> anyhow::Result<()> {
    let page = log.config().max_read_limit;
    let mut remaining = limit.unwrap_or(usize::MAX);
    let mut next = from;
    let order = if reverse {
        Order::Descending
    } else {
        Order::Ascending
    };
    while remaining > 0 {
        let range = ReadRange {
            from: next,
            limit: remaining.min(page),
            order,
        };
        let events = log.read(&target.tenant, &target.conv, range).await?;
        let Some(last) = events.last().map(|e| e.seq) else {
            break;
        };
        for e in &events {
            emit(&output::event(e))?;
        }
        remaining -= events.len();
        next = match order {
            Order::Ascending => Some(last + 1),
            Order::Descending if last > 1 => Some(last - 1),
            Order::Descending => break,
        };
    }
    Ok(())
}

/// One line of `log append --stdin`.
#[derive(Deserialize)]
struct InputLine {
    client_msg_id: String,
    text: String,
}

/// What the printer waits on for one input line, in input order.
enum Answer {
    Pending(Option<String>, PendingAppend),
    Failed(Option<String>, serde_json::Value),
}

/// Reads JSON lines, queues an append for each (in order, so seqs follow input order) and
/// prints each ack once durable. At most `IN_FLIGHT` appends wait at once, so memory stays
/// bounded however long the input is. Returns false if any line failed.
pub async fn append_lines(
    log: &Log,
    target: &Target,
    sender: &tidings_log::UserId,
    mut input: impl AsyncBufRead + Unpin,
) -> anyhow::Result<bool> {
    const IN_FLIGHT: usize = 8192;
    // Room for the largest body as JSON with every byte escaped, plus the envelope.
    let max_line = log.config().max_body_bytes * 6 + 1024;
    let (tx, mut rx) = mpsc::channel::<Answer>(IN_FLIGHT);
    let printer = tokio::spawn(async move {
        let mut all_ok = true;
        while let Some(answer) = rx.recv().await {
            let (id, mut line) = match answer {
                Answer::Pending(id, pending) => match pending.wait().await {
                    Ok(c) => (id, output::ack(&c)),
                    Err(e) => (id, output::error(&e)),
                },
                Answer::Failed(id, line) => (id, line),
            };
            all_ok &= line.get("error").is_none();
            if let (Some(id), Some(obj)) = (id, line.as_object_mut()) {
                obj.insert("client_msg_id".into(), id.into());
            }
            emit(&line)?;
        }
        anyhow::Ok(all_ok)
    });

    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        line_no += 1;
        let answer = match read_bounded_line(&mut input, &mut buf, max_line).await? {
            Line::End => break,
            Line::TooLong => Answer::Failed(
                None,
                json!({"error": {"code": "too_large", "line": line_no,
                    "message": format!("input line {line_no} is over {max_line} bytes")}}),
            ),
            Line::Ok if buf.iter().all(u8::is_ascii_whitespace) => continue,
            Line::Ok => match serde_json::from_slice::<InputLine>(&buf) {
                Err(e) => Answer::Failed(
                    None,
                    json!({"error": {"code": "invalid_json", "line": line_no,
                        "message": format!("input line {line_no}: {e}")}}),
                ),
                Ok(line) => {
                    let id = Some(line.client_msg_id.clone());
                    let queued = match ClientMsgId::new(line.client_msg_id) {
                        Ok(client_msg_id) => {
                            let req = Append::text(
                                target.tenant.clone(),
                                target.conv.clone(),
                                sender.clone(),
                                client_msg_id,
                                line.text,
                            );
                            log.enqueue(req).await
                        }
                        Err(e) => Err(e),
                    };
                    match queued {
                        Ok(p) => Answer::Pending(id, p),
                        Err(e @ LogError::ShuttingDown) => return Err(e.into()),
                        Err(e) => Answer::Failed(id, output::error(&e)),
                    }
                }
            },
        };
        if tx.send(answer).await.is_err() {
            break; // the printer stopped: stdout is gone
        }
    }
    drop(tx);
    printer.await.context("printer task")?
}

enum Line {
    Ok,
    TooLong,
    End,
}

/// Reads one line into `buf` (without the newline), keeping at most `max` bytes: a longer
/// line is consumed and reported, never buffered whole.
async fn read_bounded_line(
    input: &mut (impl AsyncBufRead + Unpin),
    buf: &mut Vec<u8>,
    max: usize,
) -> anyhow::Result<Line> {
    buf.clear();
    let mut too_long = false;
    let mut saw_any = false;
    loop {
        let chunk = input.fill_buf().await.context("read stdin")?;
        if chunk.is_empty() {
            return Ok(match (saw_any, too_long) {
                (false, _) => Line::End,
                (true, true) => Line::TooLong,
                (true, false) => Line::Ok,
            });
        }
        saw_any = true;
        let (part, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        if !too_long {
            if buf.len() + part.len() > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(part);
            }
        }
        let consumed = done.unwrap_or(chunk.len());
        input.consume(consumed);
        if done.is_some() {
            return Ok(if too_long { Line::TooLong } else { Line::Ok });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_skipped_not_buffered() {
        let data = format!("short\n{}\nafter\nlast", "x".repeat(100));
        let mut input = tokio::io::BufReader::with_capacity(8, data.as_bytes());
        let mut buf = Vec::new();
        let mut seen = Vec::new();
        loop {
            match read_bounded_line(&mut input, &mut buf, 10)
                .await
                .expect("read")
            {
                Line::End => break,
                Line::TooLong => {
                    assert!(buf.is_empty());
                    seen.push("<too long>".to_string())
                }
                Line::Ok => seen.push(String::from_utf8(buf.clone()).expect("utf8")),
            }
        }
        assert_eq!(seen, vec!["short", "<too long>", "after", "last"]);
    }
}
