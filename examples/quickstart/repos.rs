//! The quickstart's data layer: the user-settings repository in both shapes, and the user
//! service that routes it through a twintrack dual store.
//!
//! - Legacy: `users.profile`, a JSON object `{"theme", "notifications_enabled"}`; `{}` means
//!   "no settings".
//! - New: `user_settings(user_id, theme, notifications_enabled)`.
//!
//! `users(id, email)` is not part of the migration: it is written in every stage. Only the
//! settings move. (Also compiled into `tests/dual.rs`, which proves the guarantees through it.)
#![allow(dead_code)]

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};
use twintrack::dual::{DualStore, Resync};
use twintrack::flags::BoxFuture;
use twintrack::{Backend, Database};

/// The settings both shapes hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub theme: String,
    pub notifications_enabled: bool,
}

/// One shape's storage of user settings. Both shapes implement it; the dual store picks.
pub trait SettingsRepo: Send + Sync {
    /// The user's settings, or `None`. With `lock`, the row is locked for the transaction
    /// (used by repair so no write slips in between its read and its copy).
    fn get<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        id: i64,
        lock: bool,
    ) -> BoxFuture<'c, sqlx::Result<Option<Settings>>>;
    /// Stores the user's settings; `false` if there is no such user.
    fn put<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        id: i64,
        settings: Settings,
    ) -> BoxFuture<'c, sqlx::Result<bool>>;
    /// Removes the user's settings; `false` if there were none.
    fn delete<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        id: i64,
    ) -> BoxFuture<'c, sqlx::Result<bool>>;
}

/// Settings in `users.profile` (JSON).
pub struct LegacySettings {
    pub backend: Backend,
}

/// Settings in the `user_settings` table.
pub struct NewSettings {
    pub backend: Backend,
    /// The table lives in a database of its own (two-database mode): `users` is not there to
    /// check against, and the legacy side (authoritative until `live`) decides whether the
    /// user exists.
    pub standalone: bool,
}

fn for_share(backend: Backend, lock: bool) -> &'static str {
    match (backend, lock) {
        (Backend::Postgres, true) => " FOR SHARE",
        _ => "",
    }
}

impl SettingsRepo for LegacySettings {
    fn get<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        id: i64,
        lock: bool,
    ) -> BoxFuture<'c, sqlx::Result<Option<Settings>>> {
        Box::pin(async move {
            let sql = match self.backend {
                Backend::Postgres => {
                    "SELECT CAST(profile AS TEXT) AS profile FROM users WHERE id = $1"
                }
                Backend::Sqlite => "SELECT profile FROM users WHERE id = $1",
            };
            let sql = format!("{sql}{}", for_share(self.backend, lock));
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(conn)
                .await?;
            let Some(row) = row else { return Ok(None) };
            let profile: String = row.try_get("profile")?;
            if profile.trim() == "{}" {
                return Ok(None);
            }
            serde_json::from_str(&profile)
                .map(Some)
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))
        })
    }

    fn put<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        id: i64,
        s: Settings,
    ) -> BoxFuture<'c, sqlx::Result<bool>> {
        Box::pin(async move {
            let sql = match self.backend {
                Backend::Postgres => "UPDATE users SET profile = CAST($1 AS JSONB) WHERE id = $2",
                Backend::Sqlite => "UPDATE users SET profile = $1 WHERE id = $2",
            };
            let profile = serde_json::to_string(&s).expect("settings serialize");
            let done = sqlx::query(sql)
                .bind(profile)
                .bind(id)
                .execute(conn)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn delete<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        id: i64,
    ) -> BoxFuture<'c, sqlx::Result<bool>> {
        Box::pin(async move {
            let done = sqlx::query("UPDATE users SET profile = '{}' WHERE id = $1")
                .bind(id)
                .execute(conn)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }
}

impl SettingsRepo for NewSettings {
    fn get<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        id: i64,
        lock: bool,
    ) -> BoxFuture<'c, sqlx::Result<Option<Settings>>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT theme, CAST(notifications_enabled AS INTEGER) AS n FROM user_settings WHERE user_id = $1{}",
                for_share(self.backend, lock)
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(conn)
                .await?;
            row.map(|row| {
                Ok(Settings {
                    theme: row.try_get("theme")?,
                    notifications_enabled: row.try_get::<i64, _>("n")? != 0,
                })
            })
            .transpose()
        })
    }

    fn put<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        id: i64,
        s: Settings,
    ) -> BoxFuture<'c, sqlx::Result<bool>> {
        Box::pin(async move {
            // Only for users that exist: settings never outlive their user.
            let sql = if self.standalone {
                "INSERT INTO user_settings (user_id, theme, notifications_enabled)
                 SELECT $1, $2, $3 WHERE true
                 ON CONFLICT (user_id) DO UPDATE
                 SET theme = excluded.theme, notifications_enabled = excluded.notifications_enabled"
            } else {
                "INSERT INTO user_settings (user_id, theme, notifications_enabled)
                 SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM users WHERE id = $1)
                 ON CONFLICT (user_id) DO UPDATE
                 SET theme = excluded.theme, notifications_enabled = excluded.notifications_enabled"
            };
            let done = sqlx::query(sql)
                .bind(id)
                .bind(&s.theme)
                .bind(s.notifications_enabled)
                .execute(conn)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn delete<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        id: i64,
    ) -> BoxFuture<'c, sqlx::Result<bool>> {
        Box::pin(async move {
            let done = sqlx::query("DELETE FROM user_settings WHERE user_id = $1")
                .bind(id)
                .execute(conn)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }
}

