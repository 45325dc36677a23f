//! The quickstart's data layer: the user-settings repository in both shapes, and the user
//! service that routes it through a twintrack dual store.
//!
//! - Legacy: `users.profile`, a JSON object `{"theme", "notifications_enabled"}`; `{}` means
//!   "no settings".
//! - New: `user_settings(user_id, theme, notifications_enabled)`.
//!
//! `users(id, email)` is not part of the migration: it is written in every stage. Only the
//! settings move.
//!
//! The quickstart runs on SQLite (its default) and on PostgreSQL, and its tests run it with
//! `bigint`, UUID and text user ids, so this file is written once for every backend and id
//! type: it runs its statements on the native connection the dual store hands it through
//! twintrack's backend-neutral [`query`]. A service on one database writes its repositories
//! with sqlx directly on `&mut PgConnection` (typed `query_as`, `FromRow`, the `query!`
//! macros): see `examples/articles/`.
#![allow(dead_code)]

use std::marker::PhantomData;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use twintrack::db::{Native, Query, query};
use twintrack::dual::{DualStore, NativeConnection, Resync};
use twintrack::flags::BoxFuture;
use twintrack::{Backend, Database, Key};

/// The settings both shapes hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub theme: String,
    pub notifications_enabled: bool,
}

/// A user id type the quickstart runs with: `i64` (the example itself), `uuid::Uuid` or
/// `String` (its tests).
pub trait UserId: Key + Serialize {
    /// `users.id`'s type and key clause (an integer id is assigned by the database).
    fn id_column(backend: Backend) -> &'static str;
    /// `user_settings.user_id`'s type.
    fn key_type(backend: Backend) -> &'static str;
    /// A new user's id chosen by the service, or `None` when the database assigns it.
    fn generate() -> Option<Self>;
    /// The id in a request path, if it is one.
    fn from_path(text: &str) -> Option<Self>;
    /// What an id looks like, for error messages.
    const SHAPE: &'static str;
}

impl UserId for i64 {
    fn id_column(backend: Backend) -> &'static str {
        match backend {
            Backend::Postgres => "BIGSERIAL PRIMARY KEY",
            Backend::MySql => "BIGINT AUTO_INCREMENT PRIMARY KEY",
            _ => "INTEGER PRIMARY KEY AUTOINCREMENT",
        }
    }
    fn key_type(backend: Backend) -> &'static str {
        match backend {
            Backend::Postgres | Backend::MySql => "BIGINT",
            _ => "INTEGER",
        }
    }
    fn generate() -> Option<Self> {
        None
    }
    fn from_path(text: &str) -> Option<Self> {
        text.parse().ok().filter(|id| *id > 0)
    }
    const SHAPE: &'static str = "a positive integer";
}

impl UserId for uuid::Uuid {
    fn id_column(_: Backend) -> &'static str {
        "UUID PRIMARY KEY"
    }
    // On SQLite a column declared `UUID` holds sqlx's 16-byte blobs.
    fn key_type(_: Backend) -> &'static str {
        "UUID"
    }
    fn generate() -> Option<Self> {
        Some(uuid::Uuid::new_v4())
    }
    fn from_path(text: &str) -> Option<Self> {
        uuid::Uuid::parse_str(text).ok()
    }
    const SHAPE: &'static str = "a UUID";
}

impl UserId for String {
    // MySQL: a text key is a `varchar` under a collation that compares byte for byte.
    fn id_column(backend: Backend) -> &'static str {
        match backend {
            Backend::MySql => "VARCHAR(64) COLLATE utf8mb4_nopad_bin NOT NULL PRIMARY KEY",
            _ => "TEXT NOT NULL PRIMARY KEY",
        }
    }
    fn key_type(backend: Backend) -> &'static str {
        match backend {
            Backend::MySql => "VARCHAR(64) COLLATE utf8mb4_nopad_bin NOT NULL",
            _ => "TEXT NOT NULL",
        }
    }
    fn generate() -> Option<Self> {
        Some(format!("u-{}", uuid::Uuid::new_v4().simple()))
    }
    fn from_path(text: &str) -> Option<Self> {
        (!text.is_empty() && text.len() <= 64).then(|| text.to_owned())
    }
    const SHAPE: &'static str = "1 to 64 characters";
}

