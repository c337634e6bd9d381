"""The durable batch-job system behind both faces: the store (`store.open_store`; `base` its
contract; `sqlite_store` under one server's data dir; `pg_store` in PostgreSQL, shared by a
fleet of replicas with leased claims), the runner that feeds claimed items to the engine as
offline requests (`runner`), and offline KV saved across a restart (`offline_resume`). It
never imports a face."""
