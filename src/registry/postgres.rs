//! PostgreSQL registry (being written).
