//! How the domain's enums are stored: `text` columns holding their `as_str()` spelling (the
//! CHECK constraints of the migrations allow exactly those), read back into the enums, so rows
//! carry [`PaymentStatus`] and [`Currency`], never strings.

use diesel::deserialize::{self, FromSql, Queryable};
use diesel::pg::{Pg, PgValue};
use diesel::sql_types::Text;

use crate::domain::{Currency, PaymentStatus};

/// Reads a `text` column through `FromStr`; a value the enum does not know is an error (the
/// schema's CHECK constraints make that impossible for rows this service wrote).
fn parse<T: std::str::FromStr>(bytes: PgValue<'_>, what: &str) -> deserialize::Result<T> {
    let text = <String as FromSql<Text, Pg>>::from_sql(bytes)?;
    text.parse()
        .map_err(|_| format!("unknown {what} {text:?} in the database").into())
}

impl FromSql<Text, Pg> for PaymentStatus {
    fn from_sql(bytes: PgValue<'_>) -> deserialize::Result<Self> {
        parse(bytes, "payment status")
    }
}

impl FromSql<Text, Pg> for Currency {
    fn from_sql(bytes: PgValue<'_>) -> deserialize::Result<Self> {
        parse(bytes, "currency")
    }
}

// What `#[derive(FromSqlRow)]` would write, here so that the domain stays free of diesel.
impl Queryable<Text, Pg> for PaymentStatus {
    type Row = Self;
    fn build(row: Self) -> deserialize::Result<Self> {
        Ok(row)
    }
}

impl Queryable<Text, Pg> for Currency {
    type Row = Self;
    fn build(row: Self) -> deserialize::Result<Self> {
        Ok(row)
    }
}