/// One shape's storage of user settings. Both shapes implement it; the dual store picks.
pub trait SettingsRepo<DB: Native, K>: Send + Sync {
    /// The user's settings, or `None`. With `lock`, the row is locked for the transaction
    /// (used by repair so no write slips in between its read and its copy).
    fn get<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        id: K,
        lock: bool,
    ) -> BoxFuture<'c, sqlx::Result<Option<Settings>>>;
    /// Stores the user's settings; `false` if there is no such user.
    fn put<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        id: K,
        settings: Settings,
    ) -> BoxFuture<'c, sqlx::Result<bool>>;
    /// Removes the user's settings; `false` if there were none.
    fn delete<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        id: K,
    ) -> BoxFuture<'c, sqlx::Result<bool>>;
}

/// Settings in `users.profile` (JSON).
pub struct LegacySettings;

/// Settings in the `user_settings` table.
pub struct NewSettings {
    /// The table lives in a database of its own (two-database mode): `users` is not there to
    /// check against, and the legacy side (authoritative until `live`) decides whether the
    /// user exists.
    pub standalone: bool,
}

fn for_share<DB: Native>(lock: bool) -> &'static str {
    match (DB::BACKEND, lock) {
        (Backend::Postgres, true) => " FOR SHARE",
        (Backend::MySql, true) => " LOCK IN SHARE MODE",
        _ => "",
    }
}

impl<DB: Native, K: UserId> SettingsRepo<DB, K> for LegacySettings {
    fn get<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        id: K,
        lock: bool,
    ) -> BoxFuture<'c, sqlx::Result<Option<Settings>>> {
        Box::pin(async move {
            let sql = match DB::BACKEND {
                Backend::Postgres => {
                    "SELECT CAST(profile AS TEXT) AS profile FROM users WHERE id = $1"
                }
                _ => "SELECT profile FROM users WHERE id = $1",
            };
            let row = Query::assert_safe(format!("{sql}{}", for_share::<DB>(lock)))
                .bind_key(&id.to_dyn())
                .fetch_optional(DB::conn(conn))
                .await?;
            let Some(row) = row else { return Ok(None) };
            let profile: String = row.get("profile")?;
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
        conn: &'c mut NativeConnection<DB>,
        id: K,
        s: Settings,
    ) -> BoxFuture<'c, sqlx::Result<bool>> {
        Box::pin(async move {
            let sql = match DB::BACKEND {
                Backend::Postgres => "UPDATE users SET profile = CAST($1 AS JSONB) WHERE id = $2",
                _ => "UPDATE users SET profile = $1 WHERE id = $2",
            };
            let profile = serde_json::to_string(&s).expect("settings serialize");
            let changed = query(sql)
                .bind(profile)
                .bind_key(&id.to_dyn())
                .execute(DB::conn(conn))
                .await?;
            Ok(changed == 1)
        })
    }

    fn delete<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        id: K,
    ) -> BoxFuture<'c, sqlx::Result<bool>> {
        Box::pin(async move {
            let changed = query("UPDATE users SET profile = '{}' WHERE id = $1")
                .bind_key(&id.to_dyn())
                .execute(DB::conn(conn))
                .await?;
            Ok(changed == 1)
        })
    }
}

