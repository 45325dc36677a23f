//! The articles' data layer, written the way sqlx users write one: typed `query_as` with
//! `FromRow`, `uuid::Uuid` keys, `timestamptz` as `chrono::DateTime<Utc>`, on the service's own
//! `PgPool` and the `&mut PgConnection` twintrack's dual store hands each operation.
//!
//! The migration in progress moves an article's tags from `article.tag_list text[]` (legacy)
//! into `article_tag(article_id, tag)` rows (new): one legacy row, many new rows. Only the tags
//! move; the article row itself (`title`, `body`, `created_at`) is written in every stage.
#![allow(dead_code)]

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use twintrack::dual::{DualStore, Resync};
use twintrack::flags::BoxFuture;
use uuid::Uuid;

/// An article as the API returns it: tags sorted and distinct.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Article {
    #[serde(rename = "id")]
    pub article_id: Uuid,
    pub title: String,
    pub body: String,
    pub tags: Vec<String>,
    pub created_at: DateTime<Utc>,
}

/// Tags as the API stores them: sorted, distinct.
pub fn normalize(mut tags: Vec<String>) -> Vec<String> {
    tags.sort();
    tags.dedup();
    tags
}

/// One shape's view of articles and their tags. Both shapes implement it; the dual store picks.
pub trait ArticleShape: Send + Sync {
    /// The article with its tags as this shape holds them, or `None`.
    fn get<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        id: Uuid,
    ) -> BoxFuture<'c, sqlx::Result<Option<Article>>>;

    /// Articles carrying `tag`, newest first.
    fn with_tag<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        tag: String,
    ) -> BoxFuture<'c, sqlx::Result<Vec<Article>>>;

    /// The article's tags on this shape, locked for the transaction (`None`: no such article).
    fn tags_for_update<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        id: Uuid,
    ) -> BoxFuture<'c, sqlx::Result<Option<Vec<String>>>>;

    /// Makes this shape hold exactly `tags` for the article.
    fn set_tags<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        id: Uuid,
        tags: Vec<String>,
    ) -> BoxFuture<'c, sqlx::Result<()>>;

    /// Makes this shape hold no tags for the article.
    fn clear_tags<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        id: Uuid,
    ) -> BoxFuture<'c, sqlx::Result<()>>;
}

/// Tags in `article.tag_list`.
pub struct TagList;

/// Tags in `article_tag` rows.
pub struct TagRows;

impl ArticleShape for TagList {
    fn get<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        id: Uuid,
    ) -> BoxFuture<'c, sqlx::Result<Option<Article>>> {
        Box::pin(async move {
            sqlx::query_as::<_, Article>(
                "SELECT article_id, title, body, tag_list AS tags, created_at
                 FROM article WHERE article_id = $1",
            )
            .bind(id)
            .fetch_optional(conn)
            .await
        })
    }

    fn with_tag<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        tag: String,
    ) -> BoxFuture<'c, sqlx::Result<Vec<Article>>> {
        Box::pin(async move {
            sqlx::query_as::<_, Article>(
                "SELECT article_id, title, body, tag_list AS tags, created_at
                 FROM article WHERE $1 = ANY (tag_list)
                 ORDER BY created_at DESC, article_id",
            )
            .bind(tag)
            .fetch_all(conn)
            .await
        })
    }

    fn tags_for_update<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        id: Uuid,
    ) -> BoxFuture<'c, sqlx::Result<Option<Vec<String>>>> {
        Box::pin(async move {
            sqlx::query_scalar("SELECT tag_list FROM article WHERE article_id = $1 FOR SHARE")
                .bind(id)
                .fetch_optional(conn)
                .await
        })
    }

    fn set_tags<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        id: Uuid,
        tags: Vec<String>,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        Box::pin(async move {
            sqlx::query("UPDATE article SET tag_list = $2 WHERE article_id = $1")
                .bind(id)
                .bind(normalize(tags))
                .execute(conn)
                .await
                .map(drop)
        })
    }

    fn clear_tags<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        id: Uuid,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        Box::pin(async move {
            sqlx::query("UPDATE article SET tag_list = '{}' WHERE article_id = $1")
                .bind(id)
                .execute(conn)
                .await
                .map(drop)
        })
    }
}