/// How the repair worker copies one user's settings between the shapes.
pub struct SettingsResync;

impl Resync<dyn SettingsRepo> for SettingsResync {
    type Record = Settings;

    fn load<'c>(
        &'c self,
        repo: &'c dyn SettingsRepo,
        conn: &'c mut AnyConnection,
        key: i64,
    ) -> BoxFuture<'c, sqlx::Result<Option<Settings>>> {
        repo.get(conn, key, true)
    }

    fn store<'c>(
        &'c self,
        repo: &'c dyn SettingsRepo,
        conn: &'c mut AnyConnection,
        key: i64,
        record: Settings,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        Box::pin(async move { repo.put(conn, key, record).await.map(drop) })
    }

    fn delete<'c>(
        &'c self,
        repo: &'c dyn SettingsRepo,
        conn: &'c mut AnyConnection,
        key: i64,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        Box::pin(async move { repo.delete(conn, key).await.map(drop) })
    }
}

/// The dual store over the two shapes.
pub type SettingsStore = DualStore<dyn SettingsRepo, SettingsResync>;

/// The two shapes in two databases (the new one holding only `user_settings`).
pub fn split_repos(backend: Backend) -> (Arc<dyn SettingsRepo>, Arc<dyn SettingsRepo>) {
    (
        Arc::new(LegacySettings { backend }),
        Arc::new(NewSettings {
            backend,
            standalone: true,
        }),
    )
}

/// The two shapes, for `DualStore::builder`.
pub fn repos(backend: Backend) -> (Arc<dyn SettingsRepo>, Arc<dyn SettingsRepo>) {
    (
        Arc::new(LegacySettings { backend }),
        Arc::new(NewSettings {
            backend,
            standalone: false,
        }),
    )
}