impl<DB: Native, K: UserId> SettingsRepo<DB, K> for NewSettings {
    fn get<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        id: K,
        lock: bool,
    ) -> BoxFuture<'c, sqlx::Result<Option<Settings>>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT theme, notifications_enabled FROM user_settings WHERE user_id = $1{}",
                for_share::<DB>(lock)
            );
            let row = Query::assert_safe(sql)
                .bind_key(&id.to_dyn())
                .fetch_optional(DB::conn(conn))
                .await?;
            Ok(match row {
                None => None,
                Some(row) => Some(Settings {
                    theme: row.get("theme")?,
                    notifications_enabled: row.get("notifications_enabled")?,
                }),
            })
        })
    }

    fn put<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        id: K,
        s: Settings,
    ) -> BoxFuture<'c, sqlx::Result<bool>> {
        Box::pin(async move {
            // Only for users that exist: settings never outlive their user.
            let sql = match (DB::BACKEND, self.standalone) {
                (Backend::MySql, true) => {
                    "INSERT INTO user_settings (user_id, theme, notifications_enabled)
                     VALUES ($1, $2, $3)
                     ON DUPLICATE KEY UPDATE
                     theme = VALUES(theme), notifications_enabled = VALUES(notifications_enabled)"
                }
                (Backend::MySql, false) => {
                    "INSERT INTO user_settings (user_id, theme, notifications_enabled)
                     SELECT $1, $2, $3 FROM DUAL WHERE EXISTS (SELECT 1 FROM users WHERE id = $1)
                     ON DUPLICATE KEY UPDATE
                     theme = VALUES(theme), notifications_enabled = VALUES(notifications_enabled)"
                }
                (_, true) => {
                    "INSERT INTO user_settings (user_id, theme, notifications_enabled)
                     SELECT $1, $2, $3 WHERE true
                     ON CONFLICT (user_id) DO UPDATE
                     SET theme = excluded.theme, notifications_enabled = excluded.notifications_enabled"
                }
                (_, false) => {
                    "INSERT INTO user_settings (user_id, theme, notifications_enabled)
                     SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM users WHERE id = $1)
                     ON CONFLICT (user_id) DO UPDATE
                     SET theme = excluded.theme, notifications_enabled = excluded.notifications_enabled"
                }
            };
            let changed = query(sql)
                .bind_key(&id.to_dyn())
                .bind(s.theme)
                .bind(s.notifications_enabled)
                .execute(DB::conn(conn))
                .await?;
            // MySQL counts an upsert that updated as 2 rows.
            Ok(changed >= 1)
        })
    }

    fn delete<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        id: K,
    ) -> BoxFuture<'c, sqlx::Result<bool>> {
        Box::pin(async move {
            let changed = query("DELETE FROM user_settings WHERE user_id = $1")
                .bind_key(&id.to_dyn())
                .execute(DB::conn(conn))
                .await?;
            Ok(changed == 1)
        })
    }
}

/// How the dual store copies one user's settings between the shapes.
pub struct SettingsResync<DB, K>(PhantomData<fn() -> (DB, K)>);

impl<DB, K> Default for SettingsResync<DB, K> {
    fn default() -> Self {
        SettingsResync(PhantomData)
    }
}

// For every lifetime of the trait object (not only `'static`): a generic async handler's
// future is checked for `Send` with its lifetimes erased, and needs the impl that general.
impl<'a, DB: Native, K: UserId> Resync<dyn SettingsRepo<DB, K> + 'a> for SettingsResync<DB, K> {
    type Database = DB;
    type Key = K;
    type Record = Settings;

    fn load<'c>(
        &'c self,
        repo: &'c (dyn SettingsRepo<DB, K> + 'a),
        conn: &'c mut NativeConnection<DB>,
        key: &'c K,
    ) -> BoxFuture<'c, sqlx::Result<Option<Settings>>> {
        repo.get(conn, key.clone(), true)
    }

    fn store<'c>(
        &'c self,
        repo: &'c (dyn SettingsRepo<DB, K> + 'a),
        conn: &'c mut NativeConnection<DB>,
        key: &'c K,
        record: Settings,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        Box::pin(async move { repo.put(conn, key.clone(), record).await.map(drop) })
    }

    fn delete<'c>(
        &'c self,
        repo: &'c (dyn SettingsRepo<DB, K> + 'a),
        conn: &'c mut NativeConnection<DB>,
        key: &'c K,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        Box::pin(async move { repo.delete(conn, key.clone()).await.map(drop) })
    }
}