/// The article row with its tags read from `article_tag`.
const WITH_TAG_ROWS: &str = "SELECT a.article_id, a.title, a.body, a.created_at,
        ARRAY(SELECT t.tag FROM article_tag t WHERE t.article_id = a.article_id ORDER BY t.tag) AS tags
 FROM article a";

impl ArticleShape for TagRows {
    fn get<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        id: Uuid,
    ) -> BoxFuture<'c, sqlx::Result<Option<Article>>> {
        Box::pin(async move {
            sqlx::query_as::<_, Article>(sqlx::AssertSqlSafe(format!(
                "{WITH_TAG_ROWS} WHERE a.article_id = $1"
            )))
            .bind(id)
            .fetch_optional(conn)
            .await
        })
    }

    fn with_tag<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        tag: String,
    ) -> BoxFuture<'c, sqlx::Result<Vec<Article>>> {
        Box::pin(async move {
            sqlx::query_as::<_, Article>(sqlx::AssertSqlSafe(format!(
                "{WITH_TAG_ROWS} WHERE EXISTS (SELECT 1 FROM article_tag t WHERE t.article_id = a.article_id AND t.tag = $1)
                 ORDER BY a.created_at DESC, a.article_id"
            )))
            .bind(tag)
            .fetch_all(conn)
            .await
        })
    }

    fn tags_for_update<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        id: Uuid,
    ) -> BoxFuture<'c, sqlx::Result<Option<Vec<String>>>> {
        Box::pin(async move {
            let tags: Vec<String> = sqlx::query_scalar(
                "SELECT tag FROM article_tag WHERE article_id = $1 ORDER BY tag FOR SHARE",
            )
            .bind(id)
            .fetch_all(conn)
            .await?;
            // No rows and no tags are one and the same on this shape.
            Ok(Some(tags))
        })
    }

    fn set_tags<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        id: Uuid,
        tags: Vec<String>,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        Box::pin(async move {
            let tags = normalize(tags);
            sqlx::query("DELETE FROM article_tag WHERE article_id = $1 AND NOT (tag = ANY ($2))")
                .bind(id)
                .bind(&tags)
                .execute(&mut *conn)
                .await?;
            sqlx::query(
                "INSERT INTO article_tag (article_id, tag) SELECT $1, unnest($2::text[])
                 ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(&tags)
            .execute(&mut *conn)
            .await
            .map(drop)
        })
    }

    fn clear_tags<'c>(
        &'c self,
        conn: &'c mut PgConnection,
        id: Uuid,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        Box::pin(async move {
            sqlx::query("DELETE FROM article_tag WHERE article_id = $1")
                .bind(id)
                .execute(conn)
                .await
                .map(drop)
        })
    }
}

/// How the dual store copies one article's tags from one shape to the other.
pub struct TagSync;

impl<'a> Resync<dyn ArticleShape + 'a> for TagSync {
    type Database = sqlx::Postgres;
    type Key = Uuid;
    type Record = Vec<String>;

    fn load<'c>(
        &'c self,
        shape: &'c (dyn ArticleShape + 'a),
        conn: &'c mut PgConnection,
        id: &'c Uuid,
    ) -> BoxFuture<'c, sqlx::Result<Option<Vec<String>>>> {
        shape.tags_for_update(conn, *id)
    }

    fn store<'c>(
        &'c self,
        shape: &'c (dyn ArticleShape + 'a),
        conn: &'c mut PgConnection,
        id: &'c Uuid,
        tags: Vec<String>,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        shape.set_tags(conn, *id, tags)
    }

    fn delete<'c>(
        &'c self,
        shape: &'c (dyn ArticleShape + 'a),
        conn: &'c mut PgConnection,
        id: &'c Uuid,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        shape.clear_tags(conn, *id)
    }
}

/// The tags' dual store.
pub type TagStore = DualStore<dyn ArticleShape, TagSync>;

