"""The plugin contract: the types methods, evaluators, suites and exporters are written against.

Everything here is a type, a protocol or a small dataclass; nothing imports the engine or
evaluation, so a plugin author reads this package (and :mod:`conceptedit.toolkit` for the
shared maths) and nothing else. Users import these names from :mod:`conceptedit`.
"""
