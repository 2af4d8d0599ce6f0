"""Small helpers with no meshlm dependencies: file hashing, TOML writing."""
