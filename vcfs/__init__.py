"""vcfs: a read-only FUSE filesystem over a vidcache service.

Every stored video appears as `<mountpoint>/by-hash/<hash>.<ext>`; reads are served from an
in-memory LRU block cache (vcfs.blocks) filled by byte-range requests (vcfs.remote), with
per-file readahead once a reader streams (vcfs.readahead). vcfs.fs adapts this to mfusepy,
vcfs.cli is the `vcfs` command. See docs/vcfs.md.
"""

__version__ = "0.1.0"
