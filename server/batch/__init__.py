"""The durable batch-job system behind both faces: the store (`store`: batches, items,
results, files, idempotency keys, in sqlite), the runner that feeds claimed items to the
engine as offline requests (`runner`), and offline KV saved across a restart
(`offline_resume`). It never imports a face."""
