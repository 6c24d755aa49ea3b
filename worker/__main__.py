"""`python -m worker`: run a gradpool worker (same flags as `gradpool worker`)."""

from worker.server import main

raise SystemExit(main(prog="python -m worker"))
