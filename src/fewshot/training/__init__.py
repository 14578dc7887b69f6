"""The training shell: Lightning's module, data module, callbacks, loggers, checkpoints, CLI.

Everything that needs Lightning lives here; nothing below (core, models, data, algorithms,
execution) or beside it (inference) imports it.
"""
