"""vidcache: a content-addressed video cache service.

Videos are ingested by URL, stored once per BLAKE3 hash of their bytes (exact dedup), matched
against stored videos by a perceptual hash (near-duplicate dedup) and served by hash with HTTP
byte ranges. See docs/service.md.
"""

__version__ = "1.0.0"
