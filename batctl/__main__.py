"""`python -m batctl`."""

from batctl.cli import main

main()
