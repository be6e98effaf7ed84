"""``python -m conceptedit``: the command line (also what ``torchrun``/``accelerate launch`` start)."""

from conceptedit.cli.app import main

main()
