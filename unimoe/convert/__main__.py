"""`python -m unimoe.convert`: see `unimoe.convert.cli`."""

import sys

from unimoe.convert.cli import main

sys.exit(main())
