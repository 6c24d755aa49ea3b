"""`python -m server`: run the gradpool coordinator (same flags as `gradpool coordinator`)."""

from server.coordinator import main

raise SystemExit(main(prog="python -m server"))
