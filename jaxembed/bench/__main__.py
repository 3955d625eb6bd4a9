"""``python -m jaxembed.bench``: the same as the ``jaxembed-bench`` command."""

import sys

from jaxembed.bench import main

sys.exit(main())
