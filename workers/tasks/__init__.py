"""Pipeline stages: self-edits, probes, training, evaluation and the promotion gate."""
