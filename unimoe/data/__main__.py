"""`python -m unimoe.data check|verify ...` (see `unimoe.data.check`)."""

import sys

from unimoe.data.check import main

sys.exit(main())