/// The two shapes, for `DualStore::builder`.
pub fn shapes() -> (Arc<dyn ArticleShape>, Arc<dyn ArticleShape>) {
    (Arc::new(TagList), Arc::new(TagRows))
}

/// Both shapes, created idempotently. `article_tag` starts empty.
pub async fn create_shapes(pool: &PgPool) -> sqlx::Result<()> {
    for sql in [
        "CREATE TABLE IF NOT EXISTS article (
            article_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            title text NOT NULL,
            body text NOT NULL,
            tag_list text[] NOT NULL DEFAULT '{}',
            created_at timestamptz NOT NULL DEFAULT now())",
        "CREATE TABLE IF NOT EXISTS article_tag (
            article_id uuid NOT NULL,
            tag text NOT NULL,
            PRIMARY KEY (article_id, tag))",
        "CREATE INDEX IF NOT EXISTS article_tag_by_tag ON article_tag (tag)",
        "CREATE INDEX IF NOT EXISTS article_newest ON article (created_at DESC)",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
    }
    Ok(())
}

/// Why an article operation did not happen.
#[derive(Debug)]
pub enum ArticleError {
    /// No such article.
    NotFound,
    /// Anything else.
    Failed(twintrack::Error),
}

impl From<twintrack::Error> for ArticleError {
    fn from(e: twintrack::Error) -> Self {
        ArticleError::Failed(e)
    }
}

impl From<sqlx::Error> for ArticleError {
    fn from(e: sqlx::Error) -> Self {
        ArticleError::Failed(e.into())
    }
}

/// The article service: `article` rows directly, tags through the dual store.
#[derive(Clone)]
pub struct Articles {
    pub pool: PgPool,
    pub tags: TagStore,
}

impl Articles {
    /// Creates an article with its tags, in one transaction.
    pub async fn create(
        &self,
        title: String,
        body: String,
        tags: Vec<String>,
    ) -> Result<Article, ArticleError> {
        let mut tx = self.pool.begin().await?;
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO article (title, body) VALUES ($1, $2) RETURNING article_id",
        )
        .bind(&title)
        .bind(&body)
        .fetch_one(&mut *tx)
        .await?;
        let tags = normalize(tags);
        let written = tags.clone();
        self.tags
            .write_in(&mut tx, &id, move |shape, conn| {
                shape.set_tags(conn, id, written.clone())
            })
            .await?;
        tx.commit().await?;
        self.get(id).await
    }

    /// The article, its tags read from the side the stage serves.
    pub async fn get(&self, id: Uuid) -> Result<Article, ArticleError> {
        self.tags
            .read(&id, move |shape, conn| shape.get(conn, id))
            .await?
            .ok_or(ArticleError::NotFound)
    }

    /// Replaces the article's tags.
    pub async fn set_tags(&self, id: Uuid, tags: Vec<String>) -> Result<Article, ArticleError> {
        let mut tx = self.pool.begin().await?;
        let exists: Option<Uuid> =
            sqlx::query_scalar("SELECT article_id FROM article WHERE article_id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_none() {
            return Err(ArticleError::NotFound);
        }
        let tags = normalize(tags);
        self.tags
            .write_in(&mut tx, &id, move |shape, conn| {
                shape.set_tags(conn, id, tags.clone())
            })
            .await?;
        tx.commit().await?;
        self.get(id).await
    }

    /// Deletes the article and its tags.
    pub async fn delete(&self, id: Uuid) -> Result<(), ArticleError> {
        let mut tx = self.pool.begin().await?;
        self.tags
            .write_in(&mut tx, &id, move |shape, conn| shape.clear_tags(conn, id))
            .await?;
        let gone = sqlx::query("DELETE FROM article WHERE article_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if gone == 0 {
            return Err(ArticleError::NotFound);
        }
        tx.commit().await?;
        Ok(())
    }

    /// Articles carrying `tag`, newest first, from the side the stage serves.
    pub async fn with_tag(&self, tag: String) -> Result<Vec<Article>, ArticleError> {
        Ok(self
            .tags
            .read_query("articles_with_tag", move |shape, conn| {
                shape.with_tag(conn, tag.clone())
            })
            .await?)
    }
}
