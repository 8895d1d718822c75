//! `coffer key …`: the Keys service from the shell.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine;
use clap::{Args, Subcommand, ValueEnum};
use coffer_proto::v1::keys_client::KeysClient;
use coffer_proto::v1::{
    CreateKeyRequest, DecryptRequest, DeleteKeyRequest, EncryptRequest, GenerateDataKeyRequest, GetKeyRequest,
    HmacRequest, Key, KeyType, ListKeysRequest, RewrapRequest, RotateKeyRequest, SignRequest, UpdateKeyConfigRequest,
    VerifyRequest,
};
use serde_json::json;

use crate::cli::client::{connect, describe_status, ConnectArgs};
use crate::cli::Output;
use crate::secrets::cli::{millis, random_request_id, read_value};

/// Options shared by every key command.
#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    #[command(subcommand)]
    command: KeyCommand,
}

/// Key types, as the CLI spells them.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum CliKeyType {
    /// AES-256-GCM encryption.
    Aes256Gcm,
    /// Ed25519 signatures.
    Ed25519,
    /// ECDSA P-256 / SHA-256 signatures.
    EcdsaP256,
    /// HMAC-SHA-256.
    HmacSha256,
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Create a named key.
    Create {
        /// The key name.
        name: String,
        /// The key type.
        #[arg(long = "type", value_enum, default_value_t = CliKeyType::Aes256Gcm)]
        key_type: CliKeyType,
        /// Allow export of the key material (fixed at creation; default: never).
        #[arg(long)]
        exportable: bool,
        /// Idempotency key: retrying with the same id creates the key once. Default: a random id.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Show a key: type, versions, primary version, config, public keys.
    Get {
        /// The key name.
        name: String,
    },
    /// List key names.
    List,
    /// Make a new version primary; old versions still decrypt and verify.
    Rotate {
        /// The key name.
        name: String,
        /// Idempotency key: retrying with the same id changes the key once. Default: a random id.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Change a key's config.
    Config {
        /// The key name.
        name: String,
        /// Versions below this can no longer decrypt or verify. Only moves forward.
        #[arg(long)]
        min_decryption_version: Option<u32>,
        /// Allow or forbid `coffer key delete`.
        #[arg(long)]
        deletion_allowed: Option<bool>,
        /// Rotate automatically this often (e.g. 30d); 0 turns it off.
        #[arg(long, value_parser = humantime::parse_duration)]
        auto_rotate_period: Option<std::time::Duration>,
        /// Idempotency key: retrying with the same id changes the key once. Default: a random id.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Delete a key whose config allows deletion.
    Delete {
        /// The key name.
        name: String,
        /// Idempotency key: retrying with the same id changes the key once. Default: a random id.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Encrypt: prints coffer:v<N>:<base64>. Plaintext from --file, the argument, or stdin.
    Encrypt {
        /// The key name.
        name: String,
        /// The plaintext; omit (or "-") to read stdin.
        plaintext: Option<String>,
        /// Read the plaintext from this file.
        #[arg(long, conflicts_with = "plaintext")]
        file: Option<PathBuf>,
        /// Associated data bound to the ciphertext.
        #[arg(long, default_value = "")]
        associated_data: String,
    },
    /// Decrypt: prints the raw plaintext.
    Decrypt {
        /// The key name.
        name: String,
        /// The ciphertext (coffer:v<N>:…).
        ciphertext: String,
        /// The associated data given at encryption.
        #[arg(long, default_value = "")]
        associated_data: String,
    },
    /// Re-encrypt under the primary version without revealing the plaintext.
    Rewrap {
        /// The key name.
        name: String,
        /// The ciphertext.
        ciphertext: String,
        /// The associated data given at encryption.
        #[arg(long, default_value = "")]
        associated_data: String,
    },
    /// Make a data key: prints its ciphertext (and, with --with-plaintext, the key in base64).
    Datakey {
        /// The key name.
        name: String,
        /// 128 or 256.
        #[arg(long, default_value_t = 256)]
        bits: u32,
        /// Also print the plaintext data key.
        #[arg(long)]
        with_plaintext: bool,
    },
    /// Sign a message (from --file, the argument, or stdin).
    Sign {
        /// The key name.
        name: String,
        /// The message; omit (or "-") to read stdin.
        message: Option<String>,
        /// Read the message from this file.
        #[arg(long, conflicts_with = "message")]
        file: Option<PathBuf>,
    },
    /// Verify a signature; exits 0 when valid, 1 when not.
    Verify {
        /// The key name.
        name: String,
        /// The signature (coffer:v<N>:…).
        signature: String,
        /// The message; omit (or "-") to read stdin.
        message: Option<String>,
        /// Read the message from this file.
        #[arg(long, conflicts_with = "message")]
        file: Option<PathBuf>,
    },
    /// HMAC-SHA-256 of a message (from --file, the argument, or stdin).
    Hmac {
        /// The key name.
        name: String,
        /// The message; omit (or "-") to read stdin.
        message: Option<String>,
        /// Read the message from this file.
        #[arg(long, conflicts_with = "message")]
        file: Option<PathBuf>,
    },
}

fn describe(key: &Key) -> serde_json::Value {
    let config = key.config.unwrap_or_default();
    json!({
        "name": key.name,
        "type": KeyType::try_from(key.r#type).map(|t| t.as_str_name()).unwrap_or("UNKNOWN"),
        "exportable": key.exportable,
        "primary_version": key.primary_version,
        "min_decryption_version": config.min_decryption_version,
        "deletion_allowed": config.deletion_allowed,
        "auto_rotate_period_seconds": config.auto_rotate_period.map(|d| d.seconds),
        "created_at": millis(key.created_at.as_ref()),
        "versions": key.versions.iter().map(|v| json!({
            "version": v.version,
            "created_at": millis(v.created_at.as_ref()),
            "public_key_base64": (!v.public_key.is_empty()).then(|| base64::engine::general_purpose::STANDARD.encode(&v.public_key)),
            "encrypts": v.encrypts,
            "decrypts": v.decrypts,
            "last_used": millis(v.last_used.as_ref()),
        })).collect::<Vec<_>>(),
        "usage_nodes_answered": key.usage_nodes_answered,
        "usage_nodes_total": key.usage_nodes_total,
    })
}

fn key_text(key: &Key) -> String {
    let j = describe(key);
    let mut out = format!(
        "usage from {} of {} nodes\nname:            {}\ntype:            {}\nprimary version: {}\nmin decryption:  {}\ndeletion allowed: {}\nexportable:      {}\nversions:",
        key.usage_nodes_answered,
        key.usage_nodes_total,
        j["name"].as_str().unwrap_or_default(),
        j["type"].as_str().unwrap_or_default(),
        key.primary_version,
        j["min_decryption_version"],
        j["deletion_allowed"],
        key.exportable
    );
    for v in j["versions"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n  v{}  created {}  encrypts {}  decrypts {}  last used {}",
            v["version"],
            v["created_at"].as_str().unwrap_or_default(),
            v["encrypts"],
            v["decrypts"],
            v["last_used"].as_str().unwrap_or("never")
        ));
        if let Some(pk) = v["public_key_base64"].as_str() {
            out.push_str(&format!("  public key {pk}"));
        }
    }
    out
}

/// Runs a key command; a gRPC error prints its code and message and exits 1.
pub async fn run(args: KeyArgs) -> anyhow::Result<ExitCode> {
    let mut c = KeysClient::new(connect(&args.conn).await?);
    let json_out = args.output == Output::Json;
    let mut out = std::io::stdout().lock();
    let result: Result<Vec<u8>, tonic::Status> = match args.command {
        KeyCommand::Create { name, key_type, exportable, request_id } => {
            let request_id = request_id.map_or_else(random_request_id, Ok)?;
            let t = match key_type {
                CliKeyType::Aes256Gcm => KeyType::Aes256Gcm,
                CliKeyType::Ed25519 => KeyType::Ed25519,
                CliKeyType::EcdsaP256 => KeyType::EcdsaP256,
                CliKeyType::HmacSha256 => KeyType::HmacSha256,
            };
            c.create_key(CreateKeyRequest { name, r#type: t as i32, exportable, request_id })
                .await
                .map(|r| r.into_inner())
                .map(|k| if json_out { describe(&k).to_string() } else { key_text(&k) }.into_bytes())
        }
        KeyCommand::Get { name } => c.get_key(GetKeyRequest { name }).await.map(|r| {
            let k = r.into_inner();
            if json_out { describe(&k).to_string() } else { key_text(&k) }.into_bytes()
        }),
        KeyCommand::List => {
            let mut names = Vec::new();
            let mut token = String::new();
            loop {
                match c.list_keys(ListKeysRequest { page_size: 1000, page_token: token.clone() }).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        names.extend(r.names);
                        if r.next_page_token.is_empty() {
                            break Ok(if json_out { json!({"names": names}).to_string() } else { names.join("\n") }
                                .into_bytes());
                        }
                        token = r.next_page_token;
                    }
                    Err(s) => break Err(s),
                }
            }
        }
        KeyCommand::Rotate { name, request_id } => {
            let request_id = request_id.map_or_else(random_request_id, Ok)?;
            c.rotate_key(RotateKeyRequest { name, request_id }).await.map(|r| {
                let k = r.into_inner();
                if json_out {
                    describe(&k).to_string()
                } else {
                    format!("{}: version {} is primary", k.name, k.primary_version)
                }
                .into_bytes()
            })
        }
        KeyCommand::Config { name, min_decryption_version, deletion_allowed, auto_rotate_period, request_id } => {
            let req = UpdateKeyConfigRequest {
                name,
                min_decryption_version,
                request_id: request_id.map_or_else(random_request_id, Ok)?,
                deletion_allowed,
                auto_rotate_period: auto_rotate_period.map(|d| prost_types::Duration {
                    seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
                }),
            };
            c.update_key_config(req).await.map(|r| {
                let k = r.into_inner();
                if json_out { describe(&k).to_string() } else { key_text(&k) }.into_bytes()
            })
        }
        KeyCommand::Delete { name, request_id } => {
            let request_id = request_id.map_or_else(random_request_id, Ok)?;
            c.delete_key(DeleteKeyRequest { name: name.clone(), request_id }).await.map(|_| {
                if json_out { json!({"deleted": name}).to_string() } else { format!("deleted key {name}") }.into_bytes()
            })
        }
        KeyCommand::Encrypt { name, plaintext, file, associated_data } => {
            let plaintext = read_value(plaintext, file)?;
            let req =
                EncryptRequest { name, plaintext: plaintext.to_vec(), associated_data: associated_data.into_bytes() };
            c.encrypt(req).await.map(|r| {
                let r = r.into_inner();
                ciphertext_out(r.ciphertext, r.key_version, json_out)
            })
        }
        KeyCommand::Decrypt { name, ciphertext, associated_data } => {
            let req = DecryptRequest { name, ciphertext, associated_data: associated_data.into_bytes() };
            match c.decrypt(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    let plaintext = zeroize::Zeroizing::new(r.plaintext);
                    if json_out {
                        let mut obj = json!({"key_version": r.key_version});
                        match std::str::from_utf8(&plaintext) {
                            Ok(t) => obj["plaintext"] = json!(t),
                            Err(_) => {
                                obj["plaintext_base64"] =
                                    json!(base64::engine::general_purpose::STANDARD.encode(&*plaintext))
                            }
                        }
                        writeln!(out, "{obj}")?;
                    } else {
                        // The raw plaintext, nothing added.
                        out.write_all(&plaintext)?;
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                Err(s) => Err(s),
            }
        }
        KeyCommand::Rewrap { name, ciphertext, associated_data } => {
            let req = RewrapRequest { name, ciphertext, associated_data: associated_data.into_bytes() };
            c.rewrap(req).await.map(|r| {
                let r = r.into_inner();
                ciphertext_out(r.ciphertext, r.key_version, json_out)
            })
        }
        KeyCommand::Datakey { name, bits, with_plaintext } => {
            c.generate_data_key(GenerateDataKeyRequest { name, bits, with_plaintext }).await.map(|r| {
                let r = r.into_inner();
                let plain =
                    (!r.plaintext.is_empty()).then(|| base64::engine::general_purpose::STANDARD.encode(&r.plaintext));
                if json_out {
                    json!({"ciphertext": r.ciphertext, "plaintext_base64": plain, "key_version": r.key_version})
                        .to_string()
                } else {
                    match plain {
                        Some(p) => format!("ciphertext: {}\nplaintext:  {p}", r.ciphertext),
                        None => r.ciphertext,
                    }
                }
                .into_bytes()
            })
        }
        KeyCommand::Sign { name, message, file } => {
            let message = read_value(message, file)?;
            c.sign(SignRequest { name, message: message.to_vec() }).await.map(|r| {
                let r = r.into_inner();
                if json_out {
                    json!({"signature": r.signature, "key_version": r.key_version}).to_string()
                } else {
                    r.signature
                }
                .into_bytes()
            })
        }
        KeyCommand::Verify { name, signature, message, file } => {
            let message = read_value(message, file)?;
            match c.verify(VerifyRequest { name, message: message.to_vec(), signature }).await {
                Ok(r) => {
                    let valid = r.into_inner().valid;
                    writeln!(
                        out,
                        "{}",
                        if json_out { json!({"valid": valid}).to_string() } else { format!("valid: {valid}") }
                    )?;
                    return Ok(if valid { ExitCode::SUCCESS } else { ExitCode::FAILURE });
                }
                Err(s) => Err(s),
            }
        }
        KeyCommand::Hmac { name, message, file } => {
            let message = read_value(message, file)?;
            c.hmac(HmacRequest { name, message: message.to_vec() }).await.map(|r| {
                let r = r.into_inner();
                if json_out { json!({"hmac": r.hmac, "key_version": r.key_version}).to_string() } else { r.hmac }
                    .into_bytes()
            })
        }
    };
    match result {
        Ok(bytes) => {
            out.write_all(&bytes)?;
            if !bytes.is_empty() && !bytes.ends_with(b"\n") {
                out.write_all(b"\n")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(status) => {
            eprintln!("error: {}", describe_status(&status));
            Ok(ExitCode::FAILURE)
        }
    }
}

/// What encrypt and rewrap print: the ciphertext, or JSON with its key version.
fn ciphertext_out(ciphertext: String, key_version: u32, json_out: bool) -> Vec<u8> {
    if json_out {
        json!({"ciphertext": ciphertext, "key_version": key_version}).to_string().into_bytes()
    } else {
        ciphertext.into_bytes()
    }
}
