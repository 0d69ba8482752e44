//! First run: a database that does not exist yet is created when the role may, or the
//! error says exactly what to run. Connection failures of any other kind are left to
//! [`super::connect`], which names their cause.

use sqlx::{ConnectOptions, Connection, PgConnection};

/// Why the database could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(
        "database \"{database}\" does not exist yet: run `idem migrate` to create it (or point DATABASE_URL at an existing database)"
    )]
    Missing { database: String },
    #[error(
        "database \"{database}\" does not exist and role \"{role}\" may not create it. Ask a Postgres admin to run `CREATE DATABASE \"{database}\" OWNER \"{role}\";`, then run `idem migrate`"
    )]
    MayNotCreate { database: String, role: String },
}

/// What [`ensure_database`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Prepared {
    /// The database exists (or connecting failed for another reason, which the pool's
    /// connect reports with its cause).
    Existing,
    /// This call created the database of this name.
    Created(String),
    /// Another first run created it a moment ago.
    CreatedByAnother,
}

/// Creates the database `url` names when it does not exist and `create` is set. Errors
/// other than "does not exist" are not reported here: the pool's connect reports them
/// with their cause.
pub async fn ensure_database(url: &str, create: bool) -> Result<Prepared, BootstrapError> {
    // The same TLS policy, PG* variables and sslmode defaults as every other session.
    let Ok(target) = super::session::Target::parse(url) else {
        return Ok(Prepared::Existing);
    };
    let options = target
        .options("idem bootstrap")
        .log_statements(tracing::log::LevelFilter::Off);
    let missing = match PgConnection::connect_with(&options).await {
        Ok(connection) => {
            let _ = connection.close().await;
            false
        }
        Err(sqlx::Error::Database(err)) => err.code().as_deref() == Some("3D000"),
        Err(_) => false,
    };
    if !missing {
        return Ok(Prepared::Existing);
    }
    let database = options.get_database().unwrap_or_default().to_string();
    let role = options.get_username().to_string();
    if !create {
        return Err(BootstrapError::Missing { database });
    }
    for maintenance in ["postgres", "template1"] {
        let Ok(mut admin) =
            PgConnection::connect_with(&options.clone().database(maintenance)).await
        else {
            continue;
        };
        let created = sqlx::query(&format!(
            "CREATE DATABASE \"{}\"",
            database.replace('"', "\"\"")
        ))
        .execute(&mut admin)
        .await;
        let _ = admin.close().await;
        return match created {
            Ok(_) => Ok(Prepared::Created(database)),
            Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("42P04") => {
                Ok(Prepared::CreatedByAnother)
            }
            Err(_) => Err(BootstrapError::MayNotCreate { database, role }),
        };
    }
    Err(BootstrapError::MayNotCreate { database, role })
}