/// The dual store over the two shapes.
pub type SettingsStore<DB, K> = DualStore<dyn SettingsRepo<DB, K>, SettingsResync<DB, K>>;

/// One shape's repository, shared.
pub type Repo<DB, K> = Arc<dyn SettingsRepo<DB, K>>;

/// The two shapes, for `DualStore::builder`.
pub fn repos<DB: Native, K: UserId>() -> (Repo<DB, K>, Repo<DB, K>) {
    (
        Arc::new(LegacySettings),
        Arc::new(NewSettings { standalone: false }),
    )
}

/// The two shapes in two databases (the new one holding only `user_settings`).
pub fn split_repos<DB: Native, K: UserId>() -> (Repo<DB, K>, Repo<DB, K>) {
    (
        Arc::new(LegacySettings),
        Arc::new(NewSettings { standalone: true }),
    )
}

/// Both shapes, created idempotently, with user ids of type `K`. The new table starts empty.
pub async fn create_shapes<K: UserId>(db: &Database) -> twintrack::Result<()> {
    create_shapes_apart::<K>(db, db).await
}

/// Creates `users` in `legacy` and `user_settings` in `new` (idempotent): the new shape in a
/// database of its own when they differ.
pub async fn create_shapes_apart<K: UserId>(
    legacy: &Database,
    new: &Database,
) -> twintrack::Result<()> {
    let [users, _] = shape_ddl::<K>(legacy);
    Query::assert_safe(users).execute(legacy).await?;
    let [_, settings] = shape_ddl::<K>(new);
    Query::assert_safe(settings).execute(new).await?;
    Ok(())
}

/// `CREATE TABLE IF NOT EXISTS` of `users` and of `user_settings`, for `db`'s backend.
fn shape_ddl<K: UserId>(db: &Database) -> [String; 2] {
    let id = K::id_column(db.backend());
    let key = K::key_type(db.backend());
    match db.backend() {
        Backend::Postgres => [
            format!(
                "CREATE TABLE IF NOT EXISTS users (id {id}, email TEXT NOT NULL UNIQUE, profile JSONB NOT NULL DEFAULT '{{}}')"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS user_settings (user_id {key} PRIMARY KEY, theme TEXT NOT NULL, notifications_enabled BOOLEAN NOT NULL)"
            ),
        ],
        Backend::MySql => [
            format!(
                "CREATE TABLE IF NOT EXISTS users (id {id}, email VARCHAR(255) NOT NULL UNIQUE, profile TEXT NOT NULL DEFAULT '{{}}')"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS user_settings (user_id {key} PRIMARY KEY, theme VARCHAR(255) NOT NULL, notifications_enabled BOOLEAN NOT NULL)"
            ),
        ],
        _ => [
            format!(
                "CREATE TABLE IF NOT EXISTS users (id {id}, email TEXT NOT NULL UNIQUE, profile TEXT NOT NULL DEFAULT '{{}}')"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS user_settings (user_id {key} PRIMARY KEY, theme TEXT NOT NULL, notifications_enabled INTEGER NOT NULL)"
            ),
        ],
    }
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
        match &e {
            twintrack::Error::Database(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                UserError::Duplicate
            }
            _ => UserError::Failed(e),
        }
    }
}

impl From<sqlx::Error> for UserError {
    fn from(e: sqlx::Error) -> Self {
        twintrack::Error::from(e).into()
    }
}

/// The user service: `users` rows directly, settings through the dual store.
pub struct Users<DB: Native, K: UserId> {
    pub settings: SettingsStore<DB, K>,
}

impl<DB: Native, K: UserId> Clone for Users<DB, K> {
    fn clone(&self) -> Self {
        Users {
            settings: self.settings.clone(),
        }
    }
}

impl<DB: Native, K: UserId> Users<DB, K> {
    fn db(&self) -> &Database {
        self.settings.database()
    }

