"""Reading and writing run folders, edit files and manifests, atomically."""
