"""python -m jmid.checkpoint: the commands in commands.py."""

import sys

from jmid.checkpoint.commands import main

sys.exit(main())
