"""``python -m needle ...`` runs the command line (see needle.cli)."""

from .cli import main

raise SystemExit(main())
