"""The OpenAI-compatible HTTP front: chat/completions, the Batch API, /v1/models and
/metrics over the server's engine and batch store (see `front.HttpFront`)."""
