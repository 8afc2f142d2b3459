"""``python -m dtrace TOOL``: ready-made tracing tools on the probes (see ``dtrace.tools``)."""

import sys

from dtrace.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
