"""Prefect flows: orchestration only. Each task calls the same tumorseg function as the DVC stage."""
