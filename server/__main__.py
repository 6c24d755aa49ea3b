"""`python -m gradpool.server`: run the gradpool coordinator (same flags as `gradpool coordinator`)."""

from gradpool.server.coordinator import main

raise SystemExit(main(prog="python -m gradpool.server"))
