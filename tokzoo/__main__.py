"""`python -m tokzoo ...`: the CLI as a module, which is what torchrun launches (`torchrun ... -m tokzoo fit ...`)."""

import sys

from tokzoo.cli import main

sys.exit(main())
