"""`python -m dozero` is the same as the `dozero` command."""

from dozero.cli import main

raise SystemExit(main())
