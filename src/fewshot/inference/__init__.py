"""Using a trained model: load, adapt, predict, export. Imports neither Lightning nor the
training shell (the import-linter contracts in pyproject.toml keep it so)."""
