"""``python -m lowbit.cli``: the same as the ``lowbit`` command."""

import sys

from lowbit.cli.commands import main

sys.exit(main())
