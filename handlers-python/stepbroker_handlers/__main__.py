"""``python -m stepbroker_handlers`` runs the test pool (see ``testpool``)."""

from .testpool import main

raise SystemExit(main())
