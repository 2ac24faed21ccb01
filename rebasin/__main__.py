"""``python -m rebasin``: the same command line as ``rebasin``."""
from rebasin.cli import main

raise SystemExit(main())
