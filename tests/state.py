"""Another client of a test's state store, as another process (a second run, a parallel shard) would open it."""

from __future__ import annotations

from reconciler.store import RedisStore, SQLiteStore, Store


def another_client(store: Store) -> Store:
    """A new connection to the same Redis database or SQLite file, under the same key prefix."""
    if isinstance(store, RedisStore):
        kwargs = store.client.connection_pool.connection_kwargs
        return RedisStore(f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}", store.key_prefix)
    assert isinstance(store, SQLiteStore)
    return SQLiteStore(store.path, store.key_prefix)
