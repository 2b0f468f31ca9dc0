"""`python -m compress COMMAND ...`, the form launchers take: `torchrun --nproc-per-node 2 -m compress export ...`."""

import sys

from compress.cli import main

sys.exit(main())
