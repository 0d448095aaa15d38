"""`python -m tokzoo.sweep run-trial DIR`: the command the sweep starts per trial (and Lightning re-executes per
DDP rank, as `python -m tokzoo.sweep.__main__ ...`)."""

from tokzoo.exiting import exit_now
from tokzoo.sweep.trial import main

if __name__ == "__main__":
    exit_now(main())
