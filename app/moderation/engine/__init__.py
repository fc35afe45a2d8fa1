"""The embedded engine: a hashed word and character n-gram model with linear heads, calibrated, shipped as package
data (docs/engine.md is its model card; ops/engine/ trains and evaluates it)."""
