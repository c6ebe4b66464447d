//! Hand-written SQL that PostgreSQL parses and plans once per connection, not once per call.
//!
//! `diesel::sql_query` marks every statement unsafe to cache (its text may be built at run time,
//! and a cache keyed by such text could grow without bound), so diesel-async prepares it afresh
//! on every call: an extra round trip (Parse/Describe) before the Bind/Execute one, and a new
//! parse and plan on the server each time. [`sql_query`] here takes the text as a
//! `&'static str`, so its statements are a fixed set written in the source, and leaves them
//! cacheable: diesel-async keys its per-connection statement cache by the SQL text and the bind
//! types, prepares a statement on its first use on a connection, and afterwards only binds and
//! executes it.
//!
//! Use it for statements run per request or per message. A statement whose plan should depend
//! on its values (catch-all filters such as `$2 IS NULL OR …`) is better left to
//! `diesel::sql_query`, which plans every call with the values at hand.

use std::marker::PhantomData;

use diesel::QueryResult;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};

/// `diesel::sql_query` for SQL text fixed at compile time, cached as a prepared statement. The
/// placeholders `$1`, `$2`, … are written in the text and get the values of [`PreparedSql::bind`]
/// in call order. Rows load by column name (`QueryableByName`), as with `diesel::sql_query`.
pub fn sql_query(sql: &'static str) -> PreparedSql<()> {
    PreparedSql { sql, binds: () }
}

/// A statement built by [`sql_query`]: the SQL text and its bind values (`B`, a chain of
/// [`Bind`]s ending in `()`).
#[derive(Debug, Clone)]
#[must_use = "Queries are only executed when calling `load`, `get_result` or similar."]
pub struct PreparedSql<B> {
    sql: &'static str,
    binds: B,
}

impl<B> PreparedSql<B> {
    /// Adds the value of the next placeholder, as SQL type `ST`.
    pub fn bind<ST, V>(self, value: V) -> PreparedSql<Bind<B, ST, V>> {
        PreparedSql {
            sql: self.sql,
            binds: Bind {
                prev: self.binds,
                value,
                sql_type: PhantomData,
            },
        }
    }
}

/// One bind value after those of `prev`.
#[derive(Debug, Clone)]
pub struct Bind<Prev, ST, V> {
    prev: Prev,
    value: V,
    sql_type: PhantomData<ST>,
}

impl<B: QueryFragment<Pg>> QueryFragment<Pg> for PreparedSql<B> {
    // Deliberately no `out.unsafe_to_cache_prepared()`: the text is a `&'static str`.
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(self.sql);
        self.binds.walk_ast(out)
    }
}

impl<Prev, ST, V> QueryFragment<Pg> for Bind<Prev, ST, V>
where
    Prev: QueryFragment<Pg>,
    Pg: HasSqlType<ST>,
    V: ToSql<ST, Pg>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.prev.walk_ast(out.reborrow())?;
        // The placeholder is already in the text: only the value is collected. (Public through
        // diesel's `i-implement-a-third-party-backend…` feature, which diesel-async enables.)
        out.push_bind_param_value_only(&self.value)
    }
}

/// No static id: statements with the same bind types share one Rust type, so the cache must
/// tell them apart by their SQL text, which is what diesel does for a query without one.
impl<B> QueryId for PreparedSql<B> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

/// Untyped, like `diesel::sql_query`: rows are read by column name.
impl<B> Query for PreparedSql<B> {
    type SqlType = Untyped;
}
