"""`python -m gradpool.worker`: run a gradpool worker (same flags as `gradpool worker`)."""

from gradpool.worker.server import main

raise SystemExit(main(prog="python -m gradpool.worker"))