/// Both shapes, created idempotently. The new table starts empty.
pub async fn create_shapes(db: &Database) -> Result<(), sqlx::Error> {
    let statements: &[&'static str] = match db.backend() {
        Backend::Postgres => &[
            "CREATE TABLE IF NOT EXISTS users (id BIGSERIAL PRIMARY KEY, email TEXT NOT NULL UNIQUE, profile JSONB NOT NULL DEFAULT '{}')",
            "CREATE TABLE IF NOT EXISTS user_settings (user_id BIGINT PRIMARY KEY, theme TEXT NOT NULL, notifications_enabled BOOLEAN NOT NULL)",
        ],
        Backend::Sqlite => &[
            "CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY AUTOINCREMENT, email TEXT NOT NULL UNIQUE, profile TEXT NOT NULL DEFAULT '{}')",
            "CREATE TABLE IF NOT EXISTS user_settings (user_id INTEGER PRIMARY KEY, theme TEXT NOT NULL, notifications_enabled INTEGER NOT NULL)",
        ],
    };
    for sql in statements {
        sqlx::raw_sql(*sql).execute(db.pool()).await?;
    }
    Ok(())
}

/// Why a user operation did not happen.
#[derive(Debug)]
pub enum UserError {
    /// No such user.
    NotFound,
    /// The email is taken.
    Duplicate,
    /// Anything else.
    Failed(twintrack::Error),
}

impl From<twintrack::Error> for UserError {
    fn from(e: twintrack::Error) -> Self {
        UserError::Failed(e)
    }
}

impl From<sqlx::Error> for UserError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => UserError::Duplicate,
            _ => UserError::Failed(e.into()),
        }
    }
}

/// The user service: `users` rows directly, settings through the dual store.
#[derive(Clone)]
pub struct Users {
    pub settings: SettingsStore,
}

impl Users {
    fn db(&self) -> &Database {
        self.settings.database()
    }

    /// Creates a user and its settings in one transaction; returns the id. (Two databases: the
    /// user row first, then the settings through the dual store.)
    pub async fn create(&self, email: &str, settings: Settings) -> Result<i64, UserError> {
        if self.settings.is_split() {
            twintrack::ryw::note_write();
            let id: i64 = sqlx::query_scalar("INSERT INTO users (email) VALUES ($1) RETURNING id")
                .bind(email)
                .fetch_one(self.db().pool())
                .await?;
            self.settings
                .write(id, move |repo, conn| repo.put(conn, id, settings.clone()))
                .await?;
            return Ok(id);
        }
        let mut tx = self.db().pool().begin().await?;
        let id: i64 = sqlx::query_scalar("INSERT INTO users (email) VALUES ($1) RETURNING id")
            .bind(email)
            .fetch_one(&mut *tx)
            .await?;
        self.settings
            .write_in(&mut tx, id, move |repo, conn| {
                repo.put(conn, id, settings.clone())
            })
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// The user's settings.
    pub async fn settings(&self, id: i64) -> Result<Settings, UserError> {
        self.settings
            .read(id, move |repo, conn| repo.get(conn, id, false))
            .await?
            .ok_or(UserError::NotFound)
    }

    /// Replaces the user's settings.
    pub async fn update(&self, id: i64, settings: Settings) -> Result<(), UserError> {
        let found = self
            .settings
            .write(id, move |repo, conn| repo.put(conn, id, settings.clone()))
            .await?;
        if found {
            Ok(())
        } else {
            Err(UserError::NotFound)
        }
    }

    /// Deletes the user and its settings. (Two databases: the settings through the dual store,
    /// then the user row.)
    pub async fn delete(&self, id: i64) -> Result<(), UserError> {
        if self.settings.is_split() {
            self.settings
                .write(id, move |repo, conn| repo.delete(conn, id))
                .await?;
            let gone = sqlx::query("DELETE FROM users WHERE id = $1")
                .bind(id)
                .execute(self.db().pool())
                .await?
                .rows_affected();
            return if gone == 0 {
                Err(UserError::NotFound)
            } else {
                Ok(())
            };
        }
        let mut tx = self.db().pool().begin().await?;
        self.settings
            .write_in(&mut tx, id, move |repo, conn| repo.delete(conn, id))
            .await?;
        let gone = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if gone == 0 {
            return Err(UserError::NotFound);
        }
        tx.commit().await?;
        Ok(())
    }
}