    /// Inserts the user row on `conn`; returns its id.
    async fn insert_user(conn: &mut NativeConnection<DB>, email: &str) -> Result<K, UserError> {
        let row = match K::generate() {
            Some(id) => query("INSERT INTO users (id, email) VALUES ($1, $2) RETURNING id")
                .bind_key(&id.to_dyn())
                .bind(email),
            None => query("INSERT INTO users (email) VALUES ($1) RETURNING id").bind(email),
        }
        .fetch_one(DB::conn(conn))
        .await?;
        Ok(K::from_dyn(twintrack::DynKey::from_row(row, K::KINDS)?)?)
    }

    /// Creates a user and its settings in one transaction; returns the id. (Two databases: the
    /// user row first, then the settings through the dual store.)
    pub async fn create(&self, email: &str, settings: Settings) -> Result<K, UserError> {
        if self.settings.is_split() {
            twintrack::ryw::note_write();
            let mut conn = self.settings.pool().acquire().await?;
            let id = Self::insert_user(&mut conn, email).await?;
            drop(conn);
            let key = id.clone();
            self.settings
                .write(&id, move |repo, conn| {
                    repo.put(conn, key.clone(), settings.clone())
                })
                .await?;
            return Ok(id);
        }
        // One transaction of the store's own: the user row, then the settings on both sides.
        let email = email.to_owned();
        self.settings
            .transaction(move |tx| {
                let (email, settings) = (email.clone(), settings.clone());
                Box::pin(async move {
                    let id = Self::insert_user(tx.conn(), &email).await?;
                    let key = id.clone();
                    tx.write(&id, move |repo, conn| {
                        repo.put(conn, key.clone(), settings.clone())
                    })
                    .await?;
                    Ok(id)
                })
            })
            .await
    }

    /// The user's settings.
    pub async fn settings(&self, id: &K) -> Result<Settings, UserError> {
        let key = id.clone();
        self.settings
            .read(id, move |repo, conn| repo.get(conn, key.clone(), false))
            .await?
            .ok_or(UserError::NotFound)
    }

    /// Replaces the user's settings.
    pub async fn update(&self, id: &K, settings: Settings) -> Result<(), UserError> {
        // Two databases: `users` lives only in the legacy one, so in the stages that write the
        // new shape first (which cannot tell a deleted user) the user is looked up there first.
        if self.settings.is_split()
            && query("SELECT 1 FROM users WHERE id = $1")
                .bind_key(&id.to_dyn())
                .fetch_optional(self.db())
                .await?
                .is_none()
        {
            return Err(UserError::NotFound);
        }
        let key = id.clone();
        let found = self
            .settings
            .write(id, move |repo, conn| {
                repo.put(conn, key.clone(), settings.clone())
            })
            .await?;
        if found {
            Ok(())
        } else {
            Err(UserError::NotFound)
        }
    }

    /// Deletes the user and its settings. (Two databases: the settings through the dual store,
    /// then the user row.)
    pub async fn delete(&self, id: &K) -> Result<(), UserError> {
        let delete_user = |id: &K| query("DELETE FROM users WHERE id = $1").bind_key(&id.to_dyn());
        if self.settings.is_split() {
            let key = id.clone();
            self.settings
                .write(id, move |repo, conn| repo.delete(conn, key.clone()))
                .await?;
            let gone = delete_user(id).execute(self.db()).await?;
            return if gone == 0 {
                Err(UserError::NotFound)
            } else {
                Ok(())
            };
        }
        // One transaction of the store's own, rolled back when there was no such user.
        let id = id.clone();
        self.settings
            .transaction(move |tx| {
                let id = id.clone();
                Box::pin(async move {
                    let key = id.clone();
                    tx.write(&id, move |repo, conn| repo.delete(conn, key.clone()))
                        .await?;
                    let gone = delete_user(&id).execute(DB::conn(tx.conn())).await?;
                    if gone == 0 {
                        return Err(UserError::NotFound);
                    }
                    Ok(())
                })
            })
            .await
    }
}
