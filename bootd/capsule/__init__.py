"""VNFS capsules: a root tree as a deterministic pax stream in content-defined, zstd, sha256-named chunks.

Pure and synchronous (no asyncio): the CLI runs it directly, the daemon only reads
the store (``store.CapsuleStore``) and may call ``CapsuleStore.gc`` from a thread.
See README.md in this directory for the on-disk format.
"""
