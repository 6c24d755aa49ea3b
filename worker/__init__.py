"""gradpool worker: the engine (worker.engine) and the gRPC worker server."""
