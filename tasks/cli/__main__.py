"""`python -m tasks.cli`: the `modelq` command without the installed script."""

from tasks.cli.main import main

main()
