//! PostgreSQL for tests: the shared server on loopback, a schema of each test's own.

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::unique;

/// The database tests use: `DATABASE_URL`, else the local server's `test` database.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of the test's own on the shared server, dropped with [`remove`](Self::remove).
#[derive(Debug)]
pub struct TestSchema {
    /// Its name.
    pub name: String,
    /// A pool on the test database.
    pub pool: PgPool,
}

impl TestSchema {
    /// Creates a schema named after `prefix`; fails with a clear message when PostgreSQL does
    /// not answer.
    pub async fn create(prefix: &str) -> TestSchema {
        let url = database_url();
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(&url)
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL does not answer at {url} ({e}); start it (scripts/test.sh does) or set DATABASE_URL")
            });
        let name = unique(prefix).replace('-', "_");
        sqlx::query(&format!("CREATE SCHEMA \"{name}\"")).execute(&pool).await.expect("schema created");
        TestSchema { name, pool }
    }

    /// Drops the schema and everything in it.
    pub async fn remove(self) {
        let _ = sqlx::query(&format!("DROP SCHEMA \"{}\" CASCADE", self.name)).execute(&self.pool).await;
        self.pool.close().await;
    }
}
