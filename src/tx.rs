//! [`Executor`]: the caller's own connection or transaction, for every
//! `*_tx` method (`notify_tx`, `publish_tx`, `enqueue_tx`, `complete_tx`,
//! `ack_tx`, `emit_tx`).
//!
//! One bound for all of them, implemented for tokio-postgres' and
//! deadpool's clients and transactions as they are (no `&*tx`).

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Row;

/// A connection or transaction of the caller's to run a statement on:
/// `tokio_postgres::{Client, Transaction}` and
/// `deadpool_postgres::{Client, Transaction}`. Sealed.
///
/// Each call is one round trip: deadpool's types prepare the statement once
/// per connection (`prepare_typed_cached`); tokio-postgres' types, which
/// keep no statement cache, send it unnamed with its parameter types, so
/// nothing is prepared beforehand or left on the session.
pub trait Executor: sealed::Sealed + Sync {}

/// Parameters with their types, as every statement here is sent.
pub(crate) type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

pub(crate) mod sealed {
    /// Which of the four the caller handed in. Unnameable outside the crate.
    pub enum Conn<'a> {
        Client(&'a tokio_postgres::Client),
        Transaction(&'a tokio_postgres::Transaction<'a>),
        PooledClient(&'a deadpool_postgres::ClientWrapper),
        PooledTransaction(&'a deadpool_postgres::Transaction<'a>),
    }

    pub trait Sealed {
        fn conn(&self) -> Conn<'_>;
    }
}

use sealed::{Conn, Sealed};

impl Sealed for tokio_postgres::Client {
    fn conn(&self) -> Conn<'_> {
        Conn::Client(self)
    }
}
impl Executor for tokio_postgres::Client {}

impl Sealed for tokio_postgres::Transaction<'_> {
    fn conn(&self) -> Conn<'_> {
        Conn::Transaction(self)
    }
}
impl Executor for tokio_postgres::Transaction<'_> {}

impl Sealed for deadpool_postgres::Client {
    fn conn(&self) -> Conn<'_> {
        Conn::PooledClient(self)
    }
}
impl Executor for deadpool_postgres::Client {}

impl Sealed for deadpool_postgres::ClientWrapper {
    fn conn(&self) -> Conn<'_> {
        Conn::PooledClient(self)
    }
}
impl Executor for deadpool_postgres::ClientWrapper {}

impl Sealed for deadpool_postgres::Transaction<'_> {
    fn conn(&self) -> Conn<'_> {
        Conn::PooledTransaction(self)
    }
}
impl Executor for deadpool_postgres::Transaction<'_> {}

fn types(params: &Params<'_>) -> Vec<Type> {
    params.iter().map(|(_, t)| t.clone()).collect()
}

fn values<'a>(params: &'a Params<'a>) -> Vec<&'a (dyn ToSql + Sync)> {
    params.iter().map(|(v, _)| *v).collect()
}

/// Runs `sql` on `executor`; returns the number of rows it affected.
pub(crate) async fn execute<E: Executor + ?Sized>(
    executor: &E,
    sql: &str,
    params: &Params<'_>,
) -> Result<u64, tokio_postgres::Error> {
    match executor.conn() {
        Conn::Client(c) => c.execute_typed(sql, params).await,
        Conn::Transaction(t) => t.execute_typed(sql, params).await,
        Conn::PooledClient(c) => {
            let stmt = c.prepare_typed_cached(sql, &types(params)).await?;
            c.execute(&stmt, &values(params)).await
        }
        Conn::PooledTransaction(t) => {
            let stmt = t.prepare_typed_cached(sql, &types(params)).await?;
            t.execute(&stmt, &values(params)).await
        }
    }
}

/// Runs `sql` on `executor`; returns its rows.
pub(crate) async fn query<E: Executor + ?Sized>(
    executor: &E,
    sql: &str,
    params: &Params<'_>,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    match executor.conn() {
        Conn::Client(c) => c.query_typed(sql, params).await,
        Conn::Transaction(t) => t.query_typed(sql, params).await,
        Conn::PooledClient(c) => {
            let stmt = c.prepare_typed_cached(sql, &types(params)).await?;
            c.query(&stmt, &values(params)).await
        }
        Conn::PooledTransaction(t) => {
            let stmt = t.prepare_typed_cached(sql, &types(params)).await?;
            t.query(&stmt, &values(params)).await
        }
    }
}

/// Runs `sql` on `executor`; returns its only row (an error unless
/// exactly one).
pub(crate) async fn query_one<E: Executor + ?Sized>(
    executor: &E,
    sql: &str,
    params: &Params<'_>,
) -> Result<Row, tokio_postgres::Error> {
    match executor.conn() {
        Conn::Client(c) => c.query_typed_one(sql, params).await,
        Conn::Transaction(t) => t.query_typed_one(sql, params).await,
        Conn::PooledClient(c) => {
            let stmt = c.prepare_typed_cached(sql, &types(params)).await?;
            c.query_one(&stmt, &values(params)).await
        }
        Conn::PooledTransaction(t) => {
            let stmt = t.prepare_typed_cached(sql, &types(params)).await?;
            t.query_one(&stmt, &values(params)).await
        }
    }
}

/// Runs `sql` on `executor`; returns its row, if any (an error if more).
pub(crate) async fn query_opt<E: Executor + ?Sized>(
    executor: &E,
    sql: &str,
    params: &Params<'_>,
) -> Result<Option<Row>, tokio_postgres::Error> {
    match executor.conn() {
        Conn::Client(c) => c.query_typed_opt(sql, params).await,
        Conn::Transaction(t) => t.query_typed_opt(sql, params).await,
        Conn::PooledClient(c) => {
            let stmt = c.prepare_typed_cached(sql, &types(params)).await?;
            c.query_opt(&stmt, &values(params)).await
        }
        Conn::PooledTransaction(t) => {
            let stmt = t.prepare_typed_cached(sql, &types(params)).await?;
            t.query_opt(&stmt, &values(params)).await
        }
    }
}

/// Runs `sql` on `executor`; returns its rows as they arrive.
pub(crate) async fn query_raw<E: Executor + ?Sized>(
    executor: &E,
    sql: &str,
    params: &Params<'_>,
) -> Result<tokio_postgres::RowStream, tokio_postgres::Error> {
    let typed = || params.iter().map(|(v, t)| (*v, t.clone()));
    match executor.conn() {
        Conn::Client(c) => c.query_typed_raw(sql, typed()).await,
        Conn::Transaction(t) => t.query_typed_raw(sql, typed()).await,
        Conn::PooledClient(c) => {
            let stmt = c.prepare_typed_cached(sql, &types(params)).await?;
            c.query_raw(&stmt, values(params)).await
        }
        Conn::PooledTransaction(t) => {
            let stmt = t.prepare_typed_cached(sql, &types(params)).await?;
            t.query_raw(&stmt, values(params)).await
        }
    }
}
