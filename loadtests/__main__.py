"""``python -m loadtests`` = ``python -m loadtests.run``."""

from loadtests.run import main

raise SystemExit(main())
