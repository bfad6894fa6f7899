//! A scenario's registry schema in the test database: named by the scenario,
//! created and migrated by the daemons it starts (`DB_SCHEMA`), dropped
//! here once they have stopped.

/// The scenario's registry schema: created by the daemons (named by
/// `DB_SCHEMA`), dropped here once they have stopped. Declare it before the
/// daemons, so that on an early return they drop (and die) first.
pub struct Schema {
    pub name: String,
    database_url: String,
    dropped: bool,
}

impl Schema {
    pub fn new(database_url: &str, name: &str) -> Schema {
        Schema {
            name: name.to_owned(),
            database_url: database_url.to_owned(),
            dropped: false,
        }
    }

    pub fn drop_now(mut self) -> Result<(), String> {
        self.dropped = true;
        drop_schema(&self.database_url, &self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if !self.dropped {
            let _ = drop_schema(&self.database_url, &self.name);
        }
    }
}

fn drop_schema(database_url: &str, name: &str) -> Result<(), String> {
    let mut client = postgres::Client::connect(database_url, postgres::NoTls)
        .map_err(|error| format!("connect to PostgreSQL: {error}"))?;
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
        .map_err(|error| format!("drop schema {name}: {error}"))
}
