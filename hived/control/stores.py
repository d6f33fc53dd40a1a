"""Which store a hive's config names: PostgreSQL (hived/control/pgstore.py) when
`hive.database` is set, else SQLite (hived/control/store.py) in its state_dir."""

from hived.control.store import SQLiteStore, Store


def open_store(config, *, background_checkpoint: bool = False) -> Store:
    """Raises StoreError (the database cannot be used) or ConfigError (its password file)."""
    if config.database:
        from hived.control.pgstore import PostgresStore

        return PostgresStore(config.database, config.hive, password=config.database_password(),
                             log_max_bytes=config.log_max_bytes)
    return SQLiteStore(config.db_path, config.hive, synchronous=config.synchronous,
                       log_max_bytes=config.log_max_bytes, background_checkpoint=background_checkpoint)
