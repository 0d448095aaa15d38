"""`python -m tokzoo ...`: the CLI as a module, which is what torchrun launches (`torchrun ... -m tokzoo fit ...`)."""

from tokzoo.cli import run

run()
