"""`python -m vidcache ...` is the `vidcache` command."""

import sys

from vidcache.cli import main

sys.exit(main())
