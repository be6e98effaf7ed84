"""Edit methods that ship with conceptedit.

Each module is one method and is registered through the ``conceptedit`` entry-point group in
conceptedit's own ``pyproject.toml``, exactly as a third-party plugin package registers its
methods; nothing in the engine imports this package.
"""
