# The tiny models' builder version (kept here, import-light: config hashing reads it). Bump it when a
# builder in models/tiny.py changes: cached builds and stage outputs built on them are keyed by it.
TINY_VERSION = 2
