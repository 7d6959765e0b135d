"""`python -m vcfs ...`: the same as the `vcfs` command."""

from vcfs.cli import main

raise SystemExit(main())
