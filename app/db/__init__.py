"""SQL persistence: ORM base, models, engine/session factories, query helpers and migrations."""
