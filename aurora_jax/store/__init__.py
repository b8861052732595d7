"""Storage and transport between an engine and a learner that share nothing but a store:

- kvstore.py: one key-value interface over a directory, file://, gs://, s3:// or memory://;
- trace_store.py: finished sequences, written in shards by the engine, followed by the learner;
- draft_store.py: versioned drafts, published by the learner, watched by the engine;
- periodic.py: the background poller both followers use.
"""
